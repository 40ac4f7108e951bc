"""Which sequences compute how many tokens in the next step (continuous batching).

Every step: each decoding sequence gets one token (a new KV block when it crosses a block
boundary, preempting the newest sequence when the pool is empty); then sequences still
prefilling continue their prompt in chunks; then waiting sequences are admitted while
there is room — under `max_num_seqs`, the per-step token budget and free KV blocks —
the oldest of the owner (API key) running the fewest sequences first.
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


class Scheduler:
    def __init__(self, blocks: BlockManager, config: SchedulerConfig):
        self.blocks = blocks
        self.config = config
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

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

    # -- one step -----------------------------------------------------------------------
    def schedule(self) -> list[tuple[Sequence, int]]:
        """(sequence, tokens to compute) pairs; decodes first, in that order in the batch."""
        budget = self.config.max_step_tokens
        decodes: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or not seq.is_decoding:
                continue
            if self._ensure_slot(seq):
                decodes.append((seq, 1))
                budget -= 1
        decodes = [(s, c) for s, c in decodes if s.status is SequenceStatus.RUNNING]

        prefills: list[tuple[Sequence, int]] = []
        for seq in self.running:
            if budget <= 0:
                break
            if not seq.is_decoding:
                count = min(seq.num_tokens - seq.num_computed, budget)
                prefills.append((seq, count))
                budget -= count

        deferred: list[Sequence] = []
        running_by_owner = Counter(seq.owner for seq in self.running)
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            index = self._fairest_waiting(running_by_owner)
            seq = self.waiting[index]
            del self.waiting[index]
            if not seq.params.prompt_logprobs and self.blocks.waits_for_in_flight(
                    seq.all_ids, seq.cache_salt, seq.block_keys):
                deferred.append(seq)  # its prefix is being computed right now: share it
                continue
            if not self._admit(seq):
                self.waiting.insert(index, seq)
                break
            running_by_owner[seq.owner] += 1
            count = min(seq.num_tokens - seq.num_computed, budget)
            prefills.append((seq, count))
            budget -= count
        self.waiting.extendleft(reversed(deferred))
        return decodes + prefills

    def _fairest_waiting(self, running_by_owner: Counter) -> int:
        """Index of the oldest waiting sequence of the owner (API key) running the fewest
        sequences: a key with a long queue cannot take every slot while another key waits."""
        best, best_load = 0, None
        seen: set = set()
        for i, seq in enumerate(self.waiting):
            if seq.owner in seen:
                continue
            seen.add(seq.owner)
            load = running_by_owner[seq.owner]
            if best_load is None or load < best_load:
                best, best_load = i, load
                if load == 0:
                    break
        return best

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
            victim = self.running[-1]  # the newest sequence gives way
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
