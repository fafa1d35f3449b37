"""HFBackend, the transformers static-batching baseline, over the tiny random llama (fp32)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
import torch

from pdserve.loadgen.backend import BenchRequest
from pdserve.loadgen.hf_backend import HFBackend
from tests.factories import tiny_tokenizer

PROMPTS = ((5, 17, 42, 99, 7), (300, 12, 64))


class GatedGenerate:
    """Wraps model.generate: records each batch's size and holds the first call until `release`."""

    def __init__(self, generate: Callable[..., Any]) -> None:
        self.generate = generate
        self.batch_sizes: list[int] = []
        self.entered, self.release = threading.Event(), threading.Event()

    def __call__(self, input_ids: torch.Tensor, **kwargs: Any) -> Any:
        self.batch_sizes.append(input_ids.shape[0])
        if len(self.batch_sizes) == 1:
            self.entered.set()
            assert self.release.wait(timeout=30), "the test never released the first batch"
        return self.generate(input_ids, **kwargs)


def run(tiny_model_dirs, test: Callable[[HFBackend], Awaitable[Any]]) -> Any:
    """Start a backend over the tiny llama, run `test` on it, close it."""

    async def main() -> Any:
        backend = HFBackend(str(tiny_model_dirs["llama"]), dtype="float32", threads=1)
        await backend.start()
        try:
            return await test(backend)
        finally:
            await backend.close()

    return asyncio.run(main())


async def events_of(backend: HFBackend, request: BenchRequest) -> list[int]:
    return [count async for count in backend.stream(request)]


async def behind_a_busy_batch(
    backend: HFBackend, requests: list[BenchRequest]
) -> tuple[list[list[int]], GatedGenerate]:
    """Send `requests` while a first one-request batch runs, so they all queue for the second batch."""
    gate = backend.model.generate = GatedGenerate(backend.model.generate)
    first = asyncio.create_task(events_of(backend, BenchRequest(index=100, max_tokens=2, prompt_token_ids=(3, 4))))
    await asyncio.to_thread(gate.entered.wait, 30)
    waiting = [asyncio.create_task(events_of(backend, request)) for request in requests]
    await asyncio.sleep(0)  # each stream() queues its request before its first await
    gate.release.set()
    assert await first == [1, 1]
    return await asyncio.gather(*waiting), gate


def oracle_tokens(model: torch.nn.Module, prompt: list[int], max_tokens: int) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()


def test_each_request_gets_exactly_its_max_tokens_in_a_shared_batch(tiny_model_dirs) -> None:
    requests = [BenchRequest(index=0, max_tokens=3, prompt_token_ids=PROMPTS[0]),
                BenchRequest(index=1, max_tokens=7, prompt_token_ids=PROMPTS[1])]

    events, gate = run(tiny_model_dirs, lambda backend: behind_a_busy_batch(backend, requests))

    assert gate.batch_sizes == [1, 2]  # both requests shared the second generate
    assert events == [[1] * 3, [1] * 7]  # one arrival per decoding step, none after max_tokens


def test_tokens_equal_transformers_generate_alone(tiny_model_dirs, tiny_oracles) -> None:
    requests = [BenchRequest(index=i, max_tokens=6, prompt_token_ids=p) for i, p in enumerate(PROMPTS)]

    async def test(backend: HFBackend) -> dict[int, list[int]]:
        await behind_a_busy_batch(backend, requests)  # one left-padded batch of different prompt lengths
        return backend.outputs

    outputs = run(tiny_model_dirs, test)

    for request in requests:
        assert outputs[request.index] == oracle_tokens(tiny_oracles["llama"], list(request.prompt_token_ids), 6)


def test_requests_arriving_during_a_batch_wait_for_the_next(tiny_model_dirs) -> None:
    requests = [BenchRequest(index=i, max_tokens=4, prompt_token_ids=p) for i, p in enumerate(PROMPTS)]

    async def test(backend: HFBackend) -> tuple[int, list[int]]:
        _, gate = await behind_a_busy_batch(backend, requests)
        return backend.num_batches, gate.batch_sizes

    assert run(tiny_model_dirs, test) == (2, [1, 2])


def test_messages_request_uses_the_chat_template(tiny_model_dirs, tiny_oracles) -> None:
    request = BenchRequest(index=0, max_tokens=5, messages=({"role": "user", "content": "hello there"},), kind="chat")
    # The tiny tokenizer's template (tests/factories.py), with the generation prompt.
    prompt = tiny_tokenizer()("<s>user\nhello there</s>\n<s>assistant\n", add_special_tokens=False).input_ids

    async def test(backend: HFBackend) -> tuple[list[int], list[int]]:
        return await events_of(backend, request), backend.outputs[0]

    events, tokens = run(tiny_model_dirs, test)

    assert events == [1] * 5
    assert tokens == oracle_tokens(tiny_oracles["llama"], prompt, 5)


def test_a_failing_generate_fails_its_batch_and_the_next_batch_is_served(tiny_model_dirs) -> None:
    async def test(backend: HFBackend) -> list[int]:
        with pytest.raises(RuntimeError, match="neither prompt_token_ids nor messages"):
            await events_of(backend, BenchRequest(index=0, max_tokens=2))
        return await events_of(backend, BenchRequest(index=1, max_tokens=2, prompt_token_ids=PROMPTS[0]))

    assert run(tiny_model_dirs, test) == [1, 1]


def test_requests_cancelled_while_queued_are_never_generated(tiny_model_dirs) -> None:
    """A run's time limit cancels what is left; the backend must not go on generating it."""

    async def test(backend: HFBackend) -> list[int]:
        gate = backend.model.generate = GatedGenerate(backend.model.generate)
        first = asyncio.create_task(events_of(backend, BenchRequest(index=100, max_tokens=2, prompt_token_ids=(3, 4))))
        await asyncio.to_thread(gate.entered.wait, 30)
        queued = [asyncio.create_task(events_of(backend, BenchRequest(index=i, max_tokens=50, prompt_token_ids=p)))
                  for i, p in enumerate(PROMPTS)]
        await asyncio.sleep(0.05)
        for task in queued:
            task.cancel()
        await asyncio.gather(*queued, return_exceptions=True)
        gate.release.set()
        assert await first == [1, 1]
        return gate.batch_sizes

    assert run(tiny_model_dirs, test) == [1]  # close() did not generate the cancelled requests
