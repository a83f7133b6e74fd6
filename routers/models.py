"""Router models: from a prompt's embedding, the probability that a smaller tier answers as well
as a larger one.

Five kinds behind one interface, all plain numpy so that serving needs neither torch nor
scikit-learn:

  knn       similarity-weighted vote of the nearest training prompts
  logistic  L2-regularised logistic regression (Newton's method: exact, a few steps)
  mlp       one hidden layer, trained with Adam and early stopping
  mf        matrix factorisation in RouteLLM's style: a model vector and a projected prompt
            vector score each model's chance of being right; the pair's label follows from both
  ensemble  the mean of two kNN votes (two labels) and logistic

Labels follow Hybrid LLM's idea (Ding et al., 2024): what matters is the quality gap between
the tiers, not whether the small one was right. The target is the smaller tier's win rate
against the larger one, ties counting half: y = (1 + clip(q_small - q_large + tolerance)) / 2.
With right/wrong outcomes a prompt only the large tier gets right is 0, one both get right (or
both wrong) is 0.5, one only the small tier gets right is 1; graded (0-1) qualities fall in
between. `tolerance` is Hybrid LLM's relaxation: how much quality loss still counts as "as
well". A model's output is then the probability that the smaller tier answers as well, and
ranking by it is ranking by the expected quality gained by sending a prompt to the larger
tier, which is what a quality-per-large-call curve rewards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Literal, Protocol, Self

import numpy as np

Scheme = Literal["gap", "only-large"]


@dataclass(frozen=True)
class Target:
    """What a router learns from: both tiers' qualities on the training prompts.

    `scheme` "gap" (the default) is the win rate above; "only-large" is the plain binary label
    of most earlier routers (0 where only the larger tier is right, else 1), kept to measure
    baselines with.
    """

    quality_small: np.ndarray
    quality_large: np.ndarray
    tolerance: float = 0.0
    scheme: Scheme = "gap"

    def labels(self) -> np.ndarray:
        gap = np.asarray(self.quality_small, dtype=float) - self.quality_large + self.tolerance
        if self.scheme == "only-large":
            return np.asarray(gap >= -1e-9, dtype=float)
        return np.asarray((1.0 + np.clip(gap, -1, 1)) / 2.0, dtype=float)


class RouterModel(Protocol):
    """What every router kind implements; `ROUTERS` maps each kind's name to its class."""

    kind: ClassVar[str]

    def fit(self, x: np.ndarray, target: Target) -> None: ...

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Per row of x, the probability that the smaller tier answers as well."""
        ...

    def state(self) -> dict[str, np.ndarray]:
        """Arrays that `from_state` rebuilds the fitted router from (saved in the artifact)."""
        ...

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> Self: ...


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.asarray(1.0 / (1.0 + np.exp(-np.clip(z, -35, 35))), dtype=float)


class KNNRouter:
    """The weighted share of the k most similar training prompts on which the smaller tier
    did as well; weights are cosine similarity to a power (embeddings are unit vectors)."""

    kind: ClassVar[str] = "knn"

    def __init__(self, k: int = 100, power: float = 1.0) -> None:
        self.k = k
        self.power = power
        self.x = np.zeros((0, 0), dtype=np.float32)
        self.y = np.zeros(0)

    def fit(self, x: np.ndarray, target: Target) -> None:
        self.x = np.asarray(x, dtype=np.float32)
        self.y = target.labels()

    def predict(self, x: np.ndarray) -> np.ndarray:
        k = min(self.k, len(self.y))
        similarity = np.asarray(x, dtype=np.float32) @ self.x.T
        nearest = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        weights = np.maximum(np.take_along_axis(similarity, nearest, axis=1), 0.0) ** self.power
        weights += 1e-6
        return np.asarray((weights * self.y[nearest]).sum(axis=1) / weights.sum(axis=1),
                          dtype=float)

    def state(self) -> dict[str, np.ndarray]:
        return {"x": self.x, "y": self.y.astype(np.float32),
                "k": np.array(self.k), "power": np.array(self.power)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> KNNRouter:
        router = cls(int(state["k"]), float(state["power"]))
        router.x = state["x"].astype(np.float32)
        router.y = state["y"].astype(float)
        return router


class LogisticRouter:
    """L2-regularised logistic regression on the embedding, fitted by Newton's method."""

    kind: ClassVar[str] = "logistic"

    def __init__(self, l2: float = 10.0, steps: int = 25) -> None:
        self.l2 = l2
        self.steps = steps
        self.w = np.zeros(0)
        self.b = 0.0

    def fit(self, x: np.ndarray, target: Target) -> None:
        self.w, self.b = fit_logistic(np.asarray(x, dtype=float), target.labels(), self.l2,
                                      self.steps)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return _sigmoid(np.asarray(x, dtype=float) @ self.w + self.b)

    def state(self) -> dict[str, np.ndarray]:
        return {"w": self.w, "b": np.array(self.b), "l2": np.array(self.l2)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> LogisticRouter:
        router = cls(float(state["l2"]))
        router.w, router.b = state["w"], float(state["b"])
        return router


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float, steps: int = 25,
                 sample_weight: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Weights and intercept minimising log loss + l2/2 |w|^2 (the intercept is not
    penalised). Newton's method: exact for a few hundred features, and deterministic."""
    n, d = x.shape
    design = np.hstack([x, np.ones((n, 1))])
    penalty = np.full(d + 1, l2)
    penalty[-1] = 0.0
    weights = np.ones(n) if sample_weight is None else sample_weight
    theta = np.zeros(d + 1)
    for _ in range(steps):
        p = _sigmoid(design @ theta)
        gradient = design.T @ (weights * (p - y)) + penalty * theta
        curvature = weights * p * (1 - p) + 1e-9
        hessian = (design * curvature[:, None]).T @ design + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hessian, gradient)
        theta -= step
        if np.abs(step).max() < 1e-7:
            break
    return theta[:-1], float(theta[-1])


