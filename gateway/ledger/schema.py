"""The ledger's tables. Times are UTC; energies are joules; no prompt or answer text unless the
ledger is configured with `store_text = true`.

Changing a table here needs a migration in `store.MIGRATIONS`: existing ledgers are upgraded in
place, never dropped (tests/test_ledger.py checks a migrated database against these models).
"""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel


class RequestRow(SQLModel, table=True):
    """One request through the gateway, whatever became of it."""

    __tablename__ = "requests"

    id: str = Field(primary_key=True, max_length=64)  # the x-request-id the client saw
    created: datetime = Field(index=True)  # when the request arrived (UTC)
    key_id: str | None = Field(default=None, index=True, max_length=128)
    endpoint: str = Field(max_length=32)  # chat/completions, completions
    stream: bool = False
    requested_model: str | None = Field(default=None, max_length=256)
    route: str | None = Field(default=None, max_length=32)  # direct, routed, cascade
    quality_target: float | None = None  # model `green`: share of the largest tier's quality
    router_score: float | None = None  # green: P(the cheapest tier answers as well)
    answered_by: str | None = Field(default=None, index=True, max_length=128)  # tier
    upstream_model: str | None = Field(default=None, max_length=256)
    models_tried: int = 0
    status: int  # HTTP status; 499 when the client left first
    error: str | None = Field(default=None, max_length=64)  # OpenAI error code
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    latency_ms: float
    ttft_ms: float | None = None  # time to the first output (streams: first chunk)
    joules: float | None = None  # all models tried; None when no tier tried was metered
    joules_per_token: float | None = None  # per completion token of the answer
    energy_source: str | None = Field(default=None, max_length=64)  # estimate, nvml, ...
    grid_gco2_per_kwh: float | None = None  # the grid's intensity when the request arrived
    gco2: float | None = None  # joules at that intensity (None when joules is None)
    target_rule: str | None = Field(default=None, max_length=64)  # e.g. carbon:0.95->0.9@512g
    prompt_text: str | None = None  # only with store_text
    answer_text: str | None = None


class AttemptRow(SQLModel, table=True):
    """One model tried for a request (a cascade tries several), with its own tokens and
    energy."""

    __tablename__ = "request_models"

    request_id: str = Field(primary_key=True, foreign_key="requests.id", max_length=64)
    position: int = Field(primary_key=True)  # 0 first
    tier: str = Field(index=True, max_length=128)
    upstream_model: str | None = Field(default=None, max_length=256)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    joules: float | None = None
    energy_source: str | None = Field(default=None, max_length=32)
    device: str | None = Field(default=None, max_length=256)
    answered: bool = False


class DeviceEnergyRow(SQLModel, table=True):
    """A device's measured energy over one period: attributed to requests, idle, or used by
    the server's other clients (other gateway processes, by the server's token counters).

    measured_j = attributed_j + idle_j + other_j = counter_end_j - counter_start_j, to rounding.
    """

    __tablename__ = "device_energy"

    device: str = Field(primary_key=True, max_length=256)
    started: datetime = Field(primary_key=True, index=True)
    ended: datetime
    source: str = Field(max_length=32)
    counter_start_j: float
    counter_end_j: float
    measured_j: float
    attributed_j: float
    idle_j: float
    intervals: int
    other_j: float = Field(default=0.0, sa_column_kwargs={"server_default": "0"})
    # who read the counter: several processes that share a ledger each write their own rows
    # for a device they all see, and the report counts its energy once (gateway/device_totals)
    host: str = Field(default="", max_length=255, sa_column_kwargs={"server_default": ""})
    reader: str = Field(default="", max_length=255, sa_column_kwargs={"server_default": ""})


class ApiKeyRow(SQLModel, table=True):
    """A client key made by `greenroute keys create`: only the SHA-256 of its secret is kept
    (gateway/ledger/keys.py says why a fast hash suffices), looked up by it on each request."""

    __tablename__ = "api_keys"

    digest: str = Field(primary_key=True, max_length=64)  # hex SHA-256 of the secret
    id: str = Field(unique=True, max_length=128)  # what the ledger's key_id and reports show
    created: datetime
    revoked: datetime | None = None  # a revoked key stays, so its id is never reused
    admin: bool = False
    rpm: int | None = None  # requests per minute
    tpm: int | None = None  # tokens (prompt + completion) per minute
    joules_per_day: float | None = None  # energy per UTC day


class KeyUsageRow(SQLModel, table=True):
    """One key's use in one window (a UTC minute or day), summed over every replica: each adds
    what it admitted since its last sync (gateway/limits.py)."""

    __tablename__ = "key_usage"

    key_id: str = Field(primary_key=True, max_length=128)
    period: str = Field(primary_key=True, max_length=8)  # "minute" or "day"
    window: int = Field(primary_key=True)  # the window's start, Unix seconds (UTC)
    requests: int = 0
    tokens: int = 0
    joules: float = 0.0


TABLES = {"requests": RequestRow, "request_models": AttemptRow,
          "device_energy": DeviceEnergyRow, "api_keys": ApiKeyRow, "key_usage": KeyUsageRow}
