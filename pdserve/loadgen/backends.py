"""The servers `pdserve bench` measures: pdserve through its SDK, llama-server over HTTP.

(The transformers baseline, which loads a model in-process, is in hf_backend.py.)
Every backend is asked for greedy output of exactly max_tokens tokens where the
server allows it (ignore_eos), so that all of them do the same work.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

from pdserve.loadgen.backend import BenchRequest


class PdserveBackend:
    """A pdserve router (or a decode worker) through pdserve.client.AsyncClient."""

    def __init__(self, address: str, *, name: str = "pdserve", timeout_s: float = 600.0,
                 api_key: str | None = None, credentials=None) -> None:
        self.address = address
        self.api_key = api_key
        self.credentials = credentials  # grpc.ChannelCredentials for a TLS router
        self.name = name
        self.timeout_s = timeout_s
        self._client = None

    async def start(self) -> None:
        from pdserve.client import AsyncClient

        self._client = AsyncClient(self.address, api_key=self.api_key, credentials=self.credentials)

    async def stream(self, request: BenchRequest) -> AsyncIterator[int]:
        assert self._client is not None, "start() first"
        deltas = self._client.generate(
            prompt_token_ids=request.prompt_token_ids, messages=request.messages, max_tokens=request.max_tokens,
            temperature=0.0, ignore_eos=request.ignore_eos, timeout=self.timeout_s)
        async for delta in deltas:
            yield len(delta.token_ids)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()


class LlamaServerBackend:
    """llama.cpp's llama-server: /completion for token-id prompts, /v1/chat/completions for chats.

    Streams server-sent events over HTTP/1.1 (one connection per request, as a
    load generator with many clients would hold them). An event usually carries one
    token, but a token ending inside a UTF-8 character comes with the next event:
    /completion's running `tokens_predicted` gives the exact count.
    """

    def __init__(self, url: str, *, name: str = "llama-server", timeout_s: float = 600.0) -> None:
        parts = urlsplit(url if "://" in url else f"http://{url}")
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 8080
        self.name = name
        self.timeout_s = timeout_s

    async def start(self) -> None:
        pass

    async def stream(self, request: BenchRequest) -> AsyncIterator[int]:
        common = {"stream": True, "temperature": 0.0, "ignore_eos": request.ignore_eos, "cache_prompt": False}
        if request.messages is not None:
            path, payload = "/v1/chat/completions", {"messages": list(request.messages),
                                                     "max_tokens": request.max_tokens, **common}
        else:
            path, payload = "/completion", {"prompt": list(request.prompt_token_ids or ()),
                                            "n_predict": request.max_tokens, **common}
        predicted = 0
        async with asyncio.timeout(self.timeout_s):
            async for event in _post_sse(self.host, self.port, path, payload):
                if "tokens_predicted" in event:
                    n, predicted = event["tokens_predicted"] - predicted, event["tokens_predicted"]
                else:
                    n = _chat_tokens_in(event)
                if n > 0:
                    yield n

    async def close(self) -> None:
        pass


def _chat_tokens_in(event: dict) -> int:
    """Tokens of an OpenAI-style chat chunk: one per content delta (the API gives no count)."""
    return sum(1 for c in event.get("choices", ()) if (c.get("delta") or {}).get("content"))


async def _post_sse(host: str, port: int, path: str, payload: dict) -> AsyncIterator[dict]:
    """POST JSON and yield the JSON of each `data:` event until the stream ends or says [DONE]."""
    reader, writer = await asyncio.open_connection(host, port, limit=2**24)
    try:
        body = json.dumps(payload).encode()
        writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
                     f"Accept: text/event-stream\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                     .encode() + body)
        await writer.drain()
        status = (await reader.readline()).decode("latin-1").split()
        headers = {}
        while (line := (await reader.readline()).decode("latin-1").strip()):
            key, _, value = line.partition(":")
            headers[key.strip().lower()] = value.strip().lower()
        chunked = headers.get("transfer-encoding") == "chunked"
        if len(status) < 2 or status[1] != "200":
            text = (await reader.read(4096)).decode(errors="replace")
            raise RuntimeError(f"{path}: HTTP {' '.join(status[1:]) or '?'}: {text.strip()[:300]}")
        async for line in _lines(reader, chunked):
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                return
            event = json.loads(data)
            if event is None:  # llama-server opens some streams with `data: null`
                continue
            if "error" in event:
                raise RuntimeError(f"{path}: {event['error']}")
            yield event
            if event.get("stop") is True:
                return
    finally:
        writer.close()


async def _lines(reader: asyncio.StreamReader, chunked: bool) -> AsyncIterator[str]:
    """The body's text lines, through HTTP/1.1 chunked transfer coding when the response uses it."""
    if not chunked:
        while line := await reader.readline():
            yield line.decode()
        return
    pending = b""
    while True:
        size = int((await reader.readline()).split(b";")[0].strip() or b"0", 16)
        if size == 0:
            break
        pending += await reader.readexactly(size)
        await reader.readline()  # the CRLF after the chunk
        *complete, pending = pending.split(b"\n")
        for line in complete:
            yield line.decode()
    if pending:
        yield pending.decode()
