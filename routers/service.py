"""Live routing decisions for model `green`: encode the routing text, score it, plan the tiers.

A static encoder decides in a fraction of a millisecond, so it runs inline on the event loop.
A heavy one (sentence-transformers on torch, ~15 ms) runs on a worker thread, and requests that
arrive while it is busy are encoded together in one batch: under load the cost per decision
falls instead of queueing up behind the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from greenroute.routers import artifact
from greenroute.routers.artifact import ArtifactError, Router
from greenroute.routers.encoders import StaticEncoder
from greenroute.routers.features import FIRST_TOKEN, logprob_features
from greenroute.routers.policy import CANDIDATES

log = logging.getLogger("greenroute.router")
MAX_BATCH = 64
# Trained on the embedded tiers' outcomes (evals/outcomes/embedded.jsonl), shipped in the package.
DEFAULT_ARTIFACT = Path(__file__).resolve().parent / "default"


class RouterSettings(Protocol):
    """What `load_router` reads of the `[router]` settings (the gateway's RouterConfig); a
    Protocol, so that routing does not import the gateway that composes it."""

    @property
    def enabled(self) -> bool: ...

    @property
    def path(self) -> str | None: ...

    @property
    def delta(self) -> float | None: ...


class NamedTier(Protocol):
    @property
    def name(self) -> str: ...


class ServingConfig(Protocol):
    """The parts of the gateway's configuration that choose the router."""

    @property
    def router(self) -> RouterSettings: ...

    @property
    def tiers(self) -> Sequence[NamedTier]: ...


def load_router(config: ServingConfig) -> RouterService | None:
    """The router for model `green`: the configured artifact (an error if it cannot serve these
    tiers), else the shipped one when every tier it routes between is configured, else none."""
    settings = config.router
    if not settings.enabled:
        return None
    configured = {tier.name for tier in config.tiers}
    if settings.path:
        router = artifact.load(settings.path, delta=settings.delta)
        missing = [t for t in router.policy.tiers if t not in configured]
        if missing:
            raise ArtifactError(f"router {settings.path} routes between "
                                f"{', '.join(router.policy.tiers)}, but {', '.join(missing)} "
                                "is not a configured tier")
        return RouterService(router)
    if not (DEFAULT_ARTIFACT / "manifest.json").exists():
        return None
    tiers = artifact.read_manifest(DEFAULT_ARTIFACT)["tiers"]
    if not set(tiers) <= configured:
        log.info("model green: the shipped router routes between %s, which are not all "
                 "configured; set [router] path to a router trained for these tiers",
                 ", ".join(tiers))
        return None
    return RouterService(artifact.load(DEFAULT_ARTIFACT, delta=settings.delta))


@dataclass(frozen=True)
class Decision:
    candidate: int | None  # the calibrated threshold's index; None: everything to the largest
    scores: tuple[float, ...]  # router score per step (tier but the largest)
    plan: tuple[str, ...]  # tiers to try in order; all but the last are cascade stages


class RouterService:
    """Decisions from one loaded artifact."""

    def __init__(self, router: Router) -> None:
        self.router = router
        self.policy = router.policy
        self.inline = isinstance(router.encoder, StaticEncoder)
        # per stage, what its confidence model reads: fixed by the artifact, so read once here
        # (the largest tier is no stage: nothing judges its answer)
        self._signals: dict[str, tuple[str, ...]] = {self.policy.tiers[-1]: ()}
        self._first_token: dict[str, bool] = {self.policy.tiers[-1]: False}
        for tier, step in zip(self.policy.tiers[:-1], self.policy.steps, strict=True):
            model = step.confidence
            self._signals[tier] = model.signals if model is not None else ()
            self._first_token[tier] = model is not None and set(model.inputs) <= set(FIRST_TOKEN)
        self._queue: queue.Queue[tuple[str, asyncio.Future[np.ndarray],
                                       asyncio.AbstractEventLoop] | None] = queue.Queue()
        self._worker: threading.Thread | None = None
        if not self.inline:
            self._worker = threading.Thread(target=self._encode_batches, name="router-encoder",
                                            daemon=True)
            self._worker.start()

    @property
    def default_target(self) -> float:
        return self.router.default_target

    async def decide(self, text: str, target: float) -> Decision:
        if self.inline:
            x = self.router.encoder.encode([text])
        else:
            loop = asyncio.get_running_loop()
            future: asyncio.Future[np.ndarray] = loop.create_future()
            self._queue.put((text, future, loop))
            x = (await future)[None, :]
        return self.decision(x, target)

    def decision(self, x: np.ndarray, target: float) -> Decision:
        policy = self.policy
        p = policy.scores(x)
        candidate = policy.candidate_for(target)
        tried = policy.plans(p, candidate)[0]
        plan = tuple(tier for tier, used in zip(policy.tiers, tried, strict=True) if used)
        return Decision(candidate=candidate, scores=tuple(float(s) for s in p[0]), plan=plan)

    def signals(self, tier: str) -> tuple[str, ...]:
        """The extra signals (routers/features.py: SIGNALS) a stage's confidence model reads,
        which the gateway gathers before judging the stage's answer."""
        return self._signals[tier]

    def judges_first_token(self, tier: str) -> bool:
        """Whether a stage's confidence model reads only its first token (FIRST_TOKEN), so a
        streaming client can be answered live once that token is judged."""
        return self._first_token[tier]

    def keep(self, decision: Decision, tier: str, logprobs: list[dict[str, Any]] | None,
             signals: Mapping[str, float] | None = None) -> tuple[bool, float | None]:
        """Whether a cascade stage's answer is kept, and its confidence. An answer without
        logprobs, or without a signal its model reads, cannot be judged, so it is not kept."""
        j = self.policy.tiers.index(tier)
        step = self.policy.steps[j]
        if step.confidence is None:
            return True, None
        features = logprob_features(logprobs or [])
        if features is None or decision.candidate is None:
            return False, None
        try:
            row = step.confidence.row({**features, **(signals or {})})
        except KeyError:
            return False, None
        confidence = float(step.confidence.predict(row, np.array([decision.scores[j]]))[0])
        return confidence >= CANDIDATES[decision.candidate], confidence

    def close(self) -> None:
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout=5)

    def _encode_batches(self) -> None:
        while (item := self._queue.get()) is not None:
            batch = [item]
            while len(batch) < MAX_BATCH:
                try:
                    extra = self._queue.get_nowait()
                except queue.Empty:
                    break
                if extra is None:
                    self._queue.put(None)
                    break
                batch.append(extra)
            try:
                rows = self.router.encoder.encode([text for text, _, _ in batch])
            except Exception as exc:  # every waiting request gets the error
                for _, future, loop in batch:
                    loop.call_soon_threadsafe(_fail, future, exc)
                continue
            for (_, future, loop), row in zip(batch, rows, strict=True):
                loop.call_soon_threadsafe(_resolve, future, row)


def _resolve(future: asyncio.Future[np.ndarray], row: np.ndarray) -> None:
    if not future.done():
        future.set_result(row)


def _fail(future: asyncio.Future[np.ndarray], exc: Exception) -> None:
    if not future.done():
        future.set_exception(exc)
