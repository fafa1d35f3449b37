"""`pdserve top`: a live terminal view of a cluster, built on the router's ClusterStatus.

`render()` is a pure function of the workers the router reported, so it is tested
without a router. `run_top()` polls the router every interval and redraws in place
(a failed call, e.g. an unreachable router, is shown in the header and retried), or with `once` prints
one plain snapshot and exits.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from pdserve.args import EXIT_USAGE
from pdserve.client.client import Client
from pdserve.client.connect import add_connect_args, connect_kwargs
from pdserve.client.types import WorkerInfo
from pdserve.errors import PdserveError

ROLES = ("prefill", "decode")
HEALTH_STYLES = {"healthy": "green", "draining": "yellow", "unhealthy": "red"}
BAR_WIDTH = 8
# Width of a snapshot written to a pipe or file (rich would otherwise squeeze it into 80).
PLAIN_WIDTH = 200


def add_top_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--router", required=True, help="router address, e.g. 127.0.0.1:50051")
    p.add_argument("--interval", type=float, default=1.0, help="seconds between refreshes (default: 1)")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit (2 if the router is unreachable)")
    add_connect_args(p)


def run_top_cli(args: argparse.Namespace) -> int:
    return run_top(args.router, args.interval, args.once, connect=connect_kwargs(args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="pdserve top", description="live view of a pdserve cluster")
    add_top_args(parser)
    return run_top_cli(parser.parse_args(argv))


# -- rendering (pure) ------------------------------------------------------------------------


def render(workers: Sequence[WorkerInfo], *, router: str, error: str | None, now: float) -> Group:
    """The header line and one table row per worker; `now` is the refresh's wall-clock time."""
    header = _header(workers, router=router, error=error, now=now)
    return Group(header) if error is not None else Group(header, _table(workers))


def _header(workers: Sequence[WorkerInfo], *, router: str, error: str | None, now: float) -> Text:
    clock = time.strftime("%H:%M:%S", time.localtime(now))
    header = Text.assemble(("router ", "bold"), (router, "bold cyan"))
    if error is not None:
        header.append(f"  error: {error}", style="bold red")
        header.append(f"  (last try {clock}, retrying)")
        return header
    for role in ROLES:
        group = [w for w in workers if w.role == role]
        counts = ", ".join(f"{sum(w.health == h for w in group)} {h}" for h in HEALTH_STYLES
                           if any(w.health == h for w in group))
        header.append(f"  |  {role} {len(group)}" + (f" ({counts})" if counts else ""))
        header.append(f" {sum(_tokens_per_s(w) for w in group):,.1f} tok/s")
    others = sum(w.role not in ROLES for w in workers)
    if others:
        header.append(f"  |  unknown role {others}", style="yellow")
    header.append(f"  |  refreshed {clock}")
    return header


def _table(workers: Sequence[WorkerInfo]) -> Table:
    # No vertical rules and short headers: 15 columns fit in about 150 characters. When the
    # terminal is narrower, rich shortens the columns other than id, role and health.
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True,
                  header_style="bold")
    table.add_column("worker", no_wrap=True, min_width=max((len(w.worker_id) for w in workers), default=6))
    table.add_column("role", no_wrap=True, min_width=7)
    table.add_column("address", no_wrap=True)
    table.add_column("health", no_wrap=True, min_width=9)
    for name in ("run", "wait", "pend tok", "KV blocks", "KV used", "cached", "prefix hit",
                 "tok/s", "TTFT p99", "ITL p99", "hb age"):
        table.add_column(name, justify="right", no_wrap=True)
    for w in sorted(workers, key=_row_order):
        load, kv = w.load, w.load.kv
        table.add_row(
            w.worker_id,
            w.role or "?",
            w.address,
            Text(w.health or "?", style=HEALTH_STYLES.get(w.health or "", "dim")),
            str(load.num_running_requests),
            str(load.num_waiting_requests),
            f"{load.num_pending_prefill_tokens:,}",
            f"{kv.num_used}/{kv.num_total}",
            _kv_usage(kv.num_used, kv.num_total),
            str(kv.num_cached),
            f"{kv.prefix_cache_hit_rate:.1%}",
            f"{_tokens_per_s(w):,.1f}",
            _ms(load.p99_ttft_ms),
            _ms(load.p99_itl_ms),
            f"{w.last_heartbeat_age_ms / 1000:.1f}s",
        )
    return table


def _row_order(w: WorkerInfo) -> tuple[int, str]:
    return (ROLES.index(w.role) if w.role in ROLES else len(ROLES), w.worker_id)


def _tokens_per_s(w: WorkerInfo) -> float:
    """Prefill workers report prompt tokens prefilled per second; decode, tokens generated."""
    return w.load.prefill_tokens_per_s if w.role == "prefill" else w.load.output_tokens_per_s


def _ms(value: float) -> str:
    # The worker reports 0.0 when it had no sample in its window.
    return f"{value:,.1f}" if value > 0 else "-"


def _kv_usage(used: int, total: int) -> Text:
    if total <= 0:
        return Text("-")
    fraction = min(max(used / total, 0.0), 1.0)
    style = "green" if fraction < 0.7 else "yellow" if fraction < 0.9 else "red"
    filled = round(fraction * BAR_WIDTH)
    return Text.assemble(f"{fraction:5.1%} ", ("█" * filled, style), ("░" * (BAR_WIDTH - filled), "dim"))


# -- the loop ----------------------------------------------------------------------------------


def run_top(router: str, interval: float = 1.0, once: bool = False, *, timeout: float | None = None,
            connect: dict | None = None) -> int:
    """Polls `router` every `interval` seconds until Ctrl-C (0); with `once`, one snapshot:
    0, or 2 and a line on stderr if the router cannot be reached. `timeout`: per call,
    default max(interval, 2) seconds; `connect`: api_key and credentials for the Client."""
    if not interval > 0:
        print(f"pdserve top: error: --interval: must be > 0, got {interval}", file=sys.stderr)
        return EXIT_USAGE
    call_timeout = timeout if timeout is not None else max(interval, 2.0)
    with Client(router, timeout=call_timeout, **(connect or {})) as client:
        if once:
            return _print_once(client, router)
        try:
            _live(client, router, interval)
        except KeyboardInterrupt:
            pass
    return 0


def _poll(client: Client) -> tuple[list[WorkerInfo], str | None]:
    """The workers, or no workers and the error (on one line) when the call failed."""
    try:
        return client.cluster_status(), None
    except PdserveError as exc:
        return [], " ".join(str(exc).split()) or type(exc).__name__


def _print_once(client: Client, router: str) -> int:
    workers, error = _poll(client)
    if error is not None:
        print(f"pdserve top: error: router {router}: {error}", file=sys.stderr)
        return EXIT_USAGE
    console = Console(width=None if sys.stdout.isatty() else PLAIN_WIDTH)
    console.print(render(workers, router=router, error=None, now=time.time()))
    return 0


def _live(client: Client, router: str, interval: float) -> None:
    with Live(console=Console(), auto_refresh=False, redirect_stderr=False) as live:
        next_at = time.monotonic()
        while True:
            workers, error = _poll(client)
            live.update(render(workers, router=router, error=error, now=time.time()), refresh=True)
            # Keep the cadence even when a call is slow; skip refreshes that were missed.
            next_at = max(next_at + interval, time.monotonic())
            time.sleep(max(0.0, next_at - time.monotonic()))


if __name__ == "__main__":
    sys.exit(main())
