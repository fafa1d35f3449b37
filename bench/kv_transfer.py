"""KV transfer through pdserve's Prefill stream, against a bare gRPC stream, a memory copy and the TTFT.

Usage: python bench/kv_transfer.py [--tokens 256,1024,4096] [--rounds N] [--ttft-rounds N]
                                   [--model PATH]

Starts, as separate processes on loopback: a prefill daemon pinned to core 0 and a
decode daemon pinned to core 1 (`--cpus 0` / `--cpus 1`, `--threads 1` each, the
engine's dtype for the CPU or --dtype, `--max-model-len 8192`, no router), and a bare gRPC server (this script with
--serve-raw) pinned to core 0. This process is the receiving end of the transfers and
runs on core 1 (as the decode daemon would), on uvloop, with one torch thread. All
processes run with the daemons' malloc settings (pdserve/allocator.py).
Prompts are random token ids in [0, --vocab-size) sent as prompt_token_ids,
max_tokens=1, greedy. Prints one JSON object per prompt length on stdout (progress and
diagnostics go to stderr):
    {"tokens", "bytes", "transfer_s", "bytes_per_s", "ratio_grpc_raw", "ratio_copy",
     "ttft_s", "ttft_local_s", "ttft_share", "ttft_disagg_over_local"}
Transfer figures are medians over --rounds rounds (default 5), TTFT figures over
--ttft-rounds (default 3: a cold 4096-token prefill takes 12-16 s on one core); within a
round the three transfers run back to back in a rotating order, and so do the TTFTs, so
that drift between rounds hits both sides of each ratio alike. Caveat: the two sides of
ttft_disagg_over_local prefill in two different processes, and on these VMs processes
differ by 10-20% in compute speed; the stderr diagnostic below separates that from the
cost of the remote path.

Figures
- bytes: the prompt's KV, K and V of every layer and token, as the header announces it
  (23,040 bytes per token for SmolLM2-135M in bf16, twice that in fp32).
- transfer_s: pdserve's Prefill stream of a KV that is already computed. Before the
  rounds, the prompt is prefilled once through the same stream (untimed), which puts
  all its full blocks in the prefill daemon's prefix cache; each round then sends the
  same prompt again: the daemon streams every layer's KV from its cache and computes
  only the tokens after the last full block (16 at most; none for the block-aligned
  default lengths, whose last position's logits the daemon keeps). Timed: from just
  before the call is made to the moment the last KV chunk (received bytes == the
  header's num_kv_bytes) has been parsed and checked the way `DecodeServicer._pull`
  does it: through kv_transfer's gRPC source (chunks decoded as views of the message) and
  pull loop, the header through a `KVReceiver`, the skip sent back (none: this client holds
  no prefix), and each chunk through `KVReceiver.on_chunk` (sequence number, ranges, byte
  counts, payload checksum, k/v viewed as [Hkv, T, D] tensors). Not timed: the decode daemon's
  write of the tensors into its own blocks, and the FirstToken message that follows the KV.
- bytes_per_s = bytes / transfer_s.
- ratio_grpc_raw = raw_s / transfer_s, where raw_s is a bare grpc.aio server-streaming
  call (generic handler, raw bytes, no protobuf) to the raw server, which yields
  messages pre-built before the call with exactly the sizes of the k_bytes + v_bytes
  of the chunks pdserve sent for this prompt (channel and server options as pdserve's
  daemons use them), timed from the call to the last message received: what the
  transport allows. 1.0 means pdserve streams as fast as the bare transport.
- ratio_copy = copy_s / transfer_s, where copy_s is one in-process copy of the same
  number of bytes (`dst.copy_(src)` of uint8 tensors, dst touched once before, one
  thread): the memory floor.
- ttft_s / ttft_local_s: time to first token measured by this client on the decode
  daemon's Generate stream, from just before the call to the first TokenDelta, for a
  fresh random prompt every time (in neither daemon's prefix cache: COLD). ttft_s:
  remote, the prefill daemon as the only prefill candidate (the result must say
  PREFILL_MODE_REMOTE); ttft_local_s: no candidate, the decode daemon prefills itself
  (PREFILL_MODE_LOCAL). Both prefills run on one thread of one core.
- ttft_share = transfer_s / ttft_s: the share of the remote TTFT a transfer of an
  already-computed KV would take, were it not overlapped with compute.
- ttft_disagg_over_local = ttft_s / ttft_local_s.
- (stderr only) direct: in the same TTFT rounds, a cold prompt pulled straight from the
  prefill daemon by this client; its first-token time is the prefill daemon's compute
  plus the stream. remote TTFT minus it is the cost of the decode hop (header, block
  reservation, KV writes, first token forwarded); it over local TTFT compares the two
  daemons' prefill speed.

The daemons' logs go to a temporary file named on stderr. Before the rounds of each
length, untimed: one local generation of that length, one short remote generation (the
decode daemon's channel to the prefill daemon), the first pull of the transfer prompt
(a cold prefill of that length on the prefill daemon) and 8 warm pulls and raw streams
warm both daemons and this process. A run of the
default lengths takes about four minutes. Diagnostics on
stderr: each pull's timeline (header, first chunk, last chunk, first token) and this
process's CPU time per pdserve pull and per raw stream (the receiving side's cost).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

PREFILL_CPU = 0
DECODE_CPU = 1
RAW_SERVICE = "/pdserve.bench.RawStream/Stream"
WARM_PULLS = 8  # untimed pulls and raw streams before each length's rounds


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- the bare gRPC server (a child process: this script with --serve-raw) ----------------


async def serve_raw() -> None:
    """Yield pre-built bytes messages; the request is a JSON list of message sizes."""
    import grpc

    from pdserve.server.daemon import SERVER_OPTIONS

    built: dict[str, list[bytes]] = {}

    def messages(request: bytes) -> list[bytes]:
        key = request.decode()
        if key not in built:
            built.clear()
            built[key] = [os.urandom(size) for size in json.loads(key)]
        return built[key]

    async def stream(request: bytes, context):
        for message in messages(request):
            yield message

    handler = grpc.method_handlers_generic_handler(
        "pdserve.bench.RawStream", {"Stream": grpc.unary_stream_rpc_method_handler(stream)})
    server = grpc.aio.server(options=SERVER_OPTIONS)
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    print(json.dumps({"ready": True, "address": f"127.0.0.1:{port}"}), flush=True)
    await server.wait_for_termination()


def start_raw_server(log_file) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, os.path.abspath(__file__), "--serve-raw"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log_file, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{") and '"ready"' in line:
            return proc, json.loads(line)["address"]
    raise RuntimeError(f"raw server exited with {proc.wait()}")


# -- the three transfers ---------------------------------------------------------------------


@dataclass
class Pull:
    """One Prefill stream as this client saw it; times in seconds from the call."""

    transfer_s: float = 0.0  # last KV chunk parsed
    header_s: float = 0.0
    first_chunk_s: float = 0.0
    first_token_s: float = 0.0
    num_bytes: int = 0
    chunk_sizes: list[int] = field(default_factory=list)  # k + v bytes of each chunk
    num_cached_tokens: int = 0


class TimedSource:
    """A KVSource that notes, for a Pull, when each message arrives (seconds from t0)."""

    def __init__(self, source, pull: Pull, t0: float) -> None:
        self.source, self.pull, self.t0 = source, pull, t0

    async def next(self):
        from pdserve.kv_transfer.receiver import KVHeaderData
        from pdserve.kv_transfer.transport import KVFirstToken

        msg = await self.source.next()
        elapsed = time.perf_counter() - self.t0
        if isinstance(msg, KVHeaderData):
            self.pull.header_s = elapsed
        elif isinstance(msg, KVFirstToken):
            self.pull.first_token_s = elapsed
            self.pull.num_cached_tokens = msg.num_cached_tokens
        else:
            self.pull.first_chunk_s = self.pull.first_chunk_s or elapsed
            self.pull.chunk_sizes.append(len(msg.k_bytes) + len(msg.v_bytes))
            self.pull.num_bytes += self.pull.chunk_sizes[-1]
        return msg

    async def skip(self, num_cached_tokens: int) -> None:
        await self.source.skip(num_cached_tokens)

    def abort(self) -> None:
        self.source.abort()


_identity: dict[int, tuple] = {}  # id(stub) -> the prefill daemon's (fingerprint, KV geometry), from a header


async def pull_kv(stub, prompt: list[int]) -> Pull:
    """Pull a prompt's KV through the Prefill stream as a decode daemon does (kv_transfer's gRPC
    source and pull loop, every chunk checked before it counts), writing nowhere."""
    import asyncio

    import torch

    from pdserve.kv_transfer import transport
    from pdserve.kv_transfer.receiver import KVReceiver
    from pdserve.v1 import prefill_pb2

    def open_stream():
        rid = uuid.uuid4().hex
        return rid, stub.open(prefill_pb2.PrefillRequest(request=generate_request(rid, prompt)), timeout=120)

    if id(stub) not in _identity:  # a decode daemon knows its own; this client reads a header's
        _, source = open_stream()
        header = await source.next()
        source.abort()
        _identity[id(stub)] = (header.fingerprint, header.geometry)
    fingerprint, geometry = _identity[id(stub)]
    pull = Pull()
    t0 = time.perf_counter()
    rid, source = open_stream()
    receiver = KVReceiver(rid, prompt, fingerprint, geometry, getattr(torch, geometry.dtype))

    async def reserve(_prompt: list[int]) -> int:  # this client holds no prefix: everything is sent
        return 0

    def write(parts) -> asyncio.Future:  # checked, then dropped; timed once the last chunk is
        pull.transfer_s = time.perf_counter() - t0
        done = asyncio.get_running_loop().create_future()
        done.set_result(None)
        return done

    await transport.pull(TimedSource(source, pull, t0), receiver, reserve, write, stall_s=120.0)
    return pull


async def raw_stream(call, sizes: list[int]) -> float:
    request = json.dumps(sizes).encode()
    num_bytes = 0
    t0 = time.perf_counter()
    async for message in call(request, timeout=120):
        num_bytes += len(message)
    elapsed = time.perf_counter() - t0
    if num_bytes != sum(sizes):
        raise RuntimeError(f"raw stream carried {num_bytes} bytes, expected {sum(sizes)}")
    return elapsed


def copy_s(num_bytes: int) -> float:
    import torch

    src = torch.randint(0, 256, (num_bytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    dst.copy_(src)  # first touch of dst's pages: page faults are not the copy
    t0 = time.perf_counter()
    dst.copy_(src)
    return time.perf_counter() - t0


# -- TTFT on the decode daemon ---------------------------------------------------------------


def generate_request(rid: str, prompt: list[int]):
    from pdserve.v1 import common_pb2

    return common_pb2.GenerateRequest(
        request_id=rid, prompt_token_ids=common_pb2.TokenIds(token_ids=prompt),
        sampling_params=common_pb2.SamplingParams(max_tokens=1, temperature=0.0))


@dataclass
class Generation:
    ttft_s: float
    kv_transfer_ms: float  # as the decode daemon reports it (remote only)


async def generate(stub, prompt: list[int], prefill_address: str | None) -> Generation:
    from pdserve.v1 import common_pb2, decode_pb2

    candidates = [decode_pb2.PrefillCandidate(address=prefill_address)] if prefill_address else []
    request = decode_pb2.DecodeGenerateRequest(request=generate_request(uuid.uuid4().hex, prompt),
                                               prefill_candidates=candidates)
    ttft_s = None
    t0 = time.perf_counter()
    async for msg in stub.Generate(request, timeout=300):
        if msg.WhichOneof("kind") == "delta" and ttft_s is None:
            ttft_s = time.perf_counter() - t0
        elif msg.WhichOneof("kind") == "result":
            mode = msg.result.prefill_mode
            want = common_pb2.PREFILL_MODE_REMOTE if prefill_address else common_pb2.PREFILL_MODE_LOCAL
            if mode != want:
                raise RuntimeError(f"prefill mode {common_pb2.PrefillMode.Name(mode)}, expected "
                                   f"{common_pb2.PrefillMode.Name(want)}")
            if ttft_s is None:
                raise RuntimeError("no TokenDelta before the result")
            return Generation(ttft_s, msg.result.timings.kv_transfer_ms)
    raise RuntimeError("the Generate stream ended without a result")


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Setup:
    prefill_address: str
    prefill_stub: object
    decode_stub: object
    raw_call: Callable
    vocab_size: int
    rng: random.Random

    def prompt(self, num_tokens: int) -> list[int]:
        return [self.rng.randrange(self.vocab_size) for _ in range(num_tokens)]


async def in_rotation(rounds: int, jobs: dict[str, Callable[[], Awaitable[float]]]) -> dict[str, list[float]]:
    """Each round runs every job once, the starting job rotating; the samples per job."""
    names = list(jobs)
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            samples[name].append(await jobs[name]())
    return samples


async def warm_prompt(setup: Setup, num_tokens: int) -> tuple[list[int], Pull]:
    """Untimed warm-up; a prompt whose full blocks are in the prefill daemon's prefix cache.

    A local prefill of this length, the decode daemon's channel to the prefill daemon
    (a short prompt), then the prompt's cold prefill on the prefill daemon and WARM_PULLS
    warm pulls and raw streams: a process's first transfers of a size page-fault the heap
    that its later ones reuse (measured: 500-1300 minor faults and +10 ms per 256-token
    pull during the first 4-6 pulls, none afterwards), and the figures are of the steady state.
    """
    await generate(setup.decode_stub, setup.prompt(num_tokens), None)
    await generate(setup.decode_stub, setup.prompt(32), setup.prefill_address)
    prompt = setup.prompt(num_tokens)
    cold = await pull_kv(setup.prefill_stub, prompt)
    for _ in range(WARM_PULLS):
        warm = await pull_kv(setup.prefill_stub, prompt)
        if warm.num_cached_tokens < num_tokens - 16:
            raise RuntimeError(f"only {warm.num_cached_tokens} of {num_tokens} tokens came from the prefix cache")
        await raw_stream(setup.raw_call, warm.chunk_sizes)  # the raw server builds its messages
    log(f"[{num_tokens}] cold pull {cold.transfer_s:.3f} s; {len(warm.chunk_sizes)} chunks of up to "
        f"{max(warm.chunk_sizes)} bytes; {warm.num_cached_tokens} tokens cached")
    return prompt, warm


async def measure_transfers(setup: Setup, num_tokens: int, rounds: int) -> tuple[dict[str, float], int]:
    """Median seconds of the pdserve pull, the raw stream and the copy; the KV's byte count."""
    prompt, warm = await warm_prompt(setup, num_tokens)
    pulls: list[Pull] = []
    cpu_s: dict[str, list[float]] = {"pdserve": [], "raw": []}

    async def pdserve_job() -> float:
        cpu0 = time.process_time()
        pulls.append(await pull_kv(setup.prefill_stub, prompt))
        cpu_s["pdserve"].append(time.process_time() - cpu0)
        return pulls[-1].transfer_s

    async def raw_job() -> float:
        cpu0 = time.process_time()
        elapsed = await raw_stream(setup.raw_call, warm.chunk_sizes)
        cpu_s["raw"].append(time.process_time() - cpu0)
        return elapsed

    async def copy_job() -> float:
        return copy_s(warm.num_bytes)

    t = await in_rotation(rounds, {"pdserve": pdserve_job, "raw": raw_job, "copy": copy_job})
    for p in pulls:
        log(f"[{num_tokens}] pull: header {p.header_s * 1e3:.1f} ms, first chunk {p.first_chunk_s * 1e3:.1f} ms, "
            f"last chunk {p.transfer_s * 1e3:.1f} ms, first token {p.first_token_s * 1e3:.1f} ms")
    log(f"[{num_tokens}] raw ms {[round(x * 1e3, 1) for x in t['raw']]}, "
        f"copy ms {[round(x * 1e3, 2) for x in t['copy']]}")
    log(f"[{num_tokens}] receiver CPU ms per pdserve pull {[round(x * 1e3, 1) for x in cpu_s['pdserve']]}, "
        f"per raw stream {[round(x * 1e3, 1) for x in cpu_s['raw']]}")
    return {name: statistics.median(xs) for name, xs in t.items()}, warm.num_bytes


