"""What the embedded backend reports to the energy attributor: the prompt tokens its prefill
computed (llama.cpp reuses the KV cache's longest shared prefix, so a repeated prompt costs
only its rest), with the first token, whose logits the prefill pass produced."""

from __future__ import annotations

import asyncio
from pathlib import Path

from greenroute.backends.base import Endpoint
from greenroute.backends.energy.progress import current_track
from greenroute.backends.llamacpp import LlamaCppBackend


class Recorder:
    """A Progress that keeps every report."""

    def __init__(self) -> None:
        self.reports: list[tuple[float, float]] = []  # (generated, prompt)

    def begin(self) -> None: ...

    def tokens(self, n: float, at: float | None = None, prompt: float = 0.0) -> None:
        self.reports.append((n, prompt))

    def end(self, at: float | None = None) -> None: ...


def _ask(text: str) -> dict[str, object]:
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 4, "temperature": 0}


def test_prefill_reports_the_prompt_tokens_it_computed(tiny_weights: Path) -> None:
    async def run() -> list[tuple[int, Recorder]]:
        backend = LlamaCppBackend("tiny", tiny_weights, "smollm2", threads=1, context=512)
        await backend.start()
        seen = []
        try:
            for text in ("Name three fruits that start with the letter A.",
                         "Name three fruits that start with the letter B.",
                         "Tell me about the weather on Mars in one sentence."):
                recorder = Recorder()
                current_track.set(recorder)
                completion = await backend.create(Endpoint.CHAT, _ask(text))
                assert completion.usage is not None
                seen.append((completion.usage.prompt_tokens, recorder))
        finally:
            await backend.aclose()
        return seen

    (first_p, first), (second_p, second), (third_p, third) = asyncio.run(run())
    for prompt, recorder in ((first_p, first), (second_p, second), (third_p, third)):
        # one report carries the prompt and the first generated token together
        assert recorder.reports[0][0] == 1 and recorder.reports[0][1] > 0
        assert sum(p for _, p in recorder.reports) == recorder.reports[0][1]
        assert sum(n for n, _ in recorder.reports) <= 4
        assert recorder.reports[0][1] <= prompt
    assert first.reports[0][1] == first_p  # nothing cached before the first request
    # one letter differs: only the tokens from there on are computed again
    assert 1 <= second.reports[0][1] <= 10 < second_p
    # another question shares only the chat template's opening (SmolLM2's default system
    # prompt) with the one before: more is computed than after a one-letter change
    assert second.reports[0][1] + 5 < third.reports[0][1] < third_p


class Ends(Recorder):
    """A Progress that also records when it was ended, among its reports."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[str] = []

    def tokens(self, n: float, at: float | None = None, prompt: float = 0.0) -> None:
        super().tokens(n, at, prompt)
        self.events.append("tokens")

    def end(self, at: float | None = None) -> None:
        self.events.append("end")


def test_n_samples_report_to_one_track_ended_after_the_last(tiny_weights: Path) -> None:
    """The agreement signal's `n` samples are one request: every sample's tokens reach its
    track, which ends once, after them (ended after the first, the others' joules were lost)."""
    async def run() -> tuple[int, Ends]:
        backend = LlamaCppBackend("tiny", tiny_weights, "smollm2", threads=1, context=512)
        await backend.start()
        try:
            recorder = Ends()
            current_track.set(recorder)
            completion = await backend.create(Endpoint.CHAT, {
                **_ask("Name a fruit."), "n": 3, "temperature": 0.7, "seed": 1})
            assert completion.usage is not None
            return completion.usage.completion_tokens, recorder
        finally:
            await backend.aclose()

    completion_tokens, recorder = asyncio.run(run())
    assert sum(n for n, _ in recorder.reports) == completion_tokens
    assert recorder.events.count("end") == 1 and recorder.events[-1] == "end"
    assert sum(1 for _, p in recorder.reports if p > 0) == 3  # one prefill pass per sample
