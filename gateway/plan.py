"""Plans: which backend answers a request, and by what route.

An explicit tier name (or one of its aliases, or its upstream model id) passes straight through
to that tier. `green`, and `green-<target>` (e.g. `green-0.95`), are reserved for the router;
until a router is configured they are refused with a clear error rather than silently served.
"""

from __future__ import annotations

from dataclasses import dataclass

from backends.base import Backend
from gateway.config import GatewayConfig, is_reserved
from gateway.errors import APIError


@dataclass(frozen=True, slots=True)
class Plan:
    tier: str
    backend: Backend
    route: str  # "direct": the client named the model


class Planner:
    """Resolves a requested model name to a Plan; built once, looked up per request."""

    def __init__(self, config: GatewayConfig, backends: dict[str, Backend]) -> None:
        self._plans: dict[str, Plan] = {}
        for tier in config.tiers_by_energy():
            plan = Plan(tier=tier.name, backend=backends[tier.name], route="direct")
            for name in (tier.name, *tier.aliases):
                self._plans[name] = plan
        for tier in config.tiers_by_energy():  # upstream ids last: names and aliases win
            self._plans.setdefault(backends[tier.name].model_id, self._plans[tier.name])
        self.tier_names = [t.name for t in config.tiers_by_energy()]

    def plan(self, model: str) -> Plan:
        plan = self._plans.get(model)
        if plan is not None:
            return plan
        if is_reserved(model):
            raise APIError(
                400,
                f"The model `{model}` is reserved for GreenRoute's router, and this gateway has "
                f"no router configured yet. Request a tier by name instead: "
                f"{', '.join(self.tier_names)}.",
                param="model", code="router_not_configured")
        raise APIError(404, f"The model `{model}` does not exist. Available models: "
                            f"{', '.join(self.tier_names)}.",
                       param="model", code="model_not_found")
