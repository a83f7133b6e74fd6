"""The backend kinds a tier may name, one entry each, and the schema of a tier.

A kind says which tier fields it needs, what it must fetch before it starts, which meter sees
its energy by default, and how its backend is built. Adding a backend is its class (the
`Backend` Protocol) plus one `BackendKind` subclass and one entry in `BACKENDS`;
`TierConfig.backend` accepts exactly the names there. A kind imports its backend class only
when it builds one, so reading a config loads neither llama.cpp nor litellm.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import ClassVar

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from greenroute.backends import weights
from greenroute.backends.base import Backend
from greenroute.backends.energy.registry import MeterConfig

Log = Callable[[str], None]


class TierConfig(BaseModel):
    """One model the gateway can send requests to."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$")
    backend: str  # a key of BACKENDS
    # openai / litellm: the upstream's model id. llamacpp: the id reported to clients.
    model: str | None = None
    # openai: base URL ending in /v1. litellm: optional api_base.
    url: str | None = None
    api_key: str | None = None
    api_key_env: str | None = None
    # llamacpp: a GGUF file, or the name of default weights fetched by `greenroute models`.
    path: str | None = None
    weights: str | None = None
    threads: int | None = Field(default=None, ge=1)
    context: int = Field(default=4096, ge=256)
    max_queue: int = Field(default=32, ge=1)
    # Relative energy per token; orders the tiers (smallest first) for routing.
    energy_hint: float = Field(default=1.0, gt=0)
    aliases: tuple[str, ...] = ()
    # Tiers that answer a request for this one, in order, when it fails before its first byte
    # (a connection error, a 5xx) or its circuit breaker is open (gateway/fallback.py).
    fallbacks: tuple[str, ...] = ()
    timeout_s: float = Field(default=120.0, gt=0)
    connect_timeout_s: float = Field(default=5.0, gt=0)
    max_connections: int = Field(default=256, ge=1)
    # The energy meter; default: the kind's (`estimate` for llamacpp, this process's CPU),
    # else none.
    meter: MeterConfig | None = None

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, backend: str) -> str:
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; known: {', '.join(BACKENDS)}")
        return backend

    @model_validator(mode="after")
    def _check_backend_fields(self) -> TierConfig:
        self.kind.check(self)
        return self

    @property
    def kind(self) -> BackendKind:
        return BACKENDS[self.backend]

    def resolved_api_key(self) -> str | None:
        if self.api_key_env:
            return os.environ.get(self.api_key_env)
        return self.api_key


class BackendKind(abc.ABC):
    """How a tier of one backend kind is checked, prepared and built."""

    # TierConfig fields this kind cannot do without, in the order they are checked.
    requires: ClassVar[tuple[str, ...]] = ()
    # The meter of a tier that names none: set for kinds that run in this process.
    default_meter: ClassVar[MeterConfig | None] = None

    def check(self, tier: TierConfig) -> None:
        """Raise ValueError naming the first required field the tier leaves empty."""
        for field in self.requires:
            if not getattr(tier, field):
                raise ValueError(f"tier {tier.name!r}: backend {tier.backend!r} needs {field}")

    def prepare(self, tier: TierConfig, *, fetch: bool, log: Log) -> None:  # noqa: B027
        """Make sure what the backend loads locally is present (raise WeightsError if not);
        by default a kind loads nothing locally."""

    @abc.abstractmethod
    def build(self, tier: TierConfig) -> Backend:
        """The backend this tier declares."""


class OpenAIKind(BackendKind):
    """Any OpenAI-compatible HTTP server (vLLM, llama.cpp server, a cloud API)."""

    requires = ("url", "model")

    def build(self, tier: TierConfig) -> Backend:
        from greenroute.backends.openai_http import OpenAIHTTPBackend

        assert tier.url and tier.model  # required by check()
        return OpenAIHTTPBackend(tier.name, tier.url, tier.model, api_key=tier.resolved_api_key(),
                                 timeout_s=tier.timeout_s, connect_timeout_s=tier.connect_timeout_s,
                                 max_connections=tier.max_connections)


class LiteLLMKind(BackendKind):
    """Cloud providers through litellm (the `cloud` extra)."""

    requires = ("model",)

    def build(self, tier: TierConfig) -> Backend:
        from greenroute.backends.litellm_backend import LiteLLMBackend

        assert tier.model  # required by check()
        return LiteLLMBackend(tier.name, tier.model, api_base=tier.url,
                              api_key=tier.resolved_api_key(), timeout_s=tier.timeout_s)


class LlamaCppKind(BackendKind):
    """A GGUF model in this process: its energy is this process's CPU time."""

    default_meter = MeterConfig(kind="estimate")

    def check(self, tier: TierConfig) -> None:
        if bool(tier.path) == bool(tier.weights):
            raise ValueError(f"tier {tier.name!r}: backend 'llamacpp' needs exactly one of "
                             "path or weights")

    def prepare(self, tier: TierConfig, *, fetch: bool, log: Log) -> None:
        if not tier.weights:
            return
        spec = weights.resolve(tier.weights)
        if not fetch and not weights.path_for(spec).exists():
            raise weights.WeightsError(f"weights {spec.name} are missing; run "
                                       f"`greenroute models {tier.weights}`")
        weights.ensure(tier.weights, log=log)

    def build(self, tier: TierConfig) -> Backend:
        from greenroute.backends.llamacpp import LlamaCppBackend

        if tier.weights:
            spec = weights.resolve(tier.weights)
            path = weights.path_for(spec)
            model_id = tier.model or spec.name
        else:
            path = Path(tier.path or "").expanduser()
            model_id = tier.model or path.stem
        return LlamaCppBackend(tier.name, path, model_id, threads=tier.threads,
                               context=tier.context, max_queue=tier.max_queue)


BACKENDS: dict[str, BackendKind] = {
    "openai": OpenAIKind(),
    "llamacpp": LlamaCppKind(),
    "litellm": LiteLLMKind(),
}


def build_backend(tier: TierConfig) -> Backend:
    """The backend a tier declares; weights named by catalog must already be fetched."""
    return tier.kind.build(tier)


def prepare_tiers(tiers: Iterable[TierConfig], *, fetch: bool = True,
                  log: Log = lambda line: None) -> None:
    """Fetch what the tiers' backends load locally (the embedded default's weights), unless
    `fetch` is False; raise WeightsError when something is missing or cannot be fetched."""
    for tier in tiers:
        tier.kind.prepare(tier, fetch=fetch, log=log)
