"""Every endpoint through the real `openai` client, answered by the real embedded SmolLM2 model.

Generations are kept to a few tokens: on 2 cores the suite's time is mostly model time.
"""

from __future__ import annotations

import math
import threading
import time

import httpx
import openai
import pytest
from conftest import Gateway

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_chat_completion_returns_model_text_usage_and_headers(client: openai.OpenAI) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=QUESTION, max_tokens=8, temperature=0)
    assert raw.headers["x-greenroute-model"] == "tiny"
    assert raw.headers["x-greenroute-route"] == "direct"
    assert raw.headers["x-request-id"]
    completion = raw.parse()
    assert completion.model == "smollm2-135m-instruct-q4_1"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content.strip()
    assert completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.prompt_tokens > 5
    assert 0 < completion.usage.completion_tokens <= 8


def test_greedy_decoding_is_deterministic(client: openai.OpenAI) -> None:
    answers = {client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=6,
                                              temperature=0).choices[0].message.content
               for _ in range(2)}
    assert len(answers) == 1


def test_chat_stream_yields_chunks_then_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].choices == []
    usage = chunks[-1].usage
    assert usage.prompt_tokens > 5 and 0 < usage.completion_tokens <= 8
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_matches_non_stream_text(client: openai.OpenAI) -> None:
    whole = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8,
                                           temperature=0)
    streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model="tiny", messages=QUESTION, max_tokens=8, temperature=0, stream=True) if c.choices)
    assert streamed == whole.choices[0].message.content


def test_stream_without_include_usage_sends_no_usage_chunk(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=4,
                                                 temperature=0, stream=True))
    assert chunks and all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def test_text_completion(client: openai.OpenAI) -> None:
    raw = client.completions.with_raw_response.create(
        model="tiny", prompt="The capital of France is", max_tokens=4, temperature=0)
    assert raw.headers["x-greenroute-model"] == "tiny"
    completion = raw.parse()
    assert completion.choices[0].text
    assert completion.usage.completion_tokens == 4


def test_text_completion_stream(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model="tiny", prompt="One, two, three,",
                                            max_tokens=4, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices)
    assert chunks[-1].usage.completion_tokens == 4


def test_chat_logprobs_are_a_distribution_and_match_greedy_choice(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=5,
                                                temperature=0, logprobs=True, top_logprobs=3)
    content = completion.choices[0].logprobs.content
    assert len(content) == completion.usage.completion_tokens
    assert "".join(item.token for item in content) == completion.choices[0].message.content
    for item in content:
        tops = [t.logprob for t in item.top_logprobs]
        assert len(tops) == 3 and tops == sorted(tops, reverse=True)
        assert item.logprob <= 0 and sum(math.exp(t) for t in tops) <= 1 + 1e-6
        # Greedy decoding picks the most likely token: it is the first alternative.
        assert item.top_logprobs[0].token == item.token
        assert item.logprob == pytest.approx(tops[0])
        assert bytes(item.bytes).decode() == item.token


def test_logprobs_match_llama_cpp_with_logits_all(client: openai.OpenAI, tiny_weights) -> None:
    """The processor-based logprobs equal llama-cpp-python's own (which need logits_all)."""
    from llama_cpp import Llama

    prompt = "The capital of France is"
    ours = client.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0,
                                     logprobs=1).choices[0].logprobs
    reference_model = Llama(model_path=str(tiny_weights), n_ctx=256, logits_all=True,
                            verbose=False, n_threads=2)
    reference = reference_model.create_completion(prompt, max_tokens=4, temperature=0,
                                                  logprobs=1)["choices"][0]["logprobs"]
    assert ours.tokens == reference["tokens"]
    assert ours.token_logprobs == pytest.approx(reference["token_logprobs"], abs=2e-3)


def test_streamed_logprobs_cover_every_token(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(
        model="tiny", messages=QUESTION, max_tokens=6, temperature=0, logprobs=True,
        stream=True, stream_options={"include_usage": True}))
    tokens = [t for c in chunks if c.choices and c.choices[0].logprobs
              for t in c.choices[0].logprobs.content]
    assert len(tokens) == chunks[-1].usage.completion_tokens


def test_models_list_and_retrieve(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert ids[:2] == ["tiny", "tiny-q1"]  # cheapest first
    assert "echo" in ids and "cloud" in ids and ids[-1] == "green"
    assert client.models.retrieve("tiny").id == "tiny"
    assert client.models.retrieve("gpt-4o-mini").id == "echo"  # an alias names its tier
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


def test_concurrent_requests_queue_on_one_model(client: openai.OpenAI) -> None:
    results: list[str] = []

    def ask(i: int) -> None:
        reply = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"Count to {i}."}],
            max_tokens=3, temperature=0)
        results.append(reply.choices[0].message.content)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and all(results)


def test_full_queue_answers_503(gateway: Gateway, client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="tiny-q1", messages=QUESTION, max_tokens=200,
                                            temperature=0, stream=True)
    next(iter(stream))  # the only slot is now generating
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="tiny-q1", messages=QUESTION, max_tokens=2)
    assert caught.value.status_code == 503
    assert caught.value.body["code"] == "backend_unavailable"
    stream.close()


def test_client_disconnect_mid_stream_stops_generation(gateway: Gateway,
                                                       client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Write a very long story."}],
        max_tokens=1500, temperature=0, stream=True)
    iterator = iter(stream)
    for _ in range(3):
        next(iterator)
    stream.close()  # the client goes away; ~1500 tokens would take over 10 s on 2 cores
    started = time.monotonic()
    while time.monotonic() - started < 5:
        health = httpx.get(gateway.root + "/health", timeout=5).json()
        if health["tiers"]["tiny"]["queued"] == 0:
            break
        time.sleep(0.05)
    assert health["tiers"]["tiny"]["queued"] == 0
    assert time.monotonic() - started < 3
    # And the model is free for the next request.
    reply = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2)
    assert reply.choices[0].message.content is not None


def test_embedded_samples_n_choices_and_counts_every_token(client: openai.OpenAI) -> None:
    """`n` > 1 is n samples, one after another (the cascade's agreement signal)."""
    reply = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=3, n=3,
                                           temperature=0.7, seed=1)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert reply.usage is not None and reply.usage.completion_tokens >= 3
    one = client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=3)
    assert one.usage is not None and reply.usage.prompt_tokens == one.usage.prompt_tokens


def test_embedded_refuses_what_it_cannot_do(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2, n=17)
    assert caught.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2, n=2,
                                       stream=True)
    assert caught.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="tiny", messages=QUESTION, max_tokens=2,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert caught.value.body["param"] == "tools"


def test_prompt_longer_than_context_is_a_400(client: openai.OpenAI) -> None:
    long = "word " * 700  # tiny-q1 has a 512-token context
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny-q1", messages=[
            {"role": "user", "content": long}], max_tokens=2)
