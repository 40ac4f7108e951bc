"""The native decode stack (k2serve/native/decode_stack.cpp) runs a quantized Llama model's
steps whose rows are all decode rows (decodes, and short prompts, which the engine runs as
decode rows) in one call: its hidden states must be bitwise those of the per-op path
(LlamaDecoderLayer.forward_quantized) on every vector path, for any batch of such rows, and
a step with dense prompt rows must not take it."""

from __future__ import annotations

import pytest
import torch

from k2serve import native
from k2serve.engine.config import EngineConfig
from k2serve.engine.core import EngineCore
from k2serve.engine.sampling_params import SamplingParams
from k2serve.engine.sequence import GenerationRequest
from k2serve.models.loader import load_model
from k2serve.serving.loader import SERVING_QUANTIZATION
from k2serve.text.tokenizer import Tokenizer
from tests.tiny_models import smollm2_gguf_path

kernels = native.kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="no native kernels: the per-op path runs")


@pytest.fixture(scope="module")
def smollm2():
    model, _ = load_model(smollm2_gguf_path(), progress=False, quantized=SERVING_QUANTIZATION)
    return model, Tokenizer.from_gguf(smollm2_gguf_path())


@pytest.fixture(params=kernels.vector_isas() if kernels is not None else [])
def vector_path(request):
    before = kernels.vector_isa()
    kernels.set_vector_isa(request.param)
    yield request.param
    kernels.set_vector_isa(before)


class Compare:
    """Wraps the model's forward: every step the stack would run is run both ways, and the
    per-op result (which the step then uses) is checked bitwise against the stack's."""

    def __init__(self, inner):
        self.inner = inner
        self.forward = inner.forward  # the model's own, before the patch
        self.stack = inner.decode_stack
        self.compared_rows: list[int] = []
        self.per_op_steps = 0

    def __call__(self, input_ids, positions, attn, inputs_embeds=None):
        self.inner.decode_stack = self.stack
        fused = self.forward(input_ids, positions, attn, inputs_embeds)
        self.inner.decode_stack = None
        per_op = self.forward(input_ids, positions, attn, inputs_embeds)  # same K/V writes
        self.inner.decode_stack = self.stack
        if getattr(attn, "decode_only", False):
            assert torch.equal(fused, per_op), "the stack's hidden states differ from the per-op path's"
            self.compared_rows.append(input_ids.shape[0])
        else:
            self.per_op_steps += 1
        return per_op


def test_the_stack_is_built_for_the_served_int4_model(smollm2):
    model, _ = smollm2
    stack = model.model.decode_stack
    assert stack is not None and stack.num_layers == model.config.num_layers
    assert model.model.decode_stack_rows == float("inf")  # serving: int4 at every decode M


def test_decode_steps_equal_the_per_op_path_bitwise(smollm2, vector_path, monkeypatch):
    model, tok = smollm2
    compare = Compare(model.model)
    monkeypatch.setattr(model.model, "forward", compare)
    core = EngineCore(model, EngineConfig(context_length=2048, num_kv_blocks=256, max_step_tokens=64))
    prompts = ["The history of Rome begins", "def fibonacci(n):", "List three fruits: " * 20, "Hi"]
    for i, text in enumerate(prompts):
        params = SamplingParams(max_tokens=6 + 3 * i, temperature=0.8 if i % 2 else 0, seed=i,
                                ignore_eos=True)
        core.add(GenerationRequest(f"r{i}", tok.encode(text), params))
        if i == 1:
            core.step()  # two short prompts alone: their rows are decode rows
    while core.has_work():
        core.step()
    # decode steps of 4, 3, 2 and 1 rows (requests finish one by one), short prompts as decode
    # rows (more rows than sequences), and the long prompt's dense steps per-op
    assert {4, 3, 2, 1} <= set(compare.compared_rows)
    assert max(compare.compared_rows) > 4
    assert compare.per_op_steps >= 1


def test_a_dense_prompt_step_never_takes_the_stack(smollm2, monkeypatch):
    model, tok = smollm2
    calls = []
    original = model.model.decode_stack

    class Recording:
        num_layers = original.num_layers

        def forward(self, *args):
            calls.append(args[0].shape[0])
            return original.forward(*args)

    monkeypatch.setattr(model.model, "decode_stack", Recording())
    core = EngineCore(model, EngineConfig(context_length=2048, num_kv_blocks=256))
    prompt = tok.encode("List three fruits: " * 20)
    assert len(prompt) >= EngineConfig().dense_prompt_min_tokens
    core.add(GenerationRequest("r", prompt, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)))
    while core.has_work():
        core.step()
    assert calls == [1, 1, 1]  # the prompt's step per-op (dense); the 3 decode steps after it
