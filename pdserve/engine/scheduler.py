"""The continuous-batching scheduler: who computes how many tokens this step.

Each step spends a token budget (max_num_batched_tokens) and a sequence budget
(max_num_seqs):
1. running sequences first, oldest first: one decode token each, or the next
   chunk of an unfinished prefill;
2. when the KV pool cannot hold a running sequence's next tokens, the newest
   running sequence is preempted (blocks freed, KV recomputed later; invisible
   to the client) until it fits;
3. then waiting sequences, first come first served, prefix-cache hits first,
   their prompt chunked to the budget left; if one does not fit, the queue waits.
Sequences waiting for remote KV hold their blocks and are not scheduled.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from pdserve.engine.config import SchedulerConfig
from pdserve.engine.kv_cache_manager import KVCacheManager
from pdserve.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSeq:
    seq: Sequence
    # Tokens computed this step, from seq.num_computed_tokens on.
    num_new_tokens: int

    @property
    def completes(self) -> bool:
        """Whether this step reaches the sequence's last token (so it samples)."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    # Sequences to compute this step and how many tokens each.
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    # Sequences preempted this step (their KV will be recomputed).
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv: KVCacheManager) -> None:
        self.config = config
        self.kv = kv
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.remote: dict[str, Sequence] = {}  # waiting for remote KV
        self.num_preemptions = 0

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def add_remote(self, seq: Sequence) -> bool:
        """Reserve blocks for a prompt whose KV arrives from elsewhere; False if no room.

        Blocks of its prefix found in the prefix cache are taken instead: their KV need not
        move (seq.num_cached_tokens).
        """
        prefix = self.kv.remote_prefix(seq.token_ids)
        if not self.kv.allocate(seq, seq.num_tokens - len(prefix) * self.kv.block_size, prefix):
            return False
        seq.status = SequenceStatus.WAITING_FOR_REMOTE_KV
        self.remote[seq.request_id] = seq
        return True

    def add_forked(self, seq: Sequence) -> None:
        """A forked sample that holds its prompt's KV (KVCacheManager.fork): it decodes from the next step."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def remote_complete(self, seq: Sequence) -> None:
        """The remote KV of seq's prompt is in its blocks: join the running batch."""
        del self.remote[seq.request_id]
        seq.num_computed_tokens = seq.num_prompt_tokens
        self.kv.cache_computed_blocks(seq)
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def finish(self, seq: Sequence, status: SequenceStatus) -> None:
        """Take seq out of every queue and free its blocks."""
        if seq.status == SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status == SequenceStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status == SequenceStatus.WAITING_FOR_REMOTE_KV:
            del self.remote[seq.request_id]
        self.kv.free(seq)
        seq.status = status

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num_new = min(seq.num_uncomputed_tokens, budget)
            while not self.kv.allocate(seq, num_new):
                victim = self.running[-1]
                self._preempt(victim, out)
                if victim is seq:
                    return budget
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
            i += 1
        return budget

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting[0]
            prefix = self.kv.find_prefix(seq)
            num_new = min(seq.num_tokens - self.kv.start_after(seq, prefix), budget)
            if not self.kv.allocate(seq, num_new, prefix):
                break
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.kv.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)
        out.preempted.append(seq)
