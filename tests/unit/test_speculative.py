"""Speculative decoding (``EngineConfig.speculative``): greedy tokens are those of plain
decoding, sampled tokens are distributed as plain decoding's (checked against the exact
distribution a reference implementation, transformers, computes), and the KV pool and
prefix cache stay consistent whatever proposals are refused."""

from __future__ import annotations

import dataclasses
import itertools

import pytest
import torch
from scipy import stats
from torch import nn

from k2serve.engine import spec_verify
from k2serve.engine.config import EngineConfig, parse_speculative
from k2serve.engine.core import EngineCore
from k2serve.engine.sampling_params import SamplingParams
from k2serve.engine.sequence import GenerationRequest
from k2serve.engine.spec_propose import NgramProposer
from k2serve.models.loader import load_model
from k2serve.serving.loader import SERVING_QUANTIZATION
from k2serve.structured import GrammarCompiler
from k2serve.structured.grammars import json_schema_grammar
from k2serve.text.tokenizer import Tokenizer
from tests.tiny_models import smollm2_gguf_path

CODE = '''def total_price(items, tax_rate):
    subtotal = 0
    for item in items:
        if item.quantity <= 0:
            continue
        subtotal += item.price * item.quantity
    tax = subtotal * tax_rate
    return subtotal + tax
'''
# The answer copies most of the prompt: n-gram proposals are often right, and often not.
EDIT = ("<|im_start|>user\nRewrite this function with subtotal renamed to base_amount:\n"
        f"```python\n{CODE}```<|im_end|>\n<|im_start|>assistant\n```python\n")