async def measure_ttft(setup: Setup, num_tokens: int, rounds: int) -> dict[str, float]:
    """Median TTFT, remote and local, of fresh prompts; logs the direct-pull diagnostic."""
    gens: dict[str, list[Generation]] = {"remote": [], "local": []}

    def ttft_job(mode: str) -> Callable[[], Awaitable[float]]:
        async def job() -> float:
            address = setup.prefill_address if mode == "remote" else None
            gens[mode].append(await generate(setup.decode_stub, setup.prompt(num_tokens), address))
            return gens[mode][-1].ttft_s
        return job

    async def direct_job() -> float:
        return (await pull_kv(setup.prefill_stub, setup.prompt(num_tokens))).first_token_s

    t = await in_rotation(rounds, {"remote": ttft_job("remote"), "local": ttft_job("local"), "direct": direct_job})
    med = {name: statistics.median(xs) for name, xs in t.items()}
    log(f"[{num_tokens}] ttft remote ms {[round(x * 1e3) for x in t['remote']]}, "
        f"local ms {[round(x * 1e3) for x in t['local']]}, decode-reported kv_transfer_ms "
        f"{[round(g.kv_transfer_ms) for g in gens['remote']]}")
    log(f"[{num_tokens}] first token of a cold Prefill stream pulled straight from the prefill daemon ms "
        f"{[round(x * 1e3) for x in t['direct']]}: remote TTFT minus it (the decode hop) "
        f"{(med['remote'] - med['direct']) * 1e3:.0f} ms; it over local TTFT "
        f"{med['direct'] / med['local']:.3f} (the two daemons' prefill speed)")
    return med


