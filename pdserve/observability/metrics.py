"""Per-daemon metrics: OpenTelemetry instruments exposed in the Prometheus text format.

`start_metrics(role, port)` builds one `Metrics` per daemon with its own
MeterProvider and Prometheus registry (no global state, so several daemons can
share a test process). With a port it serves `/metrics` on a daemon thread.
Recording methods take plain numbers and are thread-safe (the engine thread may
call them). Every series carries the label `role` (prefill, decode or router).

Exposed names (Prometheus adds `_total` to counters and the unit to the name):

Histograms (seconds; `_bucket`, `_count`, `_sum`):
    pdserve_time_to_first_token_seconds      request arrival -> first token out
    pdserve_inter_token_latency_seconds      between consecutive tokens of a request
    pdserve_e2e_latency_seconds              request arrival -> last message out
    pdserve_queue_time_seconds               waiting for the scheduler
    pdserve_kv_transfer_seconds              one request's KV transfer
Counters:
    pdserve_requests_total{finish_reason, status_code}   finished requests
    pdserve_prompt_tokens_total, pdserve_generation_tokens_total
    pdserve_kv_transfer_bytes_total
    pdserve_kv_transfer_retries_total
    pdserve_preemptions_total
    pdserve_preprocessing_failures_total
    pdserve_decode_timeouts_total
    pdserve_slow_reader_aborts_total         requests whose client stopped reading
    pdserve_migrations_total                 requests moved to another decode worker mid-generation
    pdserve_process_cpu_seconds_total        user + system CPU of this process
Gauges (from the daemon's `WorkerState` callback, read once per scrape; a field
left None is not exported):
    pdserve_kv_cache_capacity_blocks, pdserve_kv_cache_used_blocks,
    pdserve_kv_cache_cached_blocks, pdserve_kv_cache_usage_ratio (used / capacity),
    pdserve_kv_cache_fragmentation_ratio, pdserve_prefix_cache_hit_ratio,
    pdserve_preprocess_cache_hit_ratio, pdserve_batch_fill_ratio,
    pdserve_running_requests, pdserve_waiting_requests
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from opentelemetry.exporter.prometheus import PrometheusMetricReader
from opentelemetry.metrics import CallbackOptions, Observation
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.resources import Resource
from prometheus_client import CollectorRegistry, generate_latest, start_http_server

__all__ = ["ROLES", "Metrics", "Recent", "RecentWindow", "WorkerState", "start_metrics"]

log = logging.getLogger("pdserve.metrics")

ROLES = ("prefill", "decode", "router")

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
KV_TRANSFER_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class WorkerState:
    """A daemon's current state, returned by its state callback; None: not applicable."""

    kv_blocks_total: int | None = None
    kv_blocks_used: int | None = None
    # Free blocks still holding prefix-cache KV (reusable until evicted).
    kv_blocks_cached: int | None = None
    # Fraction of slots in allocated blocks that hold no token.
    kv_fragmentation: float | None = None
    prefix_cache_hit_rate: float | None = None
    preprocess_cache_hit_rate: float | None = None
    # Running tokens / the step's token budget.
    batch_fill_rate: float | None = None
    num_running: int | None = None
    num_waiting: int | None = None

    @property
    def kv_usage(self) -> float | None:
        if self.kv_blocks_used is None or not self.kv_blocks_total:
            return None
        return self.kv_blocks_used / self.kv_blocks_total


StateCallback = Callable[[], WorkerState]

# (exposed name, unit, description, WorkerState reader)
_GAUGES: tuple[tuple[str, str, str, Callable[[WorkerState], float | None]], ...] = (
    ("pdserve_kv_cache_capacity_blocks", "{block}", "KV-cache blocks in the pool", lambda s: s.kv_blocks_total),
    ("pdserve_kv_cache_used_blocks", "{block}", "KV-cache blocks held by requests", lambda s: s.kv_blocks_used),
    ("pdserve_kv_cache_cached_blocks", "{block}", "Free KV-cache blocks still holding prefix KV",
     lambda s: s.kv_blocks_cached),
    ("pdserve_kv_cache_usage_ratio", "1", "Used / capacity KV-cache blocks", lambda s: s.kv_usage),
    ("pdserve_kv_cache_fragmentation_ratio", "1", "Fraction of allocated KV slots holding no token",
     lambda s: s.kv_fragmentation),
    ("pdserve_prefix_cache_hit_ratio", "1", "Prompt tokens served by the prefix cache",
     lambda s: s.prefix_cache_hit_rate),
    ("pdserve_preprocess_cache_hit_ratio", "1", "Preprocessing cache hits per lookup",
     lambda s: s.preprocess_cache_hit_rate),
    ("pdserve_batch_fill_ratio", "1", "Running tokens / token budget of the last step", lambda s: s.batch_fill_rate),
    ("pdserve_running_requests", "{request}", "Requests in the running batch", lambda s: s.num_running),
    ("pdserve_waiting_requests", "{request}", "Requests waiting to be scheduled", lambda s: s.num_waiting),
)


