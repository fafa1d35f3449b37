"""What the prefill and decode daemons share: options, the engine and its thread,
preprocessing, identity (fingerprint, KV layout) and the link to the router.

RouterLink lifecycle: register (retrying with backoff until the router answers),
then heartbeat the load every interval; a heartbeat answered with `reregister`
(the router restarted or forgot us) registers again; on drain, one last
heartbeat says draining so the router stops placing here at once.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import signal
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import grpc

from pdserve.args import add_engine_args
from pdserve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from pdserve.engine.engine import LLMEngine
from pdserve.engine.engine_loop import EngineLoop
from pdserve.engine.sampling_params import SamplingParams
from pdserve.errors import InvalidRequestError, PdserveError
from pdserve.kv_transfer.codec import fingerprint_str
from pdserve.kv_transfer.protocol import KVGeometry
from pdserve.observability.metrics import Metrics, WorkerState
from pdserve.preprocess import load_preprocessor
from pdserve.server import daemon, observe, tls, wire
from pdserve.server.daemon import channel
from pdserve.status import abort_with
from pdserve.v1 import common_pb2, router_pb2, router_pb2_grpc, tokenize_pb2

log = logging.getLogger("pdserve.worker")


def add_worker_args(p: argparse.ArgumentParser, default_kv_gib: float) -> None:
    p.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (port 0 picks a free one)")
    p.add_argument("--router", default=None, help="router address to register with")
    p.add_argument("--worker-id", default=None, help="stable id (default: a random one)")
    p.add_argument("--version", default="", help="rollout label; the router can split traffic over versions")
    p.add_argument("--preprocess-config", default=None,
                   help='JSON {"chat_template", "version"}; re-read on SIGHUP (default: the model\'s own)')
    p.add_argument("--heartbeat-s", type=float, default=1.0)
    add_engine_args(p)
    p.add_argument("--cpus", default=None, help="CPU affinity, e.g. 0 or 0-1")
    p.add_argument("--kv-cache-gib", type=float, default=default_kv_gib)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="keep no finished prompt's KV for reuse (prefix caching is on by default)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--grace-s", type=float, default=30.0, help="drain time on SIGTERM")
    observe.add_args(p)
    tls.add_args(p)
    p.add_argument("--engine-nice", type=int, default=10,
                   help="OS priority of the compute threads below the I/O thread (0: equal)")
    p.add_argument("--grammar-compile-timeout-s", type=float, default=GRAMMAR_COMPILE_TIMEOUT_S,
                   help="refuse a structured output (schema, regex, grammar) that takes longer to compile")


def engine_config(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(
        model=args.model, dtype=args.dtype, device=args.device, quantization=args.quantization,
        max_model_len=args.max_model_len, compile_max_batch=args.compile_max_batch,
        cache=CacheConfig(block_size=args.block_size, kv_cache_gib=args.kv_cache_gib,
                          enable_prefix_caching=args.prefix_caching),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_num_seqs=args.max_num_seqs),
    )


GRAMMAR_COMPILE_TIMEOUT_S = 10.0


def role_name(role: int) -> str:
    """"prefill" or "decode" for a WorkerRole value."""
    return common_pb2.WorkerRole.Name(role).removeprefix("WORKER_ROLE_").lower()


class WorkerRpcs:
    """The rpcs both worker services answer alike (Stats, Tokenize, Detokenize), for their servicers."""

    worker: Worker

    async def Stats(self, request, context):
        return await self.worker.stats_response()

    async def Tokenize(self, request, context):
        try:
            return self.worker.tokenize(request)
        except PdserveError as exc:
            await abort_with(context, exc)

    async def Detokenize(self, request, context):
        try:
            return self.worker.detokenize(request)
        except PdserveError as exc:
            await abort_with(context, exc)


class Worker:
    """The engine thread and everything a servicer needs to know about this worker."""

    def __init__(self, role: int, engine: LLMEngine, worker_id: str | None = None, engine_nice: int = 0,
                 metrics: Metrics | None = None, version: str = "", preprocess_config: str | None = None,
                 grammar_compile_timeout_s: float = GRAMMAR_COMPILE_TIMEOUT_S) -> None:
        self.role = role
        self.grammar_compile_timeout_s = grammar_compile_timeout_s
        self.role_name = role_name(role)
        self.engine = engine
        self.version = version
        self.preprocess_config = preprocess_config
        self.preprocessor = load_preprocessor(engine.tokenizer, preprocess_config)
        self.metrics = metrics or Metrics(self.role_name)
        self.loop = EngineLoop(engine, nice=engine_nice)
        self.metrics.set_state_callback(self._state)
        self.loop.start()
        self.worker_id = worker_id or f"{self.role_name}-{uuid.uuid4().hex[:8]}"
        fp = engine.loaded.fingerprint
        self.fingerprint_pb = wire.fingerprint_to_pb(fp)
        self.fingerprint = fingerprint_str(self.fingerprint_pb)
        self.layout_pb = wire.layout_to_pb(engine.spec, engine.dtype)
        self.geometry = KVGeometry(engine.spec.num_layers, engine.spec.num_kv_heads, engine.spec.head_dim,
                                   self.layout_pb.dtype)
        self.pending_prefill_tokens = 0
        self.draining = False
        # Run when a stop's grace period is about to end (e.g. move running requests elsewhere).
        self.on_grace_end: list[Callable[[], None]] = []

    def load(self) -> common_pb2.WorkerLoad:
        """The load the router sees, from the snapshot the engine thread published after its last
        step or commands. Never waits for the engine thread: a step can take seconds (a 2048-token
        fp32 prefill took 5 s on 2 cores), and a heartbeat that waited for it came after the
        router's patience (3 heartbeats) and got a busy worker declared dead."""
        s = self.loop.snapshot
        kv = common_pb2.KVStats(block_size=s.block_size, num_total=s.kv.num_total, num_free=s.kv.num_free,
                                num_used=s.kv.num_used, num_cached=s.kv.num_cached,
                                prefix_cache_hit_rate=s.kv.prefix_hit_rate)
        recent = self.metrics.recent.summary()
        return common_pb2.WorkerLoad(num_running_requests=s.num_running, num_waiting_requests=s.num_waiting,
                                     num_pending_prefill_tokens=self.pending_prefill_tokens, kv=kv,
                                     output_tokens_per_s=recent.output_tokens_per_s,
                                     prefill_tokens_per_s=recent.prefill_tokens_per_s,
                                     p99_ttft_ms=recent.p99_ttft_ms, p99_itl_ms=recent.p99_itl_ms)

    def reload_preprocessing(self) -> None:
        """Re-read --preprocess-config (SIGHUP). Requests already tokenized keep their prompts; the
        new version's cache starts empty, so old entries are never used again."""
        try:
            new = load_preprocessor(self.engine.tokenizer, self.preprocess_config)
        except (OSError, PdserveError) as exc:
            log.error("preprocessing not reloaded, the old one stays: %s", exc)
            return
        old, self.preprocessor = self.preprocessor, new
        log.info("preprocessing reloaded: version %s -> %s", old.version, new.version)

    def _state(self) -> WorkerState:
        """What the metrics endpoint shows, from the engine's last snapshot."""
        s = self.loop.snapshot
        return WorkerState(
            kv_blocks_total=s.kv.num_total, kv_blocks_used=s.kv.num_used, kv_blocks_cached=s.kv.num_cached,
            kv_fragmentation=s.kv_fragmentation, prefix_cache_hit_rate=s.kv.prefix_hit_rate,
            preprocess_cache_hit_rate=self.preprocessor.cache.hit_rate, batch_fill_rate=s.batch_fill_rate,
            num_running=s.num_running, num_waiting=s.num_waiting)

    async def compile_grammar(self, params: SamplingParams, request_id: str) -> None:
        """Have the request's structured output compiled (EngineLoop.compile_grammar) before it is
        submitted; InvalidRequestError if it does not compile, or not within the deadline."""
        if params.structured_output is None:
            return
        try:
            await asyncio.wait_for(asyncio.wrap_future(self.loop.compile_grammar(params)),
                                   self.grammar_compile_timeout_s)
        except asyncio.TimeoutError:
            raise InvalidRequestError(params.structured_output.field, f"did not compile within "
                                      f"{self.grammar_compile_timeout_s:g} s (--grammar-compile-timeout-s)",
                                      request_id=request_id) from None

    async def stats_response(self) -> common_pb2.StatsResponse:
        # Exact, after every command queued before it (tests and `pdserve top` read it): it waits
        # for the engine thread, which heartbeats must not.
        await asyncio.wrap_future(self.loop.refresh_snapshot())
        return common_pb2.StatsResponse(worker_id=self.worker_id, role=self.role, load=self.load())

    def tokenize(self, request: tokenize_pb2.TokenizeRequest) -> tokenize_pb2.TokenizeResponse:
        """Tokenize, by the preprocessing this worker's generate requests go through (InvalidRequestError)."""
        return wire.tokenize_to_pb(request, self.preprocessor, max_model_len=self.engine.max_model_len,
                                   worker_id=self.worker_id)

    def detokenize(self, request: tokenize_pb2.DetokenizeRequest) -> tokenize_pb2.DetokenizeResponse:
        text = self.preprocessor.detokenize(request.token_ids, request.request_id or None)
        return tokenize_pb2.DetokenizeResponse(text=text, worker_id=self.worker_id)

    def close(self) -> None:
        self.loop.stop()


