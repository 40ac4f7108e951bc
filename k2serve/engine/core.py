"""The synchronous engine core: admits requests, runs model steps, samples, finishes.

It is driven by one thread (see ``async_engine.py``); nothing here is thread-safe on its
own. Every step runs one forward pass over a flattened batch that mixes decode tokens
(one per running sequence) and chunks of prompts still being prefilled, under a token
budget so that a long prompt never stalls the others' decoding for long.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass

import torch

from k2serve.engine.sampler import SamplingRow, make_generator, sample
from k2serve.engine.sequence import (GenerationRequest, RequestOutput, Sequence, SequenceStatus,
                                     TokenLogprob)
from k2serve.models.layers.attention import ContiguousAttention, Segment, SequenceKVCache

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    max_num_seqs: int = 32  # sequences decoding at once
    max_step_tokens: int = 512  # tokens per forward pass (decode tokens + prefill chunks)
    context_length: int = 2048


class EngineCore:
    def __init__(self, model: torch.nn.Module, *, num_layers: int, num_kv_heads: int,
                 head_dim: int, config: EngineConfig, dtype: torch.dtype = torch.float32):
        self.model = model
        self.config = config
        self._kv_shape = (num_layers, num_kv_heads, head_dim)
        self._dtype = dtype
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    # -- requests -------------------------------------------------------------------
    def add(self, request: GenerationRequest) -> None:
        if not request.prompt_ids:
            raise ValueError("prompt must contain at least one token")
        seq = Sequence(request)
        if request.params.seed is not None:
            seq.generator = make_generator(request.params.seed)
        self.waiting.append(seq)

    def abort(self, request_id: str) -> bool:
        for queue in (self.waiting, self.running):
            for seq in list(queue):
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self._release(seq)
                    return True
        return False

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> dict[str, int]:
        return {"running": len(self.running), "waiting": len(self.waiting)}

    # -- one step -------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        self._admit()
        batch = self._schedule()
        if not batch:
            return []
        hidden, ctx = self._forward(batch)
        outputs = self._sample_and_update(batch, hidden, ctx)
        self.running = [s for s in self.running if s.status is SequenceStatus.RUNNING]
        return outputs

    def fail_all(self, message: str) -> list[RequestOutput]:
        """After an unexpected error: end every request with an error output."""
        outputs = []
        for seq in list(self.waiting) + self.running:
            outputs.append(RequestOutput(seq.request_id, [], None, "abort",
                                         len(seq.prompt_ids), error=message))
            self._release(seq)
        self.waiting.clear()
        self.running.clear()
        return outputs

    def _admit(self) -> None:
        while self.waiting and len(self.running) < self.config.max_num_seqs:
            seq = self.waiting.popleft()
            num_layers, num_kv, head_dim = self._kv_shape
            seq.kv_cache = SequenceKVCache(num_layers, num_kv, head_dim, dtype=self._dtype,
                                           initial_capacity=len(seq.prompt_ids)
                                           + min(seq.params.max_tokens, 256))
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)

    def _schedule(self) -> list[tuple[Sequence, int]]:
        """Pick (sequence, number of tokens to compute) pairs: decodes first, then prefill."""
        budget = self.config.max_step_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in self.running:
            if not seq.in_prefill:
                batch.append((seq, seq.num_tokens - seq.num_computed))
                budget -= 1
        for seq in self.running:
            if seq.in_prefill and budget > 0:
                chunk = min(len(seq.prompt_ids) - seq.num_computed, budget)
                batch.append((seq, chunk))
                budget -= chunk
        return batch

    def _forward(self, batch):
        ids: list[int] = []
        positions: list[int] = []
        segments = []
        for seq, count in batch:
            start = seq.num_computed
            ids.extend(seq.all_ids[start:start + count])
            positions.extend(range(start, start + count))
            segments.append(Segment(seq.kv_cache, start, count))
        ctx = ContiguousAttention(segments)
        hidden = self.model(torch.tensor(ids, dtype=torch.long),
                            torch.tensor(positions, dtype=torch.long), ctx)
        ctx.commit()
        return hidden, ctx

    def _sample_and_update(self, batch, hidden, ctx) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        sample_rows: list[int] = []  # hidden-state row of each sampling sequence
        samplers: list[Sequence] = []
        offset = 0
        for seq, count in batch:
            if seq.params.prompt_logprobs and seq.in_prefill:
                self._record_prompt_logprobs(seq, hidden[offset:offset + count])
            seq.num_computed += count
            if seq.num_computed == seq.num_tokens:  # caught up: the next token is due
                sample_rows.append(offset + count - 1)
                samplers.append(seq)
            offset += count
        # Prompt-only requests (max_tokens=0, e.g. scoring a prompt) end after prefill.
        for seq in [s for s in samplers if s.params.max_tokens == 0]:
            samplers.remove(seq)
            seq.finish_reason = "length"
            self._release(seq)
            outputs.append(RequestOutput(seq.request_id, [], None, "length", len(seq.prompt_ids),
                                         prompt_logprobs=seq.prompt_logprobs))
        if not samplers:
            return outputs

        logits = self.model.compute_logits(hidden[torch.tensor(sample_rows)])
        rows = [SamplingRow(s.params, s.prompt_ids, s.output_ids, s.generator) for s in samplers]
        result = sample(logits, rows)
        for seq, token_id, lp in zip(samplers, result.token_ids, result.logprobs):
            first_output = not seq.output_ids
            seq.output_ids.append(token_id)
            finish = self._finish_reason(seq, token_id)
            if finish:
                seq.finish_reason = finish
                seq.status = SequenceStatus.FINISHED
                self._release(seq)
            outputs.append(RequestOutput(
                request_id=seq.request_id,
                token_ids=[token_id],
                logprobs=[TokenLogprob(token_id, lp[0], lp[1])] if lp is not None else None,
                finish_reason=finish,
                num_prompt_tokens=len(seq.prompt_ids),
                prompt_logprobs=seq.prompt_logprobs if first_output else None,
            ))
        return outputs

    def _record_prompt_logprobs(self, seq: Sequence, chunk_hidden: torch.Tensor) -> None:
        """Logprob of each prompt token given the ones before it (the first has none)."""
        if seq.prompt_logprobs is None:
            seq.prompt_logprobs = [None]
        start = seq.num_computed
        logprobs = torch.log_softmax(self.model.compute_logits(chunk_hidden), dim=-1)
        top_k = seq.params.logprobs or 0
        for i in range(chunk_hidden.shape[0]):
            target_pos = start + i + 1
            if target_pos >= len(seq.prompt_ids):
                break
            token = seq.prompt_ids[target_pos]
            top = []
            if top_k:
                values, idx = torch.topk(logprobs[i], top_k)
                top = list(zip(idx.tolist(), values.tolist()))
            seq.prompt_logprobs.append(TokenLogprob(token, float(logprobs[i, token]), top))

    def _finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        params = seq.params
        if token_id in params.stop_token_ids and not params.ignore_eos:
            return "stop"
        if len(seq.output_ids) >= params.max_tokens:
            return "length"
        if seq.num_tokens >= self.config.context_length:
            return "length"
        return None

    def _release(self, seq: Sequence) -> None:
        seq.kv_cache = None
        seq.status = SequenceStatus.FINISHED
