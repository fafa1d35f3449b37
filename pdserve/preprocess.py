"""Preprocessing: from a client's prompt or chat messages to validated prompt token ids.

Owned by the prefill daemon, and used unchanged by the decode daemon's local
path and the CLI, so the same input gives the same tokens everywhere. The
workers' Tokenize and Detokenize calls (the router's /tokenize and /detokenize)
use it too: `token_ids` is the one path from input to token ids, generation's
included, and `detokenize` its inverse. The version string names the behaviour:
workers report it, and a cache entry made by another version is never used.
Results are cached by input (LRU with a TTL), so a repeated system prompt or
conversation is not templated and tokenized again.

A conversation may come with tools (a JSON array, OpenAI's `tools`), which the chat template
gets as `tools`; a template whose source never mentions `tools` would drop them silently, so it
refuses them instead, unless the caller marks them optional (its output is constrained to a tool
call anyway).
"""

from __future__ import annotations

import array
import hashlib
import json
import pathlib
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import jinja2
import xxhash

from pdserve.errors import InvalidRequestError

PREPROCESS_VERSION = "2"  # 2: renders a conversation's tools (a worker of 1 would drop them)
# Longest prompt accepted before tokenizing, in characters: bounds the work a
# single request can ask of the tokenizer (a 10 MB prompt is refused here).
MAX_PROMPT_CHARS = 1_000_000
CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
# A chat template that takes tools reads the `tools` variable somewhere.
_TAKES_TOOLS = re.compile(r"\btools\b")


@dataclass(frozen=True)
class ChatMessage:
    role: str
    content: str