async def measure_length(setup: Setup, num_tokens: int, rounds: int, ttft_rounds: int) -> dict:
    t, num_bytes = await measure_transfers(setup, num_tokens, rounds)
    ttft = await measure_ttft(setup, num_tokens, ttft_rounds)
    transfer_s = t["pdserve"]
    return {
        "tokens": num_tokens, "bytes": num_bytes, "transfer_s": round(transfer_s, 5),
        "bytes_per_s": round(num_bytes / transfer_s), "ratio_grpc_raw": round(t["raw"] / transfer_s, 3),
        "ratio_copy": round(t["copy"] / transfer_s, 4), "ttft_s": round(ttft["remote"], 4),
        "ttft_local_s": round(ttft["local"], 4), "ttft_share": round(transfer_s / ttft["remote"], 4),
        "ttft_disagg_over_local": round(ttft["remote"] / ttft["local"], 3),
    }


def daemon_args(cpu: int, args: argparse.Namespace) -> list[str]:
    dtype = ["--dtype", args.dtype] if args.dtype else []  # none: the engine's default for this CPU
    out = [*dtype, "--listen", "127.0.0.1:0", "--kv-cache-gib", str(args.kv_cache_gib),
           "--threads", "1", "--cpus", str(cpu), "--max-model-len", str(args.max_model_len), "--grace-s", "2"]
    return out + (["--model", args.model] if args.model else [])


