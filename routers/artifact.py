"""The router artifact: a directory holding everything `green` needs to route, versioned.

    manifest.json         format and version, tiers, encoder (kind, name, fingerprint, dims),
                          router kind, label scheme, thresholds per quality target (those of
                          the served delta, and per delta every calibrated one), the training
                          data's sha256 and size, validation metrics
    encoder/              a static encoder's files, when the artifact carries its own
    step-<tier>.npz       per tier but the largest: router, confidence model, keep table

Loading checks the format version and that the encoder found has the fingerprint the routers
were trained with: a router scoring embeddings from another encoder would route at random,
silently, so that is refused with an error that says which encoder was expected.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from greenroute.routers.confidence import ConfidenceModel
from greenroute.routers.encoders import Encoder, EncoderError, StaticEncoder, load_encoder
from greenroute.routers.models import from_state
from greenroute.routers.policy import CANDIDATES, RoutingPolicy, Step
from greenroute.routers.priority import SavingPriority

FORMAT = "greenroute-router"
VERSION = 1


class ArtifactError(ValueError):
    """An artifact that cannot be used: missing, another format or version, wrong encoder."""


@dataclass
class Router:
    """A loaded artifact: the encoder, the policy and the manifest they came with."""

    encoder: Encoder
    policy: RoutingPolicy
    manifest: dict[str, Any]
    path: Path

    @property
    def default_target(self) -> float:
        return float(self.manifest.get("default_target", 0.95))


def save(path: str | Path, policy: RoutingPolicy, encoder: Encoder,
         manifest: dict[str, Any]) -> Path:
    """Write an artifact directory (replacing one that is there)."""
    path = Path(path)
    staging = path.with_name(path.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    encoder_spec: dict[str, Any] = {"kind": encoder.kind, "name": encoder.name,
                                    "fingerprint": encoder.fingerprint, "dim": encoder.dim}
    if isinstance(encoder, StaticEncoder):
        shutil.copytree(encoder.directory, staging / "encoder")
        encoder_spec["path"] = "encoder"
    steps = []
    for step in policy.steps:
        arrays = {f"router.{k}": v for k, v in step.router.state().items()}
        if step.confidence is not None:
            arrays |= {f"confidence.{k}": v for k, v in step.confidence.state().items()}
        if step.keep_edges is not None and step.keep_rates is not None:
            arrays |= {"keep.edges": step.keep_edges, "keep.rates": step.keep_rates}
        if step.priority is not None:
            arrays |= {f"priority.{k}": v for k, v in step.priority.state().items()}
        file = f"step-{step.tier}.npz"
        np.savez_compressed(staging / file, allow_pickle=False, **arrays)
        steps.append({"tier": step.tier, "file": file, "cascade": step.confidence is not None,
                      "signals": list(step.confidence.signals) if step.confidence else [],
                      "rank": "saving" if step.priority is not None else "score"})
    full = {
        "format": FORMAT, "version": VERSION, **manifest, "tiers": policy.tiers,
        "encoder": encoder_spec, "steps": steps, "energy_per_prompt": policy.energy.tolist(),
        **({"stop_energy_per_prompt": policy.stop_energy.tolist()}
           if policy.stop_energy is not None else {}),
        "thresholds": _thresholds_json(policy.thresholds),
        "thresholds_by_delta": {f"{d:g}": _thresholds_json(by_target)
                                for d, by_target in sorted(policy.by_delta.items())},
    }
    (staging / "manifest.json").write_text(json.dumps(full, indent=2) + "\n")
    shutil.rmtree(path, ignore_errors=True)
    staging.rename(path)
    return path


def read_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        manifest: dict[str, Any] = json.loads((path / "manifest.json").read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: no router artifact here (manifest.json missing)") from None
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}/manifest.json is not JSON: {exc}") from None
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a GreenRoute router artifact "
                            f"(format {manifest.get('format')!r})")
    if manifest.get("version") != VERSION:
        raise ArtifactError(f"{path}: artifact version {manifest.get('version')!r}; this "
                            f"GreenRoute reads version {VERSION}. Retrain it with "
                            "`greenroute train`.")
    return manifest


def _thresholds_json(thresholds: dict[float, int | None]) -> dict[str, Any]:
    return {f"{t:.2f}": (None if c is None else {"candidate": c,
                                                 "threshold": float(CANDIDATES[c])})
            for t, c in sorted(thresholds.items())}


def _thresholds(stored: dict[str, Any]) -> dict[float, int | None]:
    """Target -> candidate index, found by the threshold's value, so that an artifact written
    with a coarser grid of candidates (version 1 before cross-fitting: steps of 0.005) loads."""
    return {float(t): (None if v is None else _candidate(float(v["threshold"])))
            for t, v in stored.items()}


def _candidate(threshold: float) -> int:
    found = np.flatnonzero(np.isclose(CANDIDATES, threshold, rtol=0, atol=1e-9))
    if not found.size:
        raise ArtifactError(f"threshold {threshold} is not on this GreenRoute's grid of "
                            "candidates; retrain the router with `greenroute train`")
    return int(found[0])


def load(path: str | Path, encoder: Encoder | None = None,
         delta: float | None = None) -> Router:
    """Load an artifact; `encoder` overrides the one it names, and must be the same one;
    `delta` picks the thresholds calibrated at that risk (default: the artifact's own)."""
    path = Path(path)
    manifest = read_manifest(path)
    spec = manifest["encoder"]
    if encoder is None:
        try:
            encoder = load_encoder(spec, base=path)
        except EncoderError as exc:
            raise ArtifactError(f"{path}: cannot load its encoder {spec.get('name')!r}: {exc}") \
                from None
    if encoder.fingerprint != spec["fingerprint"]:
        raise ArtifactError(
            f"{path} was trained with encoder {spec.get('name')!r} (fingerprint "
            f"{spec['fingerprint']}), but the encoder given is {encoder.name!r} (fingerprint "
            f"{encoder.fingerprint}): its routers would score these embeddings at random. "
            "Use the encoder it was trained with, or retrain.")
    steps = []
    for entry in manifest["steps"]:
        with np.load(path / entry["file"]) as stored:
            arrays = dict(stored)
        step = Step(tier=entry["tier"],
                    router=from_state(manifest["kind"], _prefixed(arrays, "router")))
        if entry.get("cascade"):
            step.confidence = ConfidenceModel.from_state(_prefixed(arrays, "confidence"))
            step.keep_edges, step.keep_rates = arrays["keep.edges"], arrays["keep.rates"]
            if len(step.keep_rates) != len(CANDIDATES):
                raise ArtifactError(f"{path}: its cascade was tabulated on another grid of "
                                    "thresholds; retrain the router with `greenroute train`")
        if entry.get("rank") == "saving":
            step.priority = SavingPriority.from_state(_prefixed(arrays, "priority"))
        steps.append(step)
    by_delta = {float(d): _thresholds(t)
                for d, t in manifest.get("thresholds_by_delta", {}).items()}
    served = manifest.get("delta")
    if served is not None:
        by_delta.setdefault(float(served), _thresholds(manifest["thresholds"]))
    policy = RoutingPolicy(tiers=list(manifest["tiers"]), steps=steps,
                           energy=np.asarray(manifest["energy_per_prompt"], dtype=float),
                           thresholds=_thresholds(manifest["thresholds"]), by_delta=by_delta,
                           stop_energy=np.asarray(manifest["stop_energy_per_prompt"], dtype=float)
                           if "stop_energy_per_prompt" in manifest else None)
    if delta is not None:
        try:
            policy.use_delta(delta)
        except KeyError:
            known = ", ".join(f"{d:g}" for d in sorted(by_delta)) or "none recorded"
            raise ArtifactError(f"{path} has no thresholds calibrated at delta {delta:g} "
                                f"(calibrated: {known}); retrain with `greenroute train "
                                f"--delta {delta:g}`") from None
    return Router(encoder=encoder, policy=policy, manifest=manifest, path=path)


def _prefixed(arrays: dict[str, np.ndarray], prefix: str) -> dict[str, np.ndarray]:
    """The arrays saved under `prefix.`, without it."""
    return {key.split(".", 1)[1]: value for key, value in arrays.items()
            if key.startswith(prefix + ".")}