class _Adam:
    """Adam over a list of arrays, updated in place."""

    def __init__(self, params: list[np.ndarray], rate: float) -> None:
        self.params, self.rate, self.t = params, rate, 0
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]

    def step(self, grads: list[np.ndarray]) -> None:
        self.t += 1
        for p, g, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            m *= 0.9
            m += 0.1 * g
            v *= 0.999
            v += 0.001 * g * g
            p -= self.rate * (m / (1 - 0.9 ** self.t)) / (np.sqrt(v / (1 - 0.999 ** self.t)) + 1e-8)


def _descend(params: list[np.ndarray], gradients: Callable[[], list[np.ndarray]],
             valid_loss: Callable[[], float], epochs: int, rate: float) -> list[np.ndarray]:
    """Full-batch Adam on `params` (updated in place); returns a copy of the parameters with
    the lowest held-out loss seen (early stopping without a patience knob)."""
    adam = _Adam(params, rate)
    best, best_loss = [p.copy() for p in params], np.inf
    for _ in range(epochs):
        adam.step(gradients())
        loss = valid_loss()
        if loss < best_loss - 1e-6:
            best, best_loss = [p.copy() for p in params], loss
    return best


def _split(n: int, seed: int, share: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng(seed).permutation(n)
    cut = max(1, int(n * share))
    return order[cut:], order[:cut]


class MLPRouter:
    """One hidden ReLU layer and a sigmoid output, trained full-batch with Adam on log loss;
    stops at the epoch with the best loss on a held-out tenth of the training prompts."""

    kind: ClassVar[str] = "mlp"

    def __init__(self, hidden: int = 64, l2: float = 1e-3, epochs: int = 400,
                 rate: float = 3e-3, seed: int = 0) -> None:
        self.hidden, self.l2, self.epochs, self.rate, self.seed = hidden, l2, epochs, rate, seed
        self.params: list[np.ndarray] = []

    def fit(self, x: np.ndarray, target: Target) -> None:
        x = np.asarray(x, dtype=float)
        y = target.labels()
        rng = np.random.default_rng(self.seed)
        d = x.shape[1]
        w1 = rng.normal(0, np.sqrt(2 / d), (d, self.hidden))
        b1 = np.zeros(self.hidden)
        w2 = rng.normal(0, np.sqrt(1 / self.hidden), self.hidden)
        b2 = np.array([np.log((y.mean() + 1e-3) / (1 - y.mean() + 1e-3))])
        params = [w1, b1, w2, b2]
        train, valid = _split(len(y), self.seed)
        xt, yt = x[train], y[train]

        def gradients() -> list[np.ndarray]:
            h = np.maximum(xt @ w1 + b1, 0.0)
            g = (_sigmoid(h @ w2 + b2[0]) - yt) / len(yt)
            gh = np.outer(g, w2) * (h > 0)
            return [xt.T @ gh + self.l2 * w1, gh.sum(0), h.T @ g + self.l2 * w2,
                    np.array([g.sum()])]

        self.params = _descend(params, gradients, lambda: _log_loss(
            self._forward(params, x[valid]), y[valid]), self.epochs, self.rate)

    @staticmethod
    def _forward(params: list[np.ndarray], x: np.ndarray) -> np.ndarray:
        w1, b1, w2, b2 = params
        return _sigmoid(np.maximum(x @ w1 + b1, 0.0) @ w2 + b2[0])

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self._forward(self.params, np.asarray(x, dtype=float))

    def state(self) -> dict[str, np.ndarray]:
        return {f"p{i}": p for i, p in enumerate(self.params)} | {"hidden": np.array(self.hidden)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> MLPRouter:
        router = cls(int(state["hidden"]))
        router.params = [state[f"p{i}"] for i in range(4)]
        return router


class MFRouter:
    """RouteLLM's matrix factorisation, over right/wrong outcomes: model m is right on prompt
    x with probability sigmoid(w . (v_m * P x) + b_m). Both tiers' outcomes train it (graded
    qualities as soft targets), and the label follows from them:
    p = (1 + P(small right) - P(large right) + tolerance) / 2, or for the "only-large"
    scheme 1 - P(large right) x (1 - P(small right))."""

    kind: ClassVar[str] = "mf"

    def __init__(self, dim: int = 64, l2: float = 1e-3, epochs: int = 300, rate: float = 1e-2,
                 seed: int = 0) -> None:
        self.dim, self.l2, self.epochs, self.rate, self.seed = dim, l2, epochs, rate, seed
        self.tolerance = 0.0
        self.scheme: Scheme = "gap"
        self.params: list[np.ndarray] = []

    def fit(self, x: np.ndarray, target: Target) -> None:
        x = np.asarray(x, dtype=float)
        self.tolerance, self.scheme = target.tolerance, target.scheme
        y = np.stack([target.quality_small, target.quality_large], axis=1)
        rng = np.random.default_rng(self.seed)
        n, d = x.shape
        projection = rng.normal(0, 1 / np.sqrt(d), (d, self.dim))
        models = 1.0 + 0.1 * rng.normal(0, 1, (2, self.dim))
        w = rng.normal(0, 0.1, self.dim)
        b = np.log((y.mean(0) + 1e-3) / (1 - y.mean(0) + 1e-3))
        params = [projection, models, w, b]
        train, valid = _split(n, self.seed)
        xt, yt = x[train], y[train]

        def gradients() -> list[np.ndarray]:
            h = xt @ projection
            hv = h[:, None, :] * models[None]
            g = (_sigmoid(hv @ w + b) - yt) / len(yt)
            return [xt.T @ np.einsum("nk,kd,d->nd", g, models, w) + self.l2 * projection,
                    np.einsum("nk,nd,d->kd", g, h, w) + self.l2 * models,
                    np.einsum("nk,nkd->d", g, hv) + self.l2 * w, g.sum(0)]

        self.params = _descend(params, gradients, lambda: _log_loss(
            self._right(params, x[valid]), y[valid]), self.epochs, self.rate)

    @staticmethod
    def _right(params: list[np.ndarray], x: np.ndarray) -> np.ndarray:
        projection, models, w, b = params
        return _sigmoid(((x @ projection)[:, None, :] * models[None]) @ w + b)

    def predict(self, x: np.ndarray) -> np.ndarray:
        right = self._right(self.params, np.asarray(x, dtype=float))
        if self.scheme == "only-large":
            return 1.0 - right[:, 1] * (1.0 - right[:, 0])
        return np.asarray(np.clip((1.0 + right[:, 0] - right[:, 1] + self.tolerance) / 2.0,
                                  0.0, 1.0), dtype=float)

    def state(self) -> dict[str, np.ndarray]:
        return {f"p{i}": p for i, p in enumerate(self.params)} | {
            "dim": np.array(self.dim), "tolerance": np.array(self.tolerance),
            "scheme": np.array(self.scheme)}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> MFRouter:
        router = cls(int(state["dim"]))
        router.tolerance = float(state["tolerance"])
        router.scheme = str(state["scheme"])  # type: ignore[assignment]
        router.params = [state[f"p{i}"] for i in range(4)]
        return router


class EnsembleRouter:
    """The mean of three routers that err differently: a kNN vote on the gap label (local),
    a kNN vote on the "only the larger tier is right" label (the same neighbours, asked only
    whether the larger tier is needed), and a logistic model on the gap label (global, smooth).
    Its parts keep these labels whatever `Target.scheme` says. The mix was chosen by 5-fold
    cross-validation on RouteLLM's MMLU outcomes (docs/routing.md), where it beat each part."""

    kind: ClassVar[str] = "ensemble"
    PARTS: ClassVar[tuple[tuple[Callable[[], RouterModel], Scheme], ...]] = (
        (lambda: KNNRouter(k=100), "gap"), (lambda: KNNRouter(k=50), "only-large"),
        (LogisticRouter, "gap"))

    def __init__(self) -> None:
        self.parts: list[RouterModel] = [build() for build, _ in self.PARTS]

    def fit(self, x: np.ndarray, target: Target) -> None:
        for part, (_, scheme) in zip(self.parts, self.PARTS, strict=True):
            part.fit(x, Target(target.quality_small, target.quality_large, target.tolerance,
                               scheme))

    def predict(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(np.mean([part.predict(x) for part in self.parts], axis=0), dtype=float)

    def state(self) -> dict[str, np.ndarray]:
        return {f"{i}.{key}": value for i, part in enumerate(self.parts)
                for key, value in part.state().items()}

    @classmethod
    def from_state(cls, state: dict[str, np.ndarray]) -> EnsembleRouter:
        router = cls()
        router.parts = [type(part).from_state(
            {k.split(".", 1)[1]: v for k, v in state.items() if k.startswith(f"{i}.")})
            for i, part in enumerate(router.parts)]
        return router


def _log_loss(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


# Every router kind, by name: a new kind is one class above and one entry here.
ROUTERS: dict[str, type[RouterModel]] = {
    router.kind: router
    for router in (KNNRouter, LogisticRouter, MLPRouter, MFRouter, EnsembleRouter)}
KINDS = tuple(ROUTERS)


def router_class(kind: str) -> type[RouterModel]:
    try:
        return ROUTERS[kind]
    except KeyError:
        raise ValueError(f"unknown router kind {kind!r}; known: {', '.join(KINDS)}") from None


def make(kind: str) -> RouterModel:
    """A new, unfitted router of this kind."""
    return router_class(kind)()


def from_state(kind: str, state: dict[str, np.ndarray]) -> RouterModel:
    """A fitted router of this kind, rebuilt from its saved `state()`."""
    return router_class(kind).from_state(state)