async def run(args: argparse.Namespace, prefill_address: str, decode_address: str, raw_address: str) -> None:
    from pdserve.server.daemon import channel
    from pdserve.kv_transfer.grpc_stream import PrefillStub
    from pdserve.v1 import decode_pb2_grpc

    raw_channel = channel(raw_address)
    raw_call = raw_channel.unary_stream(RAW_SERVICE)  # no serializers: bytes in, bytes out
    setup = Setup(prefill_address, PrefillStub(channel(prefill_address)),
                  decode_pb2_grpc.DecodeServiceStub(channel(decode_address)), raw_call, args.vocab_size,
                  random.Random(args.seed))
    for num_tokens in args.tokens:
        started = time.monotonic()
        row = await measure_length(setup, num_tokens, args.rounds, args.ttft_rounds)
        print(json.dumps(row), flush=True)
        log(f"[{num_tokens}] done in {time.monotonic() - started:.0f} s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="256,1024,4096", help="prompt lengths, comma-separated")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the transfers")
    p.add_argument("--ttft-rounds", type=int, default=3, help="rounds of the (slow) TTFT measurements")
    p.add_argument("--model", default=None, help="model path (default: the daemons' SmolLM2)")
    p.add_argument("--vocab-size", type=int, default=49152, help="prompt token ids are drawn below this")
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--kv-cache-gib", type=float, default=2.0, help="per daemon")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="the daemons' dtype (default: bfloat16 where the CPU has it "
                                                 "natively, float32 where bf16 would be emulated)")
    p.add_argument("--serve-raw", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.tokens = [int(x) for x in args.tokens.split(",")]
    if args.rounds < 1 or args.ttft_rounds < 1 or any(n < 2 for n in args.tokens):
        p.error("--rounds and --ttft-rounds must be >= 1 and every --tokens length >= 2")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import uvloop

    from pdserve.allocator import tune_malloc

    tune_malloc()  # the raw server and the receiving end run with the daemons' malloc settings

    if args.serve_raw:
        os.sched_setaffinity(0, {PREFILL_CPU})  # before any thread starts (not a preexec_fn: unsafe with threads)
        uvloop.run(serve_raw())
        return
    from pdserve.cluster import Child

    os.sched_setaffinity(0, {DECODE_CPU})
    import torch

    torch.set_num_threads(1)
    log_file = tempfile.NamedTemporaryFile("w", prefix="kv_transfer-", suffix=".log", delete=False)
    log(f"daemon logs: {log_file.name}")
    prefill = Child("prefill", daemon_args(PREFILL_CPU, args))
    decode = Child("decode", daemon_args(DECODE_CPU, args))
    raw = None
    try:
        prefill.start(log_file)
        decode.start(log_file)
        raw, raw_address = start_raw_server(log_file)
        addresses = prefill.wait_ready(300), decode.wait_ready(300)
        uvloop.run(run(args, *addresses, raw_address))
    finally:
        prefill.stop(5)
        decode.stop(5)
        if raw is not None:
            raw.terminate()
            raw.wait(5)
        log_file.close()


if __name__ == "__main__":
    main()
