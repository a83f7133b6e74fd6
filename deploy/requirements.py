"""Print the gateway image's requirements, one a line, from pyproject.toml.

The Dockerfile installs these, then the package itself with --no-deps, so the one list of
dependencies stays in pyproject.toml. llama-cpp-python (the embedded backend, compiled from
source: about 10 minutes on 2 cores) is left out unless --embedded 1: a gateway in front of vLLM
never loads it. The extras a server needs (Postgres for a shared ledger, NVML for GPU meters)
are always in.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from pathlib import Path

EMBEDDED_ONLY = "llama-cpp-python"
SERVER_EXTRAS = ("postgres", "gpu")


def requirements(pyproject: Path, embedded: bool) -> list[str]:
    project = tomllib.loads(pyproject.read_text())["project"]
    wanted = list(project["dependencies"])
    for extra in SERVER_EXTRAS:
        wanted += project["optional-dependencies"][extra]
    return [r for r in wanted if embedded or _name(r) != EMBEDDED_ONLY]


def _name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    return match.group(0).lower().replace("_", "-") if match else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedded", choices=["0", "1"], default="0",
                        help="1: include llama-cpp-python (the embedded CPU backend)")
    parser.add_argument("--pyproject", type=Path, default=Path("pyproject.toml"))
    args = parser.parse_args()
    print("\n".join(requirements(args.pyproject, args.embedded == "1")))


if __name__ == "__main__":
    main()