class _StateSnapshot:
    """A Prometheus collector that exports nothing. Registered before the OpenTelemetry
    reader, it calls the daemon's callback once per scrape, so all gauges of one
    scrape come from the same WorkerState."""

    def __init__(self) -> None:
        self.callback: StateCallback | None = None
        self.state: WorkerState | None = None
        self._failed = False

    def collect(self) -> Iterable[object]:
        callback = self.callback
        if callback is None:
            return []
        try:
            self.state = callback()
            self._failed = False
        except Exception:  # a broken callback must not break the scrape
            if not self._failed:
                log.warning("metrics state callback failed", exc_info=True)
            self._failed = True
            self.state = None
        return []


@dataclass(frozen=True, slots=True)
class Recent:
    """The last RecentWindow.window_s seconds at a glance (workers report it for `pdserve top`)."""

    output_tokens_per_s: float = 0.0
    prefill_tokens_per_s: float = 0.0
    p99_ttft_ms: float = 0.0
    p99_itl_ms: float = 0.0


class RecentWindow:
    """Token counts and latencies of the last `window_s` seconds; thread-safe, bounded."""

    def __init__(self, window_s: float = 60.0, max_samples: int = 20_000,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window_s = window_s
        self._clock = clock
        self._started = clock()
        self._lock = threading.Lock()
        self._series: dict[str, deque[tuple[float, float]]] = {
            name: deque(maxlen=max_samples) for name in ("output", "prefill", "ttft", "itl")}

    def add(self, series: str, value: float) -> None:
        with self._lock:
            self._series[series].append((self._clock(), value))

    def summary(self) -> Recent:
        now = self._clock()
        with self._lock:
            values = {}
            for name, samples in self._series.items():
                while samples and samples[0][0] < now - self.window_s:
                    samples.popleft()
                values[name] = [v for _, v in samples]
        span = max(1e-9, min(self.window_s, now - self._started))
        p99 = lambda xs: float(sorted(xs)[min(len(xs) - 1, int(0.99 * len(xs)))]) * 1e3 if xs else 0.0  # noqa: E731
        return Recent(sum(values["output"]) / span, sum(values["prefill"]) / span, p99(values["ttft"]),
                      p99(values["itl"]))


class Metrics:
    """The instruments of one daemon; see the module docstring for the exposed names."""

    def __init__(self, role: str) -> None:
        if role not in ROLES:
            raise ValueError(f"metrics role: {role!r} is not one of {', '.join(ROLES)}")
        self.role = role
        self.port: int | None = None
        self._attrs = {"role": role}
        self._registry = CollectorRegistry()
        self._snapshot = _StateSnapshot()
        self._registry.register(self._snapshot)  # type: ignore[arg-type]  # first: see _StateSnapshot
        reader = PrometheusMetricReader(disable_target_info=True, scope_info_enabled=False, registry=self._registry)
        self._provider = MeterProvider(metric_readers=[reader], resource=Resource({"service.name": f"pdserve-{role}"}))
        self._http: object | None = None
        self._closed = False
        self.recent = RecentWindow()
        self._create_instruments()

    def _create_instruments(self) -> None:
        m = self._provider.get_meter("pdserve")

        def histogram(name: str, description: str, buckets: tuple[float, ...]):
            return m.create_histogram(name, unit="s", description=description,
                                      explicit_bucket_boundaries_advisory=buckets)

        self._ttft = histogram("pdserve_time_to_first_token_seconds", "Time to first token", LATENCY_BUCKETS_S)
        self._itl = histogram("pdserve_inter_token_latency_seconds", "Time between tokens", ITL_BUCKETS_S)
        self._e2e = histogram("pdserve_e2e_latency_seconds", "Request end-to-end latency", LATENCY_BUCKETS_S)
        self._queue = histogram("pdserve_queue_time_seconds", "Time waiting for the scheduler", LATENCY_BUCKETS_S)
        self._kv_time = histogram("pdserve_kv_transfer_seconds", "KV transfer time per request",
                                  KV_TRANSFER_BUCKETS_S)
        self._requests = m.create_counter("pdserve_requests", "{request}", "Finished requests")
        self._prompt_tokens = m.create_counter("pdserve_prompt_tokens", "{token}", "Prompt tokens of finished requests")
        self._output_tokens = m.create_counter("pdserve_generation_tokens", "{token}", "Generated tokens")
        self._kv_bytes = m.create_counter("pdserve_kv_transfer_bytes", "By", "KV bytes transferred")
        self._kv_retries = m.create_counter("pdserve_kv_transfer_retries", "{retry}", "KV transfer retries")
        self._preemptions = m.create_counter("pdserve_preemptions", "{preemption}", "Preempted requests")
        self._preprocess_failures = m.create_counter("pdserve_preprocessing_failures", "{request}",
                                                     "Requests whose preprocessing failed")
        self._decode_timeouts = m.create_counter("pdserve_decode_timeouts", "{request}",
                                                 "Requests that hit their deadline while decoding")
        self._slow_readers = m.create_counter("pdserve_slow_reader_aborts", "{request}",
                                              "Requests aborted because their client stopped reading")
        self._migrations = m.create_counter("pdserve_migrations", "{migration}",
                                            "Requests moved to another decode worker mid-generation")
        # Series exist from startup, so rate() over a fresh daemon is 0 rather than absent.
        for counter in (self._prompt_tokens, self._output_tokens, self._kv_bytes, self._kv_retries,
                        self._preemptions, self._preprocess_failures, self._decode_timeouts,
                        self._slow_readers, self._migrations):
            counter.add(0, self._attrs)
        m.create_observable_counter("pdserve_process_cpu_seconds", [self._observe_cpu], "s",
                                    "User and system CPU time of this process")
        for name, unit, description, read in _GAUGES:
            m.create_observable_gauge(name, [self._gauge_callback(read)], unit, description)

    # -- recording (thread-safe: the SDK's instruments lock internally) ----------------

    def record_request(self, finish_reason: str, status_code: str, *, e2e_s: float | None = None,
                       ttft_s: float | None = None, queue_s: float | None = None,
                       num_prompt_tokens: int | None = None, num_output_tokens: int | None = None) -> None:
        """One finished request (also failed ones: finish_reason "error", status_code the gRPC name)."""
        self._requests.add(1, {"role": self.role, "finish_reason": finish_reason, "status_code": status_code})
        if e2e_s is not None:
            self._e2e.record(e2e_s, self._attrs)
        if ttft_s is not None:
            self._ttft.record(ttft_s, self._attrs)
            self.recent.add("ttft", ttft_s)
        if queue_s is not None:
            self._queue.record(queue_s, self._attrs)
        if num_prompt_tokens:
            self._prompt_tokens.add(num_prompt_tokens, self._attrs)
        if num_output_tokens:
            self._output_tokens.add(num_output_tokens, self._attrs)
            self.recent.add("output", num_output_tokens)

    def record_prefill(self, num_tokens: int) -> None:
        """Prompt tokens this daemon prefilled (for the recent prefill rate)."""
        self.recent.add("prefill", num_tokens)

    def record_itl(self, seconds: float) -> None:
        self._itl.record(seconds, self._attrs)
        self.recent.add("itl", seconds)

    def record_queue(self, seconds: float) -> None:
        """Queue time of a request that is not finished here (e.g. prefill's queue on decode)."""
        self._queue.record(seconds, self._attrs)

    def record_kv_transfer(self, seconds: float, num_bytes: int) -> None:
        self._kv_time.record(seconds, self._attrs)
        self._kv_bytes.add(num_bytes, self._attrs)

    def inc_preemptions(self, n: int = 1) -> None:
        if n:
            self._preemptions.add(n, self._attrs)

    def inc_preprocessing_failure(self) -> None:
        self._preprocess_failures.add(1, self._attrs)

    def inc_decode_timeout(self) -> None:
        self._decode_timeouts.add(1, self._attrs)

    def inc_kv_retry(self) -> None:
        self._kv_retries.add(1, self._attrs)

    def inc_slow_reader_abort(self) -> None:
        self._slow_readers.add(1, self._attrs)

    def inc_migration(self) -> None:
        self._migrations.add(1, self._attrs)

    # -- observed state ---------------------------------------------------------------------

    def set_state_callback(self, fn: StateCallback | None) -> None:
        """`fn()` is called on the scrape thread, once per scrape: it must be thread-safe and
        cheap (e.g. return the WorkerState the engine thread published after its last step)."""
        self._snapshot.callback = fn
        self._snapshot.state = None

    def _gauge_callback(self, read: Callable[[WorkerState], float | None]):
        def observe(options: CallbackOptions) -> list[Observation]:
            state = self._snapshot.state
            value = read(state) if state is not None else None
            return [] if value is None else [Observation(value, self._attrs)]

        return observe

    def _observe_cpu(self, options: CallbackOptions) -> list[Observation]:
        return [Observation(time.process_time(), self._attrs)]

    # -- exposition ----------------------------------------------------------------------------

    def render(self) -> str:
        """The current Prometheus exposition text (what GET /metrics returns)."""
        return generate_latest(self._registry).decode()

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics on host:port (0: any free port) from a daemon thread; the bound port."""
        if self._http is not None:
            raise RuntimeError(f"metrics already served on port {self.port}")
        server, _thread = start_http_server(port, addr=host, registry=self._registry)
        self._http = server
        self.port = server.server_port
        return self.port

    def shutdown(self) -> None:
        """Stop the HTTP endpoint and the meter provider. Idempotent."""
        if self._closed:
            return
        self._closed = True
        server, self._http = self._http, None
        if server is not None:
            server.shutdown()  # type: ignore[attr-defined]
            server.server_close()  # type: ignore[attr-defined]
        self._provider.shutdown()


def start_metrics(role: str, port: int | None = None, *, host: str = "127.0.0.1") -> Metrics:
    """Metrics for one daemon; with a port (0: any free one, see `.port`), served on /metrics."""
    metrics = Metrics(role)
    if port is not None:
        metrics.serve(port, host)
    return metrics
