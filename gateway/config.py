"""Gateway configuration: one TOML file, or the embedded default when there is none.

The file declares the model tiers (ordered by their energy hint, cheapest first), the listen
address, request limits and API keys. Every field is validated on load, so a typo fails at
start-up with the field's name instead of at the first request. The schemas of a tier and of
its meter live with the backends and meters (`backends/registry.py`,
`backends/energy/registry.py`); this module composes them with the gateway's own sections.
"""

from __future__ import annotations

import hashlib
import os
import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from greenroute.backends.registry import TierConfig

CONFIG_ENV = "GREENROUTE_CONFIG"
RESERVED_MODEL = "green"


def is_reserved(model: str) -> bool:
    """`green` and `green-<target>` name the router, never a tier."""
    return model == RESERVED_MODEL or model.startswith(RESERVED_MODEL + "-")


class ConfigError(ValueError):
    """The configuration file is missing, unreadable or invalid."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class KeyConfig(_Strict):
    """A client API key; `id` is what reports show, never the secret."""

    id: str
    key: str | None = None
    key_env: str | None = None
    admin: bool = False  # may see /health's details and /metrics when admin keys exist
    rpm: int | None = Field(default=None, ge=1)  # requests per minute (gateway/limits.py)
    tpm: int | None = Field(default=None, ge=1)  # tokens per minute
    joules_per_day: float | None = Field(default=None, gt=0)  # energy per UTC day

    def secret(self) -> str:
        value = os.environ.get(self.key_env, "") if self.key_env else (self.key or "")
        if not value:
            where = f"the environment variable {self.key_env} is not set or empty" \
                if self.key_env else "give key or key_env"
            raise ConfigError(f"key {self.id!r} has no secret: {where}")
        return value


def key_digests(keys: tuple[KeyConfig, ...]) -> dict[bytes, str]:
    """SHA-256 of each key's secret -> the key's id; read when the gateway is built, so an
    unset `key_env` or one secret under two ids stops the start with a ConfigError.

    The gateway looks up the digest of the key a request presents. The lookup's timing depends
    on that digest, which an attacker cannot steer towards a stored one byte by byte (finding
    an input with a chosen digest prefix is SHA-256's preimage problem), so the time a lookup
    takes tells nothing about any secret: constant-time enough, without a comparison per key.
    Hashing also means no secret is kept in the gateway's memory as a dict key.
    """
    digests: dict[bytes, str] = {}
    for key in keys:
        digest = hashlib.sha256(key.secret().encode()).digest()
        if digest in digests:
            raise ConfigError(f"keys {digests[digest]!r} and {key.id!r} have the same secret: "
                              "give each key its own")
        digests[digest] = key.id
    return digests


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    max_body_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # On SIGTERM, how long requests in flight may take; then each ends with an error (503, or
    # a stream's error event) and its row says `server_shutting_down` (gateway/draining.py).
    shutdown_grace_s: float = Field(default=10.0, ge=0)
    log_format: Literal["text", "json"] = "text"  # json: one object a line, with request_id
    # Serve a non-loopback host with no key at all (config or database): refused without it.
    no_auth: bool = False
    # Net allocations between collections of the garbage collector's youngest generation,
    # once serving (gateway/collector.py; CPython's default is 700).
    gc_threshold: int = Field(default=10_000, ge=100)


class EnergyConfig(_Strict):
    """Sampling and reporting of energy (docs/energy.md)."""

    interval_ms: int = Field(default=100, ge=10)  # how often each meter is read
    period_s: float = Field(default=60.0, gt=0)  # one device_energy ledger row per period
    # gCO2 per kWh for reports: Ember's world average (Global Electricity Review 2023).
    grid_gco2_per_kwh: float = Field(default=436.0, ge=0)
    # A CSV or JSON file of (time, gCO2/kWh) readings (gateway/carbon.py): each ledger row
    # stores the intensity at its time; the constant above is used when this is not given.
    grid_intensity: str | None = None


class LedgerConfig(_Strict):
    """Where request rows go (docs/energy.md): SQLite by default, any SQLAlchemy URL."""

    enabled: bool = True
    path: str | None = None  # SQLite file; default $GREENROUTE_DATA_DIR/ledger.db
    url: str | None = None  # any SQLAlchemy URL (postgresql+psycopg://...); overrides path
    store_text: bool = False  # keep prompts and answers in rows (off: privacy by default)
    batch_size: int = Field(default=500, ge=1)
    flush_interval_s: float = Field(default=0.5, gt=0)
    max_buffer: int = Field(default=100_000, ge=1)  # rows held while the database is away
    retry_s: float = Field(default=1.0, gt=0)  # first retry delay, doubling up to 30 s
    spool: bool = True  # each request's rows to a local file before its answer (kill -9 safe)

    @model_validator(mode="after")
    def _check_target(self) -> LedgerConfig:
        if self.path and self.url:
            raise ValueError("ledger: give path or url, not both")
        return self


class HealthConfig(_Strict):
    """Background health checks and each tier's circuit breaker (gateway/health.py)."""

    interval_s: float = Field(default=10.0, ge=0)  # between two rounds of checks; 0: none
    timeout_s: float = Field(default=5.0, gt=0)  # a check slower than this has failed
    max_concurrent: int = Field(default=8, ge=1)  # checks running at once
    failure_threshold: int = Field(default=3, ge=1)  # consecutive 5xx that open the breaker
    cooldown_s: float = Field(default=30.0, gt=0)  # open this long, then one trial request
    retries: int = Field(default=1, ge=0, le=3)  # per tier, on a connection error


class LimitsConfig(_Strict):
    """Per-key rate limits and energy budgets (gateway/limits.py): how often each replica
    adds its counts to the ledger database and reads the fleet's back. A fleet of R replicas
    can overshoot a limit by what R - 1 of them admit in two intervals."""

    sync_interval_s: float = Field(default=0.5, gt=0)


class CarbonAwareConfig(_Strict):
    """`[router.carbon_aware]`: while the grid is above `above_gco2_per_kwh`, requests that
    name no target get `default_target` instead (gateway/carbon.py); off unless configured."""

    above_gco2_per_kwh: float = Field(ge=0)
    default_target: float = Field(gt=0, le=1)


class RouterConfig(_Strict):
    """Model `green` (docs/routing.md): which router artifact decides, and how."""

    enabled: bool = True
    # A `greenroute train` artifact. Default: the one shipped with GreenRoute, trained on the
    # embedded tiers, used when every tier it names is configured.
    path: str | None = None
    # Quality target when a request names none (share of the largest tier's quality);
    # default: the artifact's own (0.95 for the shipped one).
    default_target: float | None = Field(default=None, gt=0, le=1)
    # The guarantee's risk: each target holds with probability 1 - delta. Picks the thresholds
    # the artifact calibrated at that delta (`greenroute train --delta`); default: its own.
    delta: float | None = Field(default=None, gt=0, lt=1)
    # Longest answer a cascade stage may give before it is judged; a longer one escalates.
    cascade_max_tokens: int = Field(default=512, ge=1)
    # Relax the default target while the grid is dirty; named in headers and ledger rows.
    carbon_aware: CarbonAwareConfig | None = None


class GatewayConfig(_Strict):
    server: ServerConfig = ServerConfig()
    tiers: tuple[TierConfig, ...]
    keys: tuple[KeyConfig, ...] = ()
    energy: EnergyConfig = EnergyConfig()
    ledger: LedgerConfig = LedgerConfig()
    router: RouterConfig = RouterConfig()
    health: HealthConfig = HealthConfig()
    limits: LimitsConfig = LimitsConfig()

    @model_validator(mode="after")
    def _check_names(self) -> GatewayConfig:
        if not self.tiers:
            raise ValueError("at least one tier is required")
        seen: set[str] = set()
        for tier in self.tiers:
            for name in (tier.name, *tier.aliases):
                if is_reserved(name):
                    raise ValueError(f"model name {name!r} is reserved for routing")
                if name in seen:
                    raise ValueError(f"model name {name!r} is declared twice")
                seen.add(name)
        return self

    @model_validator(mode="after")
    def _check_keys(self) -> GatewayConfig:
        """Key ids are unique, and so are the secrets written in the file (secrets from the
        environment are compared when the gateway starts: `key_digests`)."""
        ids: set[str] = set()
        secrets: dict[str, str] = {}
        for key in self.keys:
            if key.id in ids:
                raise ValueError(f"key id {key.id!r} is declared twice")
            ids.add(key.id)
            if key.key in secrets:
                raise ValueError(f"keys {secrets[key.key]!r} and {key.id!r} have the same "
                                 "secret: give each key its own")
            if key.key:
                secrets[key.key] = key.id
        return self

    @model_validator(mode="after")
    def _check_fallbacks(self) -> GatewayConfig:
        names = {tier.name for tier in self.tiers}
        for tier in self.tiers:
            for fallback in tier.fallbacks:
                if fallback not in names or fallback == tier.name:
                    raise ValueError(f"tier {tier.name!r}: fallback {fallback!r} is not "
                                     "another tier's name")
        return self

    def tiers_by_energy(self) -> list[TierConfig]:
        """Tiers from the least to the most energy per token."""
        return sorted(self.tiers, key=lambda t: t.energy_hint)


def default_config() -> GatewayConfig:
    """The embedded default: two Qwen2.5-Coder tiers on llama.cpp, no key, no GPU.

    The energy hints are the inverse of generation speed measured on 2 cores by bench/models.py
    (35.2 vs 15.1 tok/s): on the same CPU the power draw is about the same, so energy per token
    scales with time per token.
    """
    return GatewayConfig(tiers=(
        TierConfig(name="small", backend="llamacpp", weights="small",
                   model="qwen2.5-coder-0.5b-instruct", energy_hint=1.0),
        TierConfig(name="large", backend="llamacpp", weights="large",
                   model="qwen2.5-coder-1.5b-instruct", energy_hint=2.3),
    ))


def load_config(path: str | Path | None = None) -> GatewayConfig:
    """Load the file at `path`, else at $GREENROUTE_CONFIG, else return the embedded default."""
    path = path or os.environ.get(CONFIG_ENV)
    if not path:
        return default_config()
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    try:
        return GatewayConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path}: {describe(exc)}") from None


def describe(exc: ValidationError) -> str:
    """Each error's location and message, never its input: pydantic's own text repeats the
    input value, which can be a secret (a tier's `api_key`, a key's `key`)."""
    lines = [f"{len(exc.errors())} invalid field(s)"]
    for error in exc.errors(include_url=False, include_input=False, include_context=False):
        where = ".".join(str(part) for part in error["loc"]) or "(top level)"
        lines.append(f"  {where}: {error['msg']}")
    return "\n".join(lines)
