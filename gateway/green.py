"""Model `green`: the router plans which tiers to try, and the cascade runs the plan live.

Every tier of the plan but the last is a cascade stage: asked for a capped, non-streamed answer
with logprobs (gateway/cascade.py), plus the extra signals its confidence model reads (k samples
for agreement, a self-check call), kept if the router trusts it, else the next tier is tried.
The last tier answers as the client asked. A stage whose confidence model reads only the first
token (`train --judge first-token`) serves a streaming client differently: it streams, is
judged on its first token, and once kept goes on streaming to the client live; not kept, it
stops there and the next tier answers. A tier that fails (5xx), or refuses the request
(4xx: it asks for what this tier cannot do, such as n > 1, tools, image parts or a prompt longer
than its context), hands it on to the next, or, past the plan's end, to the next larger tier.
When none is left, a 4xx goes back as the last tier gave it (every tier refused: the request
itself is at fault), and after a 5xx the best stage answer so far goes back marked as degraded.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from typing import Any

from greenroute.backends.base import Backend, BackendError, Chunk, ChunkStream, Completion, Endpoint
from greenroute.gateway import cascade
from greenroute.gateway import headers as h
from greenroute.gateway.carbon import CarbonAwareTarget
from greenroute.gateway.exchange import Answer, Exchange, Streamed, Whole
from greenroute.gateway.health import HealthMonitor
from greenroute.gateway.plan import RoutedPlan, parse_target
from greenroute.routers import agreement, selfcheck
from greenroute.routers.features import AGREEMENT, SELF_CHECK
from greenroute.routers.routing_text import routing_text
from greenroute.routers.service import Decision, RouterService

log = logging.getLogger("greenroute.gateway")


class GreenRoute:
    """Answers `green` requests over the tiers' backends, with one loaded router."""

    def __init__(self, router: RouterService, backends: Mapping[str, Backend], *,
                 default_target: float | None, cascade_max_tokens: int,
                 health: HealthMonitor, carbon: CarbonAwareTarget | None = None) -> None:
        self.router = router
        self.carbon = carbon  # relaxes the default target while the grid is dirty
        self.backends = backends
        self.health = health  # a tier whose breaker is open fails at once (BreakerOpen)
        self.configured_target = default_target
        self.cap = cascade_max_tokens

    @property
    def default_target(self) -> float:
        """The configured default quality target, else the router artifact's."""
        return self.configured_target or self.router.default_target

    def target(self, plan: RoutedPlan, header: str | None) -> float:
        """The request's quality target: its header, else its model name (green-0.9), else
        the default."""
        if header is not None:
            return parse_target(header, h.TARGET)
        return plan.target if plan.target is not None else self.default_target

    async def answer(self, exchange: Exchange, plan: RoutedPlan, target_header: str | None
                     ) -> Answer:
        """Decide, then try the plan's tiers until one answers; the headers say how."""
        target = self.target(plan, target_header)
        record, headers = exchange.record, exchange.headers
        if self.carbon is not None and target_header is None and plan.target is None:
            relaxed = self.carbon.relax(target)  # only the default: never a named target
            if relaxed is not None:
                target, record.target_rule = relaxed
                headers[h.TARGET_RULE] = record.target_rule
        decision = await self.router.decide(routing_text(exchange.body), target)
        record.route = "cascade" if len(decision.plan) > 1 else "routed"
        record.quality_target = target
        record.router_score = decision.scores[0] if decision.scores else None
        headers[h.ROUTE] = record.route
        headers[h.TARGET] = f"{target:g}"
        headers[h.SCORE] = ",".join(f"{s:.4f}" for s in decision.scores)
        stages = list(decision.plan)
        fallback: Whole | None = None  # the last stage answer not kept, should all else fail
        for position, tier in enumerate(stages):  # `stages` grows when its last tier fails
            last = position == len(stages) - 1
            headers[h.MODEL] = tier
            headers[h.TRIED] = ",".join(stages[:position + 1])
            backend = self.backends[tier]
            try:
                with self.health.guard(tier):
                    if last:
                        return await exchange.answer(tier, backend, dict(exchange.body))
                    if self.router.judges_first_token(tier):
                        kept = await self._first_token(exchange, decision, tier, backend)
                        if kept is not None:
                            return kept
                        continue
                    wanted = self.router.signals(tier)
                    samples = agreement.SAMPLES if AGREEMENT in wanted and \
                        exchange.body.get("n") in (None, 1) else 1
                    stage = await exchange.create(tier, backend, cascade.stage_body(
                        exchange.endpoint, exchange.body, self.cap, samples))
                    data = stage.completion.parsed()  # parsed once; written out once
                    signals = await self._signals(exchange, tier, backend, data, wanted)
            except BackendError as exc:
                # A 4xx is this tier's limit until every tier has refused: a larger one may
                # take the request (the embedded tier's n = 1, its context length).
                log.log(logging.INFO if exc.status < 500 else logging.WARNING,
                        "request %s: tier %s %s (%s); trying the next", record.id, tier,
                        "refused it" if exc.status < 500 else "failed", exc.code)
                if not last:
                    continue
                larger = self._next_larger(tier, stages)
                if larger is not None:
                    stages.append(larger)
                    continue
                if fallback is None or exc.status < 500:
                    raise  # a refusal is not replaced by a degraded answer
                headers[h.DEGRADED] = f"{tier} failed ({exc.code})"
                headers[h.MODEL] = fallback.attempt.tier
                return fallback
            judged = self._judge(exchange, decision, tier, stage, data, signals)
            if judged is None:
                continue  # cut off by the cap: not an answer
            keep, answer = judged
            if keep:
                return answer
            fallback = answer
        raise AssertionError("a plan always ends with a tier that answers")

    async def _first_token(self, exchange: Exchange, decision: Decision, tier: str,
                           backend: Backend) -> Answer | None:
        """A stage judged on its first token: the stage streams, and once its first token's
        logprobs are there the router judges them. Kept, the stream goes on to a streaming
        client live (its time to first token is the stage's own), or is read to its end for
        one that did not stream; not kept, the stage stops generating (it cost its prompt and
        one token) and None says to try the next tier."""
        endpoint = exchange.endpoint
        streamed = await exchange.open_stream(tier, backend,
                                              cascade.first_token_body(endpoint, exchange.body))
        found: list[list[dict[str, Any]] | None] = []  # the first token's logprobs, once seen

        def judged(chunks: Sequence[Chunk]) -> bool:
            seen, logprobs = cascade.first_token(endpoint, chunks)
            if seen:
                found.append(logprobs)
            return seen

        held = await exchange.read_until(streamed, judged)
        logprobs = found[0] if found else None  # None: not judged, so not kept
        keep, confidence = self.router.keep(decision, tier, logprobs)
        if confidence is not None:
            exchange.headers[h.CONFIDENCE] = f"{confidence:.4f}"
        if not keep:
            await exchange.drop(streamed, held)
            return None
        if not exchange.stream:
            return await exchange.collect(streamed, held)
        view = functools.partial(cascade.stream_view, endpoint, exchange.body)
        return Streamed(streamed.attempt, [view(c) for c in held], _viewed(streamed.rest, view))

    async def _signals(self, exchange: Exchange, tier: str, backend: Backend,
                       data: dict[str, Any], wanted: tuple[str, ...]) -> dict[str, float]:
        """The extra signals the stage's confidence model reads. Agreement reduces a sampled
        answer to its majority choice (in `data`); self-check asks the stage's own model, in one
        more call that the ledger records as another attempt of this tier. A signal that cannot
        be had (n > 1 asked by the client, a text completion's self-check) is left out, and an
        answer missing one is not kept."""
        found: dict[str, float] = {}
        if AGREEMENT in wanted and len(data["choices"]) > 1:
            found[AGREEMENT] = cascade.keep_majority(exchange.endpoint, data)
        if SELF_CHECK in wanted and exchange.endpoint is Endpoint.CHAT and data["choices"]:
            answer = cascade.answer_text(exchange.endpoint, data["choices"][0])
            body = selfcheck.request(str(exchange.body.get("model", tier)),
                                     routing_text(exchange.body), answer)
            check = await exchange.create(tier, backend, body)
            p_yes = selfcheck.p_yes(cascade.logprob_content(Endpoint.CHAT,
                                                            check.completion.parsed()))
            if p_yes is not None:
                found[SELF_CHECK] = p_yes
        return found

    def _judge(self, exchange: Exchange, decision: Decision, tier: str, stage: Whole,
               data: dict[str, Any], signals: dict[str, float]) -> tuple[bool, Whole] | None:
        """Whether the router keeps a stage's answer, and the answer as the client asked for
        it; None when the answer was cut off by the cascade's cap."""
        endpoint, body = exchange.endpoint, exchange.body
        if cascade.cut_by_cap(endpoint, body, data, self.cap):
            return None
        keep, confidence = self.router.keep(decision, tier,
                                            cascade.logprob_content(endpoint, data), signals)
        if confidence is not None:
            exchange.headers[h.CONFIDENCE] = f"{confidence:.4f}"
        view = cascade.client_view(endpoint, body, data)
        completion = Completion(stage.completion.body, stage.completion.usage, view)
        return keep, Whole(stage.attempt, completion)

    def _next_larger(self, tier: str, tried: list[str]) -> str | None:
        order = self.router.policy.tiers
        return next((t for t in order[order.index(tier) + 1:] if t not in tried), None)


async def _viewed(rest: ChunkStream, view: Callable[[Chunk], Chunk]
                  ) -> AsyncGenerator[Sequence[Chunk]]:
    """The rest of a kept stage's stream, each chunk as the client asked for it."""
    try:
        async for batch in rest:
            yield [view(chunk) for chunk in batch]
    finally:
        await rest.aclose()