@dataclass
class RouterLink:
    worker: Worker
    router_address: str
    own_address: str
    heartbeat_s: float = 1.0

    def __post_init__(self) -> None:
        self._channel = channel(self.router_address)
        self._stub = router_pb2_grpc.RouterServiceStub(self._channel)
        self._task: asyncio.Task | None = None
        self._registered_version = ""

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="router-link")

    async def drain(self) -> None:
        """Tell the router at once that no new work should come here."""
        self.worker.draining = True
        await self._stub.Heartbeat(router_pb2.HeartbeatRequest(
            worker_id=self.worker.worker_id, load=self.worker.load(), draining=True), timeout=2.0)

    async def _register(self) -> None:
        w = self.worker
        request = router_pb2.RegisterRequest(
            worker_id=w.worker_id, role=w.role, address=self.own_address, model=w.fingerprint_pb,
            preprocessing_version=w.preprocessor.version, kv_layout=w.layout_pb, load=w.load(),
            version=w.version)
        response = await self._stub.Register(request, timeout=5.0)
        w.worker_id = response.worker_id or w.worker_id
        self._registered_version = request.preprocessing_version
        log.info("registered with router %s as %s", self.router_address, w.worker_id)

    async def _run(self) -> None:
        registered = False
        backoff = 0.1
        while True:
            try:
                if registered and self.worker.preprocessor.version != self._registered_version:
                    registered = False  # reloaded preprocessing: the router must pair by the new version
                if not registered:
                    await self._register()
                    registered, backoff = True, 0.1
                response = await self._stub.Heartbeat(router_pb2.HeartbeatRequest(
                    worker_id=self.worker.worker_id, load=self.worker.load(),
                    draining=self.worker.draining), timeout=max(2.0, self.heartbeat_s))
                registered = not response.reregister
                await asyncio.sleep(self.heartbeat_s)
            except grpc.aio.AioRpcError as exc:
                log.warning("router %s: %s; retrying in %.1f s", self.router_address, exc.code().name, backoff)
                registered = False
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)


