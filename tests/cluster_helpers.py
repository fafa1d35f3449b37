"""Helpers for end-to-end tests: real daemon processes on 127.0.0.1, free ports."""

from __future__ import annotations

import asyncio
import inspect
import os
import tempfile
import time

import grpc

from pdserve.client import AsyncClient, Client
from pdserve.cluster import Child, file_tail
from pdserve.errors import FatalError
from pdserve.status import error_from_status
from pdserve.v1 import common_pb2, decode_pb2, decode_pb2_grpc

E2E_LOG = os.environ.get("PDSERVE_TEST_LOG")  # set to a path to keep the daemons' logs


def start_worker(role: str, model: str, *extra: str, env: dict[str, str] | None = None,
                 dtype: str = "float32") -> Child:
    """A standalone worker (no router), ready to serve."""
    child = Child(role, ["--model", model, "--dtype", dtype, "--kv-cache-gib", "0.05", "--threads", "1",
                         "--grace-s", "2", *extra], dict(os.environ, **env) if env else None)
    log = open(E2E_LOG, "a") if E2E_LOG else tempfile.TemporaryFile("w+")
    child.start(log)
    try:
        child.wait_ready(120)
    except FatalError as exc:  # say why: the end of what it wrote to stderr
        log.flush()
        raise FatalError(f"{exc}; its stderr ends with:\n{file_tail(log)}") from None
    return child


def kv_used(address: str, service: str) -> int:
    with Client(address, service=service, timeout=10) as client:
        return client.stats().load.kv.num_used


def wait_kv_free(address: str, service: str, timeout: float = 1.0) -> int:
    """Blocks in use at the worker after waiting up to `timeout` for them to drop to 0."""
    deadline = time.monotonic() + timeout
    used = kv_used(address, service)
    while used and time.monotonic() < deadline:
        time.sleep(0.05)
        used = kv_used(address, service)
    return used


async def stream_all(address: str, prompts: list[list[int]], max_tokens: int, on_progress=None):
    """Every prompt as one concurrent greedy stream: per prompt, (token ids, text) as streamed and the
    result. `on_progress(counts)`, a function or a coroutine function, sees the tokens per stream so far
    after each delta (a test injects its fault there)."""
    async with AsyncClient(address) as client:
        counts = [0] * len(prompts)

        async def one(i):
            stream = client.generate(prompt_token_ids=prompts[i], max_tokens=max_tokens, temperature=0.0,
                                     ignore_eos=True)
            ids, text = [], []
            async for delta in stream:
                ids += delta.token_ids
                text.append(delta.text)
                counts[i] += len(delta.token_ids)
                if on_progress is not None and inspect.isawaitable(done := on_progress(counts)):
                    await done
            return ids, "".join(text), stream.result

        return await asyncio.gather(*(one(i) for i in range(len(prompts))))


def generate_via(decode_address: str, candidates: list[str], prompt: list[int], max_tokens: int):
    """Greedy DecodeService.Generate straight to a decode worker, with an explicit prefill candidate
    list (the test, not placement, decides); (token ids, result)."""
    request = decode_pb2.DecodeGenerateRequest(
        request=common_pb2.GenerateRequest(
            prompt_token_ids=common_pb2.TokenIds(token_ids=prompt),
            sampling_params=common_pb2.SamplingParams(max_tokens=max_tokens, temperature=0.0)),
        prefill_candidates=[decode_pb2.PrefillCandidate(worker_id=f"p{i}", address=a)
                            for i, a in enumerate(candidates)])
    tokens, result = [], None
    with grpc.insecure_channel(decode_address) as channel:
        try:
            for response in decode_pb2_grpc.DecodeServiceStub(channel).Generate(request, timeout=60):
                if response.WhichOneof("kind") == "delta":
                    tokens.extend(response.delta.token_ids)
                else:
                    result = response.result
        except grpc.RpcError as exc:
            raise error_from_status(exc.code(), exc.details()) from None
    return tokens, result

