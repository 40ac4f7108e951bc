"""Which sequences compute how many tokens in the next step (continuous batching).

Every step: each decoding sequence gets one token (a new KV block when it crosses a block
boundary, preempting the newest sequence when the pool is empty); then sequences still
prefilling continue their prompt in chunks; then waiting sequences are admitted while
there is room — under `max_num_seqs`, the per-step token budget and free KV blocks —
the most urgent first (the lowest `priority`: interactive requests before a batch job's
lines), then the oldest of the owner (API key) running the fewest sequences. A waiting
sequence that does not fit preempts less urgent running ones, and when KV blocks run out
the least urgent, newest sequence gives way.
Preemption is by recompute: the victim's blocks are freed and it goes back to the front
of the queue; its prompt and the tokens it already produced are computed again on
re-admission (mostly from the prefix cache, since its full blocks stay hashed).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from dataclasses import dataclass

from k2serve.engine.block_manager import BlockManager
from k2serve.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class SchedulerConfig:
    """The scheduler's limits, taken from the engine's ``EngineConfig``."""

    max_num_seqs: int
    max_step_tokens: int
    mix_priorities: bool = False  # see EngineConfig.mix_priorities
    background_step_tokens: int = 8  # see EngineConfig.background_step_tokens


class Scheduler:
    def __init__(self, blocks: BlockManager, config: SchedulerConfig):
        self.blocks = blocks
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._preempted_now: set[int] = set()

    # -- membership ---------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Finished or aborted: leave the queues and give the blocks back."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED

    def find(self, request_id: str) -> Sequence | None:
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                return seq
        return None

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def has_urgent_work(self) -> bool:
        return any(seq.priority == 0 for seq in (*self.running, *self.waiting))

    # -- one step -----------------------------------------------------------------------
    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to compute) pairs; decodes first, in that order in the batch.

        Unless `mix_priorities`, only the most urgent priority present computes; the others
        keep their KV blocks and wait for a step nothing more urgent needs (or one where
        the urgent sequences can do nothing: waiting for a prefix another computes). A step
        of background work only (priority > 0) computes at most `background_step_tokens`."""
        level = None
        if not self.config.mix_priorities and (self.running or self.waiting):
            level = min(seq.priority for seq in (*self.running, *self.waiting))
        batch = self._schedule(level)
        if not batch and level is not None:
            batch = self._schedule(None)
        return batch

    def _schedule(self, level: int | None) -> list[tuple[Sequence, int]]:
        """One step over the sequences of priority <= `level` (None: all), most urgent
        first: decodes, then prefills and admissions by priority."""
        def counts(seq: Sequence) -> bool:
            return level is None or seq.priority <= level

        self._preempted_now: set[int] = set()  # not re-admitted in the step that preempts

        budget = self.config.max_step_tokens
        if level is not None and level > 0:  # only background work: keep the step short
            budget = min(budget, self.config.background_step_tokens)
        decodes: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if (seq.status is not SequenceStatus.RUNNING or not seq.is_decoding
                    or not counts(seq)):
                continue
            if self._ensure_slot(seq):
                decodes.append((seq, 1))
                budget -= 1

        # Prefills of running sequences as urgent as anything waiting come before
        # admissions; less urgent ones get what budget is left after them.
        first = min((s.priority for s in self.waiting if counts(s)), default=None)
        prefills: list[tuple[Sequence, int]] = []
        later: list[Sequence] = []
        for seq in sorted(self.running, key=lambda s: s.priority):
            if seq.is_decoding or not counts(seq):
                continue
            if first is not None and seq.priority > first:
                later.append(seq)
                continue
            if budget <= 0:
                break
            count = min(seq.num_tokens - seq.num_computed, budget)
            prefills.append((seq, count))
            budget -= count

        deferred: list[Sequence] = []
        running_by_owner = Counter(seq.owner for seq in self.running)
        # A prefix is worth waiting for only if its sequence computes in this step: an
        # interactive request never waits for a batch line's prompt, it computes its own.
        computing = None if level is None else {
            h for s in self.running if counts(s) for h in s.in_flight_hashes}
        while budget > 0:
            seq = self._next_waiting(running_by_owner, level)
            if seq is None:
                break
            if not seq.params.prompt_logprobs and self.blocks.waits_for_in_flight(
                    seq.all_ids, seq.cache_salt, seq.block_keys, computing):
                self.waiting.remove(seq)
                deferred.append(seq)  # its prefix is being computed right now: share it
                continue
            if not self._make_room_and_admit(seq):
                break
            self.waiting.remove(seq)
            running_by_owner[seq.owner] += 1
            if computing is not None:  # it computes its prefix now: others may share it
                computing.update(seq.in_flight_hashes)
            count = min(seq.num_tokens - seq.num_computed, budget)
            prefills.append((seq, count))
            budget -= count
        self.waiting.extendleft(reversed(deferred))

        for seq in later:
            if budget <= 0:
                break
            if seq.status is SequenceStatus.RUNNING:  # not preempted for an admission
                count = min(seq.num_tokens - seq.num_computed, budget)
                prefills.append((seq, count))
                budget -= count
        return [(s, c) for s, c in decodes + prefills if s.status is SequenceStatus.RUNNING]

    def _next_waiting(self, running_by_owner: Counter, level: int | None) -> Sequence | None:
        """The most urgent waiting sequence; within a priority, the oldest of the owner (API
        key) running the fewest sequences: a key with a long queue cannot take every slot
        while another key waits."""
        best, best_rank = None, None
        seen: set = set()
        for seq in self.waiting:
            if level is not None and seq.priority > level or id(seq) in self._preempted_now:
                continue
            if (seq.priority, seq.owner) in seen:
                continue
            seen.add((seq.priority, seq.owner))
            rank = (seq.priority, running_by_owner[seq.owner])
            if best_rank is None or rank < best_rank:
                best, best_rank = seq, rank
        return best

    def _make_room_and_admit(self, seq: Sequence) -> bool:
        """Admit `seq`, preempting less urgent running sequences while it does not fit
        (a batch job's line gives way to an interactive request)."""
        while True:
            if len(self.running) < self.config.max_num_seqs and self._admit(seq):
                return True
            victim = self._victim(below=seq.priority)
            if victim is None:
                return False
            self._preempt(victim)

    def _victim(self, below: int | None = None) -> Sequence | None:
        """Who gives way when KV blocks or slots run out: the least urgent running sequence,
        the newest among equals; with `below`, only one less urgent than that."""
        victim = None
        for seq in reversed(self.running):
            if victim is None or seq.priority > victim.priority:
                victim = seq
        if victim is None or (below is not None and victim.priority <= below):
            return None
        return victim

    def _admit(self, seq: Sequence) -> bool:
        use_cache = not seq.params.prompt_logprobs  # prompt logprobs need every position computed
        allocation = self.blocks.allocate(seq.all_ids, use_cache=use_cache,
                                          salt=seq.cache_salt, keys=seq.block_keys)
        if allocation is None:
            return False
        seq.block_table = allocation.block_ids
        seq.block_hashes = allocation.cached_hashes
        seq.in_flight_hashes = allocation.in_flight_hashes
        seq.num_computed = allocation.num_cached_tokens
        if seq.num_preemptions == 0:
            seq.num_cached_tokens = allocation.num_cached_tokens
            seq.first_scheduled_ns = time.time_ns()
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        return True

    def _ensure_slot(self, seq: Sequence) -> bool:
        """Room in the block table for the token at position num_computed; may preempt."""
        while len(seq.block_table) * self.blocks.block_size <= seq.num_computed:
            block_id = self.blocks.append_block()
            if block_id is not None:
                seq.block_table.append(block_id)
                continue
            victim = self._victim()  # the least urgent, newest sequence gives way
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self._preempted_now.add(id(seq))
        self.waiting.appendleft(seq)

    def _release(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_table)
        self.blocks.forget_in_flight(seq.in_flight_hashes)
        seq.block_table = []
        seq.block_hashes = []
        seq.in_flight_hashes = []
        seq.num_computed = 0
        seq.image_embeds.clear()  # re-encoded if it comes back

    # -- after the forward pass -----------------------------------------------------------
    def register_full_blocks(self, seq: Sequence) -> None:
        """Hash the blocks this step filled so later requests can share them."""
        size = self.blocks.block_size
        full = seq.num_computed // size
        tokens = None
        while len(seq.block_hashes) < full:
            i = len(seq.block_hashes)
            if tokens is None:
                tokens = seq.all_ids
            parent = seq.block_hashes[-1] if seq.block_hashes else None
            block_hash = self.blocks.hash_block(parent, tokens[i * size:(i + 1) * size],
                                                seq.cache_salt, seq.block_keys.get(i))
            seq.block_hashes.append(block_hash)
            self.blocks.mark_computed(seq.block_table[i], block_hash)
