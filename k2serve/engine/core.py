"""The synchronous engine core: admits requests, runs model steps, samples, finishes.

It is driven by one thread (see ``async_engine.py``); nothing here is thread-safe on its
own. Every step runs one forward pass over a flattened batch that mixes decode tokens
(one per running sequence) and chunks of prompts still being prefilled (see
``scheduler.py``), with the KV cache in a paged pool shared by all sequences.
"""

from __future__ import annotations

import logging
import time

import torch

from k2serve.engine.block_manager import BlockManager
from k2serve.engine.config import EngineConfig
from k2serve.engine.kv_cache import KVPool
from k2serve.engine.multimodal import ImageRows, block_keys, check_images
from k2serve.engine.sampler import SamplingRow, make_generator, sample
from k2serve.engine.scheduler import Scheduler, SchedulerConfig
from k2serve.engine.sequence import (
    GenerationRequest,
    RequestOutput,
    Sequence,
    TokenLogprob,
)
from k2serve.engine.spec_draft import DraftModelProposer
from k2serve.engine.spec_policy import SpecPolicy
from k2serve.engine.spec_propose import NgramProposer, Proposer
from k2serve.engine.spec_verify import verify
from k2serve.models.layers.int4_linear import DenseRows
from k2serve.structured.bitmask import allowed_tokens

log = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, model: torch.nn.Module, config: EngineConfig,
                 draft_model: torch.nn.Module | None = None):
        """draft_model: the proposer of ``config.speculative == "draft"`` (same vocabulary)."""
        self.model = model
        self.config = config
        self.proposer = _make_proposer(config, model, draft_model)
        self.spec_policy = SpecPolicy(config.adaptive_speculation)
        self.num_spec_proposed = 0  # speculative tokens proposed / kept, since start
        self.num_spec_accepted = 0
        kv_dtype = config.kv_cache_dtype or getattr(model, "kv_cache_dtype", torch.float32)
        self.kv = KVPool(model.kv_cache_spec(), config.block_size,
                         num_blocks=config.num_kv_blocks, max_bytes=config.kv_cache_bytes,
                         dtype=kv_dtype)
        self.blocks = BlockManager(self.kv.num_blocks, config.block_size)
        self.scheduler = Scheduler(self.blocks, SchedulerConfig(
            config.max_num_seqs, config.max_step_tokens, config.mix_priorities,
            config.background_step_tokens))
        self.image_rows = ImageRows(model) if hasattr(model, "embed_images") else None

    # -- requests -------------------------------------------------------------------
    def add(self, request: GenerationRequest) -> None:
        if not request.prompt_ids:
            raise ValueError("prompt must contain at least one token")
        needed = self.blocks.blocks_needed(len(request.prompt_ids) + request.params.max_tokens)
        if needed > self.blocks.num_blocks:
            raise ValueError(f"the request needs {needed} KV blocks but the cache holds only "
                             f"{self.blocks.num_blocks}")
        seq = Sequence(request)
        if request.images:
            if self.image_rows is None:
                raise ValueError("this model takes no images")
            check_images(request.images, len(request.prompt_ids))
            seq.block_keys = block_keys(request.images, self.blocks.block_size)
        if request.params.grammar is not None:  # compiled already: this is a cheap copy
            seq.matcher = request.params.grammar.new_matcher()
        if request.params.seed is not None:
            seq.generator = make_generator(request.params.seed)
        self.scheduler.add(seq)

    def abort(self, request_id: str) -> bool:
        seq = self.scheduler.find(request_id)
        if seq is None:
            return False
        self.scheduler.remove(seq)
        return True

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def has_urgent_work(self) -> bool:
        """Work of priority 0 (interactive requests), running or waiting."""
        return self.scheduler.has_urgent_work()

    def stats(self) -> dict[str, int]:
        return {"running": len(self.scheduler.running), "waiting": len(self.scheduler.waiting),
                "kv_blocks_total": self.blocks.num_blocks, "kv_blocks_free": self.blocks.num_free,
                "kv_block_size": self.blocks.block_size,
                "preemptions": self.scheduler.num_preemptions,
                "prefix_cache_queries": self.blocks.prefix_queries,
                "prefix_cache_hits": self.blocks.prefix_hits,
                "spec_proposed_tokens": self.num_spec_proposed,
                "spec_accepted_tokens": self.num_spec_accepted}

    # -- one step -------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        batch = self.scheduler.schedule()
        if not batch:
            return []
        propose_s = rounds = 0
        if self.proposer is not None:
            started = time.perf_counter()
            batch = self._speculate(batch)
            propose_s = time.perf_counter() - started
            rounds = max((len(seq.spec_ids) for seq, _ in batch), default=0)
        started = time.perf_counter()
        ctx = self.kv.attention_context(batch)
        ids: list[int] = []
        positions: list[int] = []
        for seq, count in batch:
            start = seq.num_computed
            ids.extend(seq.all_ids[start:start + count] if not seq.spec_ids
                       else [seq.all_ids[-1], *seq.spec_ids])
            positions.extend(range(start, start + count))
        ctx.dense_rows = self._dense_prompt_rows(batch)
        images = self.image_rows.gather(batch) if self.image_rows is not None else None
        extra = {} if images is None else {"image_rows": images[0], "image_embeds": images[1]}
        hidden = self.model(torch.tensor(ids, dtype=torch.long),
                            torch.tensor(positions, dtype=torch.long), ctx, **extra)
        outputs = self._sample_and_update(batch, hidden)
        self.spec_policy.timed(propose_s, rounds, time.perf_counter() - started)
        return outputs

    def _speculate(self, batch: list[tuple[Sequence, int]]) -> list[tuple[Sequence, int]]:
        """Proposals for the decoding sequences, within the step's token budget, the
        request's max_tokens, the context and the free KV blocks (speculation never preempts).
        Grammar-constrained sequences do not speculate."""
        budget = self.config.max_step_tokens - sum(count for _, count in batch)
        requests = []
        for seq, count in batch:
            seq.spec_ids, seq.spec_probs = [], None
            if not seq.is_decoding or seq.matcher is not None or budget <= 0:
                continue
            limit = self.spec_policy.limit(seq, min(
                self.config.num_speculative_tokens, budget,
                seq.params.max_tokens - len(seq.output_ids) - 1,
                self.config.context_length - seq.num_tokens))
            if limit > 0:
                requests.append((seq, limit))
                budget -= limit
        if not requests:
            return batch
        live = {s.request_id for s in (*self.scheduler.running, *self.scheduler.waiting)}
        self.proposer.propose(requests, live)
        size = self.blocks.block_size
        for seq, _ in requests:
            last = seq.num_computed + len(seq.spec_ids)  # position of the last proposal
            while seq.spec_ids and len(seq.block_table) * size <= last:
                block_id = self.blocks.append_block()
                if block_id is None:  # keep what fits in the blocks it has
                    keep = len(seq.block_table) * size - 1 - seq.num_computed
                    seq.spec_ids = seq.spec_ids[:keep]
                    if seq.spec_probs is not None:
                        seq.spec_probs = seq.spec_probs[:keep] if keep else None
                    break
                seq.block_table.append(block_id)
        return [(seq, 1 + len(seq.spec_ids)) for seq, _ in batch]

    def _dense_prompt_rows(self, batch) -> DenseRows:
        """The step's dense-row plan: the row runs [start, end) holding prompt tokens of long
        prompts."""
        threshold = self.config.dense_prompt_min_tokens
        runs: DenseRows = []
        if threshold is None:
            return runs
        row = 0
        for seq, count in batch:
            prompt_len = len(seq.prompt_ids)
            if prompt_len >= threshold and seq.num_computed < prompt_len:
                end = row + min(count, prompt_len - seq.num_computed)
                if runs and runs[-1][1] == row:
                    runs[-1] = (runs[-1][0], end)
                else:
                    runs.append((row, end))
            row += count
        return runs

    def fail_all(self, message: str) -> list[RequestOutput]:
        """After an unexpected error: end every request with an error output."""
        outputs = []
        for seq in [*self.scheduler.waiting, *self.scheduler.running]:
            outputs.append(RequestOutput(seq.request_id, [], None, "abort",
                                         len(seq.prompt_ids), error=message))
            self.scheduler.remove(seq)
        return outputs

    def _sample_and_update(self, batch, hidden) -> list[RequestOutput]:
        outputs: list[RequestOutput] = []
        sample_rows: list[int] = []  # hidden-state row of each sampling sequence
        samplers: list[Sequence] = []
        speculating: list[tuple[Sequence, int]] = []  # and its k + 1 rows' count
        spec_rows: list[int] = []
        offset = 0
        for seq, count in batch:
            if seq.spec_ids:
                spec_rows.extend(range(offset, offset + count))
                speculating.append((seq, count))
                offset += count
                continue
            if seq.params.prompt_logprobs and seq.num_computed < len(seq.prompt_ids):
                self._record_prompt_logprobs(seq, hidden[offset:offset + count])
            seq.num_computed += count
            self.scheduler.register_full_blocks(seq)
            if seq.num_computed == seq.num_tokens:  # caught up: the next token is due
                sample_rows.append(offset + count - 1)
                samplers.append(seq)
            offset += count
        # Prompt-only requests (max_tokens=0, e.g. scoring a prompt) end after prefill.
        for seq in [s for s in samplers if s.params.max_tokens == 0]:
            samplers.remove(seq)
            self._finish(seq, "length")
            outputs.append(RequestOutput(seq.request_id, [], None, "length", len(seq.prompt_ids),
                                         prompt_logprobs=seq.prompt_logprobs))
        if not samplers and not speculating:
            return outputs

        logits = self.model.compute_logits(hidden[torch.tensor(spec_rows + sample_rows)])
        outputs.extend(self._verify_speculation(speculating, logits[:len(spec_rows)]))
        logits = logits[len(spec_rows):]
        if not samplers:
            return outputs
        # Grammar hook: each constrained sequence's allowed tokens mask its logits row.
        allowed = allowed_tokens([s.matcher for s in samplers], logits.shape[-1],
                                 [s.params.stop_token_ids for s in samplers])
        rows = [SamplingRow(s.params, s.prompt_ids, s.output_ids, s.generator, mask)
                for s, mask in zip(samplers, allowed)]
        result = sample(logits, rows)
        for seq, token_id, lp in zip(samplers, result.token_ids, result.logprobs):
            first_output = not seq.output_ids
            seq.output_ids.append(token_id)
            if seq.matcher is not None and not seq.matcher.accept(token_id):
                log.warning("grammar rejected token %d of %s: %s", token_id, seq.request_id,
                            seq.matcher.error)
            finish = self._finish_reason(seq, token_id)
            if finish:
                self._finish(seq, finish)
            outputs.append(RequestOutput(
                request_id=seq.request_id,
                token_ids=[token_id],
                logprobs=[TokenLogprob(token_id, lp[0], lp[1])] if lp is not None else None,
                finish_reason=finish,
                num_prompt_tokens=len(seq.prompt_ids),
                num_cached_tokens=seq.num_cached_tokens,
                prompt_logprobs=seq.prompt_logprobs if first_output else None,
                scheduled_ns=seq.first_scheduled_ns if first_output else None,
            ))
        return outputs

    def _verify_speculation(self, speculating: list[tuple[Sequence, int]],
                            logits: torch.Tensor) -> list[RequestOutput]:
        """Keep each speculating sequence's verified tokens (``spec_verify.verify``); the KV
        of refused proposals stays in slots past num_computed, overwritten later."""
        outputs = []
        row = 0
        for seq, count in speculating:
            proposed, proposal_probs = seq.spec_ids, seq.spec_probs
            seq.spec_ids, seq.spec_probs = [], None
            tokens, logprobs, kept = verify(seq, logits[row:row + count], proposed,
                                            proposal_probs)
            row += count
            self.num_spec_proposed += len(proposed)
            self.num_spec_accepted += kept
            self.spec_policy.verified(seq, len(proposed), kept)
            emitted, finish = [], None
            for token in tokens:
                emitted.append(token)
                seq.output_ids.append(token)
                finish = self._finish_reason(seq, token)
                if finish:
                    break
            # computed: the last token and the kept proposals (not the token added after them)
            seq.num_computed += len(emitted)
            self.scheduler.register_full_blocks(seq)
            if finish:
                self._finish(seq, finish)
            outputs.append(RequestOutput(
                request_id=seq.request_id, token_ids=emitted,
                logprobs=logprobs[:len(emitted)] if logprobs is not None else None,
                finish_reason=finish, num_prompt_tokens=len(seq.prompt_ids),
                num_cached_tokens=seq.num_cached_tokens))
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
            if target_pos != len(seq.prompt_logprobs):
                continue  # recorded before this sequence was preempted
            token = seq.prompt_ids[target_pos]
            top = []
            if top_k:
                values, idx = torch.topk(logprobs[i], top_k)
                top = list(zip(idx.tolist(), values.tolist()))
            seq.prompt_logprobs.append(TokenLogprob(token, float(logprobs[i, token]), top))

    def _finish_reason(self, seq: Sequence, token_id: int) -> str | None:
        params = seq.params
        constrained = seq.matcher is not None
        if token_id in params.stop_token_ids and (constrained or not params.ignore_eos):
            return "stop"
        if constrained and seq.matcher.is_finished:  # the grammar admits nothing more
            return "stop"
        if len(seq.output_ids) >= params.max_tokens:
            return "length"
        if seq.num_tokens >= self.config.context_length:
            return "length"
        return None

    def _finish(self, seq: Sequence, reason: str) -> None:
        seq.finish_reason = reason
        self.scheduler.remove(seq)


def _make_proposer(config: EngineConfig, model: torch.nn.Module,
                   draft_model: torch.nn.Module | None) -> Proposer | None:
    method = config.speculative
    if method is None:
        return None
    if config.num_speculative_tokens < 1:
        raise ValueError("num_speculative_tokens must be at least 1")
    if method == "ngram":
        return NgramProposer()
    if method == "draft":
        if draft_model is None:
            raise ValueError("speculative decoding with a draft model needs the draft model")
        if draft_model.config.vocab_size != model.config.vocab_size:
            raise ValueError(f"the draft model's vocabulary ({draft_model.config.vocab_size} "
                             f"tokens) is not the target's ({model.config.vocab_size})")
        return DraftModelProposer(draft_model)
    raise ValueError(f"unknown speculative decoding method {method!r}")