class PreprocessCache:
    """Token ids by (version, digest of the input); least recently used entries go first, stale ones
    on sight or when they reach the head.

    Bounded in entries and in tokens held. An entry keeps a 128-bit digest of its input, not the
    input, and its token ids as 4-byte integers, not Python ints (36 bytes each): a soak of long
    chat prompts had grown a worker's memory by hundreds of MiB through this cache.
    """

    def __init__(self, max_entries: int = 4096, ttl_s: float = 600.0, max_tokens: int = 4_000_000,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self.max_tokens = max_tokens
        self.ttl_s = ttl_s
        self._now = now
        self._entries: OrderedDict[Hashable, tuple[float, array.array]] = OrderedDict()
        self._num_tokens = 0
        self.num_hits = 0
        self.num_misses = 0

    def get(self, key: Hashable) -> list[int] | None:
        entry = self._entries.get(key)
        if entry is None or self._now() - entry[0] > self.ttl_s:
            self._drop(key)
            self.num_misses += 1
            return None
        self._entries.move_to_end(key)
        self.num_hits += 1
        return entry[1].tolist()

    def put(self, key: Hashable, token_ids: list[int]) -> None:
        self._drop(key)
        now = self._now()
        self._entries[key] = (now, array.array("I", token_ids))
        self._num_tokens += len(token_ids)
        while self._entries and (len(self._entries) > self.max_entries or self._num_tokens > self.max_tokens
                                 or now - next(iter(self._entries.values()))[0] > self.ttl_s):
            self._drop(next(iter(self._entries)))

    def _drop(self, key: Hashable) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._num_tokens -= len(entry[1])

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def hit_rate(self) -> float:
        total = self.num_hits + self.num_misses
        return self.num_hits / total if total else 0.0


def load_preprocessor(tokenizer, config_path: str | None) -> Preprocessor:
    """The preprocessing a worker runs: the model's own, or as a JSON file sets it.

    The file (every key optional): {"chat_template": "...", "version": "...",
    "max_prompt_chars": N, "add_special_tokens": true}. Without a version, one is
    derived from the file's content, so changing the file always changes the version
    (and the cache keys, and what the router pairs).
    """
    if config_path is None:
        return Preprocessor(tokenizer)
    raw = pathlib.Path(config_path).read_bytes()
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError("preprocess_config", f"{config_path} is not valid JSON ({exc})") from None
    version = config.get("version") or f"{PREPROCESS_VERSION}-{hashlib.sha256(raw).hexdigest()[:12]}"
    return Preprocessor(tokenizer, str(version), chat_template=config.get("chat_template"),
                        max_prompt_chars=int(config.get("max_prompt_chars", MAX_PROMPT_CHARS)),
                        add_special_tokens=bool(config.get("add_special_tokens", True)))


class Preprocessor:
    def __init__(self, tokenizer, version: str = PREPROCESS_VERSION, cache: PreprocessCache | None = None,
                 chat_template: str | None = None, max_prompt_chars: int = MAX_PROMPT_CHARS,
                 add_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.version = version
        self.cache = cache if cache is not None else PreprocessCache()
        self.chat_template = chat_template  # None: the model's own
        self.max_prompt_chars = max_prompt_chars
        self.add_special_tokens = add_special_tokens  # for plain prompts (a chat template writes its own)
        # Whether the vocabulary spells bytes as GPT-2 does (token_bytes).
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self._byte_level = type(decoder).__name__ == "ByteLevel"
        self._token_bytes: dict[int, bytes] = {}

    def __call__(
        self,
        *,
        prompt: str | None = None,
        messages: Sequence[ChatMessage] | None = None,
        prompt_token_ids: Sequence[int] | None = None,
        tools_json: str | None = None,
        tools_optional: bool = False,
        request_id: str | None = None,
    ) -> list[int]:
        """The prompt's token ids (see `token_ids`); `tools_json` (with messages): the tools as a JSON
        array, rendered by the chat template (`tools_optional`: left out by a template that takes none)."""
        given = [name for name, value in
                 (("prompt", prompt), ("messages", messages), ("prompt_token_ids", prompt_token_ids))
                 if value is not None]
        if len(given) != 1:
            raise InvalidRequestError(
                "prompt", f"give exactly one of prompt, messages, prompt_token_ids (got {given or 'none'})",
                request_id=request_id)
        if prompt_token_ids is not None:
            if not prompt_token_ids:
                raise InvalidRequestError("prompt_token_ids", "is empty", request_id=request_id)
            return list(prompt_token_ids)
        if prompt == "":
            raise InvalidRequestError("prompt", "is empty", request_id=request_id)
        ids = self.token_ids(prompt=prompt, messages=messages, tools_json=tools_json, tools_optional=tools_optional,
                             request_id=request_id)
        if not ids:
            raise InvalidRequestError("prompt", "tokenizes to no tokens", request_id=request_id)
        return ids

    def token_ids(self, *, prompt: str | None = None, messages: Sequence[ChatMessage] | None = None,
                  tools_json: str | None = None, tools_optional: bool = False,
                  add_special_tokens: bool | None = None, add_generation_prompt: bool = True,
                  request_id: str | None = None) -> list[int]:
        """The token ids of a prompt or a conversation, possibly none.

        With the default options, exactly what a generate request gets (and through the same
        cache). The options are /tokenize's: `add_special_tokens` None follows generation's rule
        (this preprocessing's setting for a prompt; off for messages, whose template writes the
        special tokens itself); `add_generation_prompt` False leaves the assistant's turn unopened.
        """
        if (prompt is None) == (messages is None):
            raise InvalidRequestError("prompt", "give exactly one of prompt, messages", request_id=request_id)
        if tools_json and messages is None:
            raise InvalidRequestError("tools", "need messages (a chat template renders them)", request_id=request_id)
        as_generated = add_special_tokens is None and add_generation_prompt
        key = (self.version, _digest(messages if messages is not None else prompt, tools_json or "", tools_optional))
        ids = self.cache.get(key) if as_generated else None
        if ids is None:
            if messages is not None:
                text = self.apply_chat_template(messages, request_id, add_generation_prompt=add_generation_prompt,
                                                tools_json=tools_json, tools_optional=tools_optional)
                special = bool(add_special_tokens)
            else:
                self._check_text("prompt", prompt, request_id)
                text = prompt
                special = self.add_special_tokens if add_special_tokens is None else add_special_tokens
            ids = self.tokenizer.encode(text, add_special_tokens=special)
            if as_generated:
                self.cache.put(key, ids)
        return ids

    def detokenize(self, token_ids: Sequence[int], request_id: str | None = None) -> str:
        """The text of `token_ids`, special tokens written out (what /detokenize answers)."""
        self._check_ids(token_ids, request_id)
        return self.tokenizer.decode(list(token_ids))

    def token_bytes(self, token_ids: Sequence[int]) -> list[bytes]:
        """Each id's bytes in the vocabulary: part of a UTF-8 character for some (what logprobs report)."""
        out = []
        for token_id in token_ids:
            cached = self._token_bytes.get(token_id)
            if cached is None:
                token = self.tokenizer.convert_ids_to_tokens(token_id) or ""
                cached = self._token_bytes[token_id] = _token_bytes(token, self._byte_level)
            out.append(cached)
        return out

    def token_strs(self, token_ids: Sequence[int]) -> list[str]:
        """The tokenizer's own string for each id (byte-level tokenizers write a leading space "Ġ")."""
        return self.tokenizer.convert_ids_to_tokens(list(token_ids))

    def apply_chat_template(self, messages: Sequence[ChatMessage], request_id: str | None = None, *,
                            add_generation_prompt: bool = True, tools_json: str | None = None,
                            tools_optional: bool = False) -> str:
        if not messages:
            raise InvalidRequestError("messages", "is empty", request_id=request_id)
        for i, m in enumerate(messages):
            if m.role not in CHAT_ROLES:
                raise InvalidRequestError(f"messages[{i}].role", f"must be one of {sorted(CHAT_ROLES)}, got {m.role!r}",
                                          request_id=request_id)
            self._check_text(f"messages[{i}].content", m.content, request_id)
        template = self.chat_template or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise InvalidRequestError("messages", "this model has no chat template; send a prompt",
                                      request_id=request_id)
        tools = self._tools(tools_json, template, tools_optional, request_id)
        chat = [{"role": m.role, "content": m.content} for m in messages]
        try:
            return self.tokenizer.apply_chat_template(chat, chat_template=template, tokenize=False, tools=tools,
                                                      add_generation_prompt=add_generation_prompt)
        except jinja2.TemplateSyntaxError:
            raise  # the operator's template is broken: not the request's fault
        except jinja2.TemplateError as exc:  # the template refused the input (raise_exception), or its tools' shape
            raise InvalidRequestError("tools" if tools else "messages", f"the chat template refused them ({exc})",
                                      request_id=request_id) from None

    def _tools(self, tools_json: str | None, template: str, optional: bool, request_id: str | None) -> list | None:
        """The tools the template gets: None without any, or when it takes none and they are optional."""
        if not tools_json:
            return None
        self._check_text("tools", tools_json, request_id)
        if not _TAKES_TOOLS.search(template):
            if optional:
                return None
            raise InvalidRequestError("tools", "this model's chat template takes no tools", request_id=request_id)
        try:
            tools = json.loads(tools_json)
        except (ValueError, RecursionError) as exc:  # RecursionError: nested too deep
            raise InvalidRequestError("tools", f"is not valid JSON ({exc})", request_id=request_id) from None
        if not isinstance(tools, list) or not all(isinstance(tool, dict) for tool in tools):
            raise InvalidRequestError("tools", "must be a JSON array of objects", request_id=request_id)
        return tools or None

    def _check_ids(self, token_ids: Sequence[int], request_id: str | None) -> None:
        """Every id must be one this tokenizer decodes: decode() gives "" for the others, silently."""
        num_ids = len(self.tokenizer)
        for i, token_id in enumerate(token_ids):
            if not 0 <= token_id < num_ids:
                raise InvalidRequestError(f"token_ids[{i}]", f"{token_id} is not a token id of this tokenizer "
                                          f"(0 to {num_ids - 1})", request_id=request_id)

    def _check_text(self, field: str, text: str, request_id: str | None) -> None:
        if not isinstance(text, str):
            raise InvalidRequestError(field, "must be a string", request_id=request_id)
        if len(text) > self.max_prompt_chars:
            raise InvalidRequestError(field, f"is {len(text)} characters, more than {self.max_prompt_chars}",
                                      request_id=request_id)
        if "\ud800" <= max(text, default="\0") and any("\ud800" <= c <= "\udfff" for c in text):
            raise InvalidRequestError(field, "is not valid UTF-8 (lone surrogate)", request_id=request_id)


def _digest(value: str | Sequence[ChatMessage], tools_json: str = "", tools_optional: bool = False) -> bytes:
    """A 128-bit digest of a prompt or of a message list with its tools (unambiguous: lengths are
    hashed too)."""
    h = xxhash.xxh3_128()
    if isinstance(value, str):
        h.update(b"p")
        h.update(value.encode("utf-8", "surrogatepass"))
        return h.digest()
    h.update(b"m" + len(value).to_bytes(8, "little"))  # the count: where the tools begin is unambiguous
    for part in (*(text for m in value for text in (m.role, m.content)), tools_json):
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    h.update(bytes([tools_optional]))
    return h.digest()


def _gpt2_byte_chars() -> dict[str, int]:
    """Byte-level BPE vocabularies spell each byte as one printable character: the printable
    Latin-1 bytes as themselves, every other byte as chr(256 + k), k counting them in order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + k): b for k, b in enumerate(others)}}


_BYTE_OF_CHAR = _gpt2_byte_chars()
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece byte fallback


def _token_bytes(token: str, byte_level: bool) -> bytes:
    if byte_level and all(c in _BYTE_OF_CHAR for c in token):
        return bytes(_BYTE_OF_CHAR[c] for c in token)
    if match := _BYTE_TOKEN.fullmatch(token):
        return bytes([int(match.group(1), 16)])
    return token.replace("\u2581", " ").encode()
