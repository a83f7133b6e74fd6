"""Plans: which backend answers a request, and by what route.

An explicit tier name (or one of its aliases, or its upstream model id) passes straight through
to that tier. `green`, and `green-<target>` (e.g. `green-0.9`: keep 90% of the largest tier's
quality), go to the router; without a router they are refused with a clear error rather than
silently served by some tier.
"""

from __future__ import annotations

from dataclasses import dataclass

from greenroute.backends.base import Backend
from greenroute.gateway.config import RESERVED_MODEL, GatewayConfig, is_reserved
from greenroute.gateway.errors import APIError


@dataclass(frozen=True, slots=True)
class Plan:
    tier: str
    backend: Backend
    route: str  # "direct": the client named the model


@dataclass(frozen=True, slots=True)
class RoutedPlan:
    """Model `green`: the router decides. `target` comes from the name (green-0.9), if any."""

    target: float | None


def parse_target(text: str, param: str) -> float:
    """A quality target: a share of the largest tier's quality, in (0, 1]."""
    try:
        target = float(text)
    except ValueError:
        target = float("nan")
    if not 0 < target <= 1:
        raise APIError(400, f"Invalid quality target {text!r}: give a share of the largest "
                            "model's quality in (0, 1], e.g. 0.95.", param=param,
                       code="invalid_value")
    return target


class Planner:
    """Resolves a requested model name to a Plan; built once, looked up per request."""

    def __init__(self, config: GatewayConfig, backends: dict[str, Backend],
                 routed: bool = False) -> None:
        self.routed = routed
        self._plans: dict[str, Plan] = {}
        for tier in config.tiers_by_energy():
            plan = Plan(tier=tier.name, backend=backends[tier.name], route="direct")
            for name in (tier.name, *tier.aliases):
                self._plans[name] = plan
        for tier in config.tiers_by_energy():  # upstream ids last: names and aliases win
            self._plans.setdefault(backends[tier.name].model_id, self._plans[tier.name])
        self.tier_names = [t.name for t in config.tiers_by_energy()]

    def plan(self, model: str) -> Plan | RoutedPlan:
        plan = self._plans.get(model)
        if plan is not None:
            return plan
        if is_reserved(model) and self.routed:
            suffix = model[len(RESERVED_MODEL) + 1:]
            return RoutedPlan(parse_target(suffix, "model") if suffix else None)
        if is_reserved(model):
            raise APIError(
                400,
                f"The model `{model}` is reserved for GreenRoute's router, and this gateway has "
                f"no router configured yet. Request a tier by name instead: "
                f"{', '.join(self.tier_names)}.",
                param="model", code="router_not_configured")
        raise self._not_found(model)

    def card_name(self, model: str) -> str:
        """The listed model that `model` names, for `GET /v1/models/{model}`: a tier, or
        `green`, which is listed with or without a router (`green-<target>` needs one)."""
        if model == RESERVED_MODEL:
            return RESERVED_MODEL
        plan = self._plans.get(model)
        if plan is not None:
            return plan.tier
        if is_reserved(model) and self.routed:
            self.plan(model)  # a bad target (green-2) is a 400, as for a request
            return RESERVED_MODEL
        raise self._not_found(model)

    def _not_found(self, model: str) -> APIError:
        return APIError(404, f"The model `{model}` does not exist. Available models: "
                             f"{', '.join(self.tier_names)}.",
                        param="model", code="model_not_found")
