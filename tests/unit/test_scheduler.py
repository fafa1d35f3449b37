"""Scheduler budgets, order, chunking and preemption, on bookkeeping alone (no model)."""

from __future__ import annotations

from pdserve.engine.config import SchedulerConfig
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.sampling_params import SamplingParams
from pdserve.engine.scheduler import Scheduler
from pdserve.engine.sequence import Sequence, SequenceStatus


def seq(request_id: str, n: int) -> Sequence:
    return Sequence(request_id, list(range(1, n + 1)), SamplingParams(max_tokens=100), seed=0)


def commit(scheduler: Scheduler, out, sampled_token: int = 7) -> None:
    """What the engine does after the runner: advance progress, sample where a step completes."""
    for s in out.scheduled:
        completes = s.seq.num_computed_tokens + s.num_new_tokens == s.seq.num_tokens
        s.seq.num_computed_tokens += s.num_new_tokens
        scheduler.kv.cache_computed_blocks(s.seq)
        if completes:
            s.seq.append_token(sampled_token)


def plan(out) -> list[tuple[str, int]]:
    return [(s.seq.request_id, s.num_new_tokens) for s in out.scheduled]


def make(num_blocks=16, block_size=4, tokens=32, seqs=8) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_batched_tokens=tokens, max_num_seqs=seqs),
                     KVCacheManager(num_blocks, block_size, enable_prefix_caching=False))


def test_running_first_then_waiting_and_prefill_is_chunked():
    sched = make(tokens=10)
    a, b = seq("a", 6), seq("b", 12)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    assert plan(out) == [("a", 6), ("b", 4)]  # b's prompt chunked to the budget left
    commit(sched, out)
    out = sched.schedule()
    assert plan(out) == [("a", 1), ("b", 8)]
    commit(sched, out)
    assert plan(sched.schedule()) == [("a", 1), ("b", 1)]


def test_max_num_seqs_bounds_the_batch():
    sched = make(seqs=2)
    for name in "abc":
        sched.add(seq(name, 2))
    out = sched.schedule()
    assert plan(out) == [("a", 2), ("b", 2)]
    assert [s.request_id for s in sched.waiting] == ["c"]


def test_newest_running_is_preempted_when_blocks_run_out():
    sched = make(num_blocks=4, block_size=4, tokens=64)
    a, b = seq("a", 8), seq("b", 8)
    sched.add(a)
    sched.add(b)
    out = sched.schedule()
    commit(sched, out)  # each holds 2 full blocks and has a 9th token to compute
    assert a.block_table == [0, 1] and b.block_table == [2, 3]
    out = sched.schedule()
    assert out.preempted == [b] and b.status == SequenceStatus.WAITING and b.block_table == []
    assert plan(out) == [("a", 1)]
    assert a.block_table == [0, 1, 3]  # b's blocks were freed tail first
    assert list(sched.waiting) == [b] and b.num_computed_tokens == 0


def test_remote_sequences_hold_blocks_and_wait():
    sched = make(num_blocks=4, block_size=4)
    r = seq("r", 10)
    assert sched.add_remote(r)
    assert r.block_table == [0, 1, 2] and r.status == SequenceStatus.WAITING_FOR_REMOTE_KV
    assert plan(sched.schedule()) == []
    assert not sched.add_remote(seq("s", 8))  # one block left: refused, nothing taken
    assert sched.kv.pool.num_free == 1
    r.append_token(5)
    sched.remote_complete(r)
    assert plan(sched.schedule()) == [("r", 1)]


def test_finish_frees_blocks_from_any_state():
    sched = make()
    a, b, c = seq("a", 4), seq("b", 4), seq("c", 4)
    sched.add(a)
    commit(sched, sched.schedule())
    sched.add(b)
    assert sched.add_remote(c)
    for s in (a, b, c):
        sched.finish(s, SequenceStatus.FINISHED_ABORTED)
    assert sched.kv.pool.num_free == sched.kv.pool.num_blocks
    assert not sched.has_work and not sched.remote
