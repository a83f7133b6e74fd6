"""Probe the gateway's /health for Docker's HEALTHCHECK and Kubernetes' exec probes.

`/health` answers 200 when every tier is up and 503 when one is down. Readiness wants the 200
(send no traffic to a gateway whose tiers are down); liveness must not restart a gateway because
a vLLM server is still loading its weights, so with --live any HTTP answer passes: the process is
up and serving. Exit status 0 means healthy, 1 not. Standard library only: the slim image has no
curl.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request

DEFAULT_URL = "http://127.0.0.1:8000/health"


def probe(url: str, live: bool, timeout_s: float) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return True, f"{url}: {response.status}"
    except urllib.error.HTTPError as exc:  # the gateway answered, with an error status
        return live, f"{url}: {exc.code}"
    except (OSError, ValueError) as exc:  # refused, timed out, reset, bad URL
        return False, f"{url}: {exc}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("GREENROUTE_HEALTH_URL", DEFAULT_URL))
    parser.add_argument("--live", action="store_true",
                        help="liveness: any HTTP answer passes (a 503 for a tier that is down too)")
    parser.add_argument("--timeout", type=float, default=5.0, help="seconds (default 5)")
    args = parser.parse_args(argv)
    ok, line = probe(args.url, args.live, args.timeout)
    print(line)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