OTHERS = ["The history of Rome begins", "1, 2, 3, 4, 5, 6, 7,", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf(smollm2_gguf_path())


@pytest.fixture(scope="module", params=["fp32", "int4"])
def target(request, one_torch_thread):
    quantized = SERVING_QUANTIZATION if request.param == "int4" else False
    return load_model(smollm2_gguf_path(), progress=False, quantized=quantized)[0]


@pytest.fixture(scope="module")
def shallow_draft(one_torch_thread):
    """SmolLM2's first 6 of 30 layers under its own head: a draft that is often wrong."""
    model, config = load_model(smollm2_gguf_path(), progress=False)
    model.model.layers = nn.ModuleList(list(model.model.layers)[:6])
    model.config = dataclasses.replace(config, num_layers=6)
    return model


def run(core: EngineCore, requests: list[GenerationRequest]):
    """Step until idle: request id -> (token ids, finish reason, logprobs)."""
    for r in requests:
        core.add(r)
    out = {r.request_id: ([], None, []) for r in requests}
    while core.has_work():
        for o in core.step():
            ids, _, lps = out[o.request_id]
            out[o.request_id] = (ids + o.token_ids, o.finish_reason, lps + (o.logprobs or []))
    return out


def core_for(model, speculative=None, draft=None, **overrides):
    """Proposals always of the most tokens (not sized by ``spec_policy``), unless overridden:
    these tests are about what verification keeps, whatever was proposed."""
    config = EngineConfig(**{"context_length": 2048, "num_kv_blocks": 256,
                             "speculative": speculative, "adaptive_speculation": False,
                             **overrides})
    return EngineCore(model, config, draft_model=draft)


def greedy_requests(tok, grammar):
    edit = tok.encode(EDIT)
    newline = tok.encode("\n")[-1]

    def req(rid, prompt, **kw):
        return GenerationRequest(rid, list(prompt), SamplingParams(temperature=0, **kw))
    return [
        req("edit", edit, max_tokens=60, ignore_eos=True),
        # max_tokens ends in the middle of accepted proposals (k = 4)
        *[req(f"edit-len{n}", edit, max_tokens=n, ignore_eos=True) for n in (6, 11, 23)],
        # a stop token inside an accepted run
        req("edit-stop", edit, max_tokens=60, stop_token_ids=frozenset({newline})),
        req("edit-penalized", edit, max_tokens=40, ignore_eos=True, repetition_penalty=1.2,
            presence_penalty=0.5, logprobs=2),
        *[req(f"other{i}", tok.encode(p), max_tokens=20, ignore_eos=True)
          for i, p in enumerate(OTHERS)],
        # grammar-constrained sequences do not speculate: same tokens, same finish
        req("json", tok.encode("<|im_start|>user\nA person as JSON.<|im_end|>\n"
                               "<|im_start|>assistant\n"), max_tokens=60, grammar=grammar,
            stop_token_ids=tok.stop_token_ids),
    ]


def test_greedy_tokens_identical_with_and_without_speculation(target, shallow_draft, tok):
    grammar = GrammarCompiler(tok).compile(json_schema_grammar(
        {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10}},
         "required": ["name"], "additionalProperties": False}))
    plain = run(core_for(target), greedy_requests(tok, grammar))
    # the int4 model's LM head runs int8 below 8 rows, dense from 8 (top 16 logits exact
    # either way): other logits, and so logprobs, move a little with the step's row count
    tolerance = 1e-3 if target.quantization is None else 0.2
    assert plain["edit-stop"][1] == "stop" and plain["json"][1] == "stop"
    for method, draft in [("ngram", None), ("draft", shallow_draft)]:
        core = core_for(target, method, draft)
        spec = run(core, greedy_requests(tok, grammar))
        for rid, (ids, finish, lps) in plain.items():
            got_ids, got_finish, got_lps = spec[rid]
            assert (got_ids, got_finish) == (ids, finish), (method, rid)
            assert [lp.token_id for lp in got_lps] == [lp.token_id for lp in lps]
            for a, b in zip(got_lps, lps):
                assert a.logprob == pytest.approx(b.logprob, abs=tolerance)
                assert [t for t, _ in a.top] == [t for t, _ in b.top]
        stats_ = core.stats()
        # proposals were both kept and refused
        assert stats_["spec_accepted_tokens"] > (20 if method == "ngram" else 0), stats_
        assert stats_["spec_proposed_tokens"] > stats_["spec_accepted_tokens"], stats_
        assert stats_["kv_blocks_free"] == stats_["kv_blocks_total"]

        # the prefix cache holds what speculation computed: a rerun hits it, same tokens
        core.add(GenerationRequest("again", tok.encode(EDIT), SamplingParams(
            temperature=0, max_tokens=60, ignore_eos=True)))
        ids, cached = [], 0
        while core.has_work():
            for o in core.step():
                ids += o.token_ids
                cached = o.num_cached_tokens
        assert cached >= 16 * (len(tok.encode(EDIT)) // 16) - 16 and ids == plain["edit"][0]


def test_the_target_as_its_own_draft_has_every_proposal_kept(target, tok):
    """The draft's own KV (caught up from what the target kept) is right: a draft equal to
    the target proposes exactly the target's greedy tokens."""
    def requests():
        return [GenerationRequest(f"s{i}", tok.encode(p), SamplingParams(
            temperature=0, max_tokens=24, ignore_eos=True)) for i, p in enumerate(OTHERS[:2])]
    plain = run(core_for(target), requests())
    core = core_for(target, "draft", target)
    assert run(core, requests()) == plain
    s = core.stats()
    assert s["spec_proposed_tokens"] == s["spec_accepted_tokens"] > 20


def test_speculation_within_a_tight_kv_pool_never_preempts_for_proposals(target, tok):
    """With few free blocks, proposals shrink to the blocks a sequence has; preemption (for
    plain decode slots) still recomputes the same tokens."""
    def requests():
        return [GenerationRequest(f"r{i}", tok.encode(EDIT), SamplingParams(
            temperature=0, max_tokens=40 + 7 * i, ignore_eos=True)) for i in range(3)]
    plain = run(core_for(target, max_step_tokens=64), requests())
    tight = core_for(target, "ngram", num_kv_blocks=13, max_step_tokens=64)
    assert run(tight, requests()) == plain
    assert tight.stats()["preemptions"] > 0 and tight.stats()["spec_accepted_tokens"] > 0
    assert tight.stats()["kv_blocks_free"] == tight.stats()["kv_blocks_total"]


class WrongProposer:
    """Proposes a token the target never chooses here, every time."""

    def __init__(self, token: int):
        self.token = token

    def propose(self, requests, live):
        for seq, limit in requests:
            seq.spec_ids, seq.spec_probs = [self.token] * limit, None


@pytest.mark.parametrize("adaptive", [True, False])
def test_proposals_that_never_hold_are_soon_given_up(target, tok, adaptive):
    """A proposer as costly as half a target step whose proposals are always refused: the
    policy stops proposing (probing now and then), and the tokens are plain decoding's."""
    request = GenerationRequest("edit", tok.encode(EDIT), SamplingParams(
        temperature=0, max_tokens=60, ignore_eos=True))
    plain = run(core_for(target), [request])
    wrong = next(t for t in range(100) if t not in plain["edit"][0])
    core = core_for(target, "ngram", adaptive_speculation=adaptive)
    core.proposer = WrongProposer(wrong)
    core.spec_policy.timed = lambda *measured: None  # the proposer's cost, pinned:
    core.spec_policy.cost = 0.5
    assert run(core, [request]) == plain
    s = core.stats()
    assert s["spec_accepted_tokens"] == 0
    if adaptive:  # one token first, then a one-token probe after waits of 8, 16, 32 steps
        assert 1 <= s["spec_proposed_tokens"] <= 5, s
    else:
        assert s["spec_proposed_tokens"] > 200, s


# -- sampled tokens: distributed as without speculation ------------------------------------------
VOCAB = 8

NEW_TOKENS = 4  # the joint distribution of all of them is tested (8^4 outcomes)


def tiny_vocab_llama(seed: int):
    """A random transformers Llama over 8 tokens with peaked next-token distributions."""
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # logits of a few units: far from uniform
    return model


@pytest.fixture(scope="module")
def small_vocab(tmp_path_factory, one_torch_thread):
    """(k2serve target, k2serve draft, prompt, exact joint distribution of the 4 new tokens).
    The prompt is the model's own greedy text: it repeats itself, as text a model wrote
    does, so the n-gram proposer finds matches, likely and unlikely ones."""
    models = []
    for seed in (0, 1):
        directory = tmp_path_factory.mktemp(f"vocab8-{seed}")
        tiny_vocab_llama(seed).save_pretrained(directory)
        models.append(load_model(str(directory), progress=False)[0])
    reference = tiny_vocab_llama(0)
    prompt = list(range(VOCAB))
    with torch.no_grad():
        for _ in range(40):
            prompt.append(int(reference(torch.tensor([prompt])).logits[0, -1].argmax()))
    prefixes = torch.tensor(list(itertools.product(range(VOCAB), repeat=NEW_TOKENS - 1)))
    ids = torch.cat([torch.tensor(prompt).expand(len(prefixes), -1), prefixes], dim=1)
    with torch.no_grad():
        logprobs = torch.log_softmax(reference(ids).logits.double(), dim=-1)
    n = len(prompt)
    joint = torch.zeros(len(prefixes), VOCAB, dtype=torch.float64)  # [t1 t2 t3], t4
    joint += logprobs[:, -1, :]
    for j in range(NEW_TOKENS - 1):  # log p(t_{j+1} | prompt, t_1..t_j)
        joint += logprobs[torch.arange(len(prefixes)), n - 1 + j, prefixes[:, j]].unsqueeze(1)
    return models[0], models[1], prompt, joint.exp().flatten()


def draw_counts(model, draft, method, prompt, draws: int) -> torch.Tensor:
    core = core_for(model, method, draft, max_num_seqs=256, num_kv_blocks=2048,
                    max_step_tokens=32768, context_length=128, num_speculative_tokens=3)
    counts = torch.zeros(VOCAB ** NEW_TOKENS, dtype=torch.float64)
    out = run(core, [GenerationRequest(str(i), prompt, SamplingParams(
        max_tokens=NEW_TOKENS, temperature=1.0, ignore_eos=True)) for i in range(draws)])
    for ids, _, _ in out.values():
        assert len(ids) == NEW_TOKENS
        index = 0
        for t in ids:
            index = index * VOCAB + t
        counts[index] += 1
    if method is not None:
        s = core.stats()
        # many proposals, many kept and many refused
        assert s["spec_proposed_tokens"] > draws
        assert 0.1 * s["spec_proposed_tokens"] < s["spec_accepted_tokens"] < 0.9 * s["spec_proposed_tokens"]
    return counts


def chi_square_p(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test of counts against probs; outcomes expected fewer than 5 times pooled."""
    expected = probs * counts.sum()
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum().unsqueeze(0)])
    expected = torch.cat([expected[big], expected[~big].sum().unsqueeze(0)])
    assert big.sum() >= 30  # a test over many outcomes, not a handful
    return float(stats.chisquare(observed.numpy(), expected.numpy()).pvalue)


DRAWS = 2000
# A correct sampler fails this 1 run in 1000, whatever the seed; the wrong rule below fails
# it by dozens of orders of magnitude.
P_MIN = 1e-3


@pytest.mark.parametrize("method", [None, "ngram", "draft"])
def test_sampled_tokens_follow_the_target_distribution(small_vocab, method):
    model, draft, prompt, exact = small_vocab
    torch.manual_seed(1234)  # reproducible; P_MIN does not rely on it
    counts = draw_counts(model, draft if method == "draft" else None, method, prompt, DRAWS)
    assert chi_square_p(counts, exact) > P_MIN


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_the_distribution_test_catches_a_wrong_acceptance_rule(small_vocab, method, monkeypatch):
    """A classic bug: a refused proposal replaced by a draw from p itself, not from
    norm(max(0, p - q)). The same test must reject it."""
    model, draft, prompt, exact = small_vocab
    monkeypatch.setattr(spec_verify, "residual_distribution", lambda p, q, proposed: p)
    torch.manual_seed(1234)
    counts = draw_counts(model, draft if method == "draft" else None, method, prompt, DRAWS)
    assert chi_square_p(counts, exact) < 1e-12


# -- units ----------------------------------------------------------------------------------------
def test_ngram_lookup_proposes_what_followed_the_latest_match():
    ngram = NgramProposer(max_n=3, min_n=2)
    #        0  1  2  3  4  5  6  7  8  9
    tokens = [5, 6, 7, 8, 9, 5, 6, 7, 1, 2, 9, 6, 7]
    assert ngram.lookup(tokens, 3) == [1, 2, 9]  # "6 7" last seen at 6-7 (3-gram "9 6 7": none)
    assert ngram.lookup(tokens, 1) == [1]
    assert ngram.lookup([1, 2, 3, 4], 4) == []  # no earlier occurrence
    assert ngram.lookup([1, 2, 1, 2], 4) == [1, 2]  # up to the end of the sequence
    # a byte pattern that matches across token boundaries is not a match
    assert ngram.lookup([0, 256, 0, 5, 0, 1], 2) == []
    assert ngram.lookup(tokens, 0) == []


def test_speculative_option_parsing():
    assert parse_speculative(None) == (None, None)
    assert parse_speculative("ngram") == ("ngram", None)
    assert parse_speculative("draft:/models/small.gguf") == ("draft", "/models/small.gguf")
    for bad in ("draft:", "eagle", "draft"):
        with pytest.raises(ValueError, match="--speculative"):
            parse_speculative(bad)


def test_draft_model_needs_the_targets_vocabulary(small_vocab, target):
    model, _, _, _ = small_vocab
    with pytest.raises(ValueError, match="vocabulary"):
        core_for(target, "draft", model)
    with pytest.raises(ValueError, match="draft model"):
        core_for(model, "draft", None)