def run_worker(args: argparse.Namespace, role: int, service_name: str,
               add_servicer: Callable[[Worker, object], None]) -> None:
    """A worker daemon's main: logging, process settings, engine, server, router link, drain."""
    name = role_name(role)
    daemon.setup_logging(f"{name}[{os.getpid()}]")

    async def serve() -> int:
        daemon.apply_process_settings(args.threads, args.cpus)
        daemon.configure_tls(tls.TlsFiles.from_args(args))
        metrics = observe.start(name, args)
        worker = Worker(role, LLMEngine(engine_config(args)), args.worker_id, args.engine_nice, metrics,
                        args.version, args.preprocess_config, args.grammar_compile_timeout_s)
        # What loading made (modules, tokenizer tables) lives as long as the process: out of the
        # collector's sight, so that its full collections, which stall the I/O thread, stay short.
        gc.collect()
        gc.freeze()
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, worker.reload_preprocessing)
        d = daemon.Daemon(name, args.listen, args.grace_s, metrics)
        loop = asyncio.get_running_loop()
        worker.loop.on_failure = lambda exc: loop.call_soon_threadsafe(d.fail, f"engine thread died: {exc!r}")
        add_servicer(worker, d.server)
        address = await d.start([service_name])
        if args.router:
            link = RouterLink(worker, args.router, address, args.heartbeat_s)
            link.start()
            d.on_drain(link.drain)
        d.on_grace_end(lambda: [fn() for fn in worker.on_grace_end])
        try:
            await d.run_until_signal()
        finally:
            worker.close()
        return d.exit_code

    daemon.run(serve)
