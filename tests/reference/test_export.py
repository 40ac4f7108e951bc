"""`k2serve export`: the embedded GGUF as a Hugging Face checkpoint, read back by transformers
(the reference engines such as vLLM build on): the same logits as k2serve's model on the same
dequantized weights, the same token ids, text and chat prompts as k2serve's tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

from k2serve.models.layers.attention import ContiguousAttention, Segment, SequenceKVCache  # noqa: E402
from k2serve.models.loader import load_model  # noqa: E402
from k2serve.text.chat_template import ChatTemplate  # noqa: E402
from k2serve.text.tokenizer import Tokenizer  # noqa: E402
from tests.reference.test_text_vs_transformers import CONVERSATIONS, TEXTS  # noqa: E402
from tests.tiny_models import smollm2_gguf_path  # noqa: E402

# Both sides multiply the same float32 weights; only the order of float32 sums differs.
LOGITS_ATOL = 1e-3
PROMPTS = ["The capital of France is",
           "<|im_start|>user\nÉcris un haïku sur la mer 🌊<|im_end|>\n<|im_start|>assistant\n",
           "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1) + fibonacci(n - 2)"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Written by the CLI, as a user would."""
    out = tmp_path_factory.mktemp("export") / "smollm2"
    done = subprocess.run([sys.executable, "-m", "k2serve.cli", "export", "embedded", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return str(out)


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.from_gguf(smollm2_gguf_path())


@pytest.fixture(scope="module")
def ref_tok(exported):
    return transformers.AutoTokenizer.from_pretrained(exported)


def ours_logits(model, config, ids: list[int]) -> torch.Tensor:
    cache = SequenceKVCache(config.num_layers, config.num_kv_heads, config.head_dim)
    ctx = ContiguousAttention([Segment(cache, 0, len(ids))])
    with torch.no_grad():
        hidden = model(torch.tensor(ids), torch.arange(len(ids)), ctx)
        return model.compute_logits(hidden)


def test_the_files_describe_the_gguf(exported, tok):
    config = json.load(open(os.path.join(exported, "config.json")))
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_key_value_heads"],
            config["rope_theta"], config["rms_norm_eps"]) == (30, 576, 3, 100000.0, 1e-5)
    generation = json.load(open(os.path.join(exported, "generation_config.json")))
    assert set(generation["eos_token_id"]) == set(tok.stop_token_ids)  # stop where k2serve does
    bad = subprocess.run([sys.executable, "-m", "k2serve.cli", "export", "nope.bin", exported],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not a .gguf file" in bad.stderr


def test_transformers_logits_match_k2serve_on_the_same_weights(exported, tok):
    hf = transformers.LlamaForCausalLM.from_pretrained(exported, dtype=torch.float32).eval()
    model, config = load_model(smollm2_gguf_path(), progress=False)  # dense float32
    diffs = []
    for prompt in PROMPTS:
        ids = tok.encode(prompt)
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0]
        ours = ours_logits(model, config, ids)
        assert ours.shape == ref.shape
        assert torch.equal(ours[-1].argmax(), ref[-1].argmax())
        diffs.append((ours - ref).abs().max().item())
    print(f"max abs logits diff per prompt: {[f'{d:.1e}' for d in diffs]}")
    assert max(diffs) <= LOGITS_ATOL, diffs
    # k2serve reads the exported directory back to the very same tensors.
    again, _ = load_model(exported, progress=False)
    ids = tok.encode(PROMPTS[1])
    assert torch.equal(ours_logits(again, config, ids), ours_logits(model, config, ids))


@pytest.mark.parametrize("text", TEXTS)
def test_the_exported_tokenizer_encodes_and_decodes_as_k2serve(tok, ref_tok, text):
    ids = tok.encode(text)
    assert ref_tok.encode(text, add_special_tokens=False) == ids
    assert ref_tok.encode(text) == tok.encode(text, add_special_tokens=True)
    for skip in (True, False):
        assert ref_tok.decode(ids, skip_special_tokens=skip) == \
            tok.decode(ids, skip_special_tokens=skip)


def test_the_exported_tokenizer_knows_the_same_special_tokens(tok, ref_tok):
    assert len(ref_tok) == tok.vocab_size
    assert (ref_tok.bos_token_id, ref_tok.eos_token_id, ref_tok.unk_token_id,
            ref_tok.pad_token_id) == (tok.bos_token_id, tok.eos_token_id, tok.unk_token_id,
                                      tok.pad_token_id)
    assert {i for i, t in ref_tok.added_tokens_decoder.items() if t.special} == tok.special_ids


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_the_exported_chat_template_renders_as_k2serve(tok, ref_tok, name):
    messages = CONVERSATIONS[name]
    rendered = ChatTemplate.from_tokenizer(tok).render(messages, add_generation_prompt=True)
    assert ref_tok.apply_chat_template(messages, tokenize=False,
                                       add_generation_prompt=True) == rendered
    assert list(ref_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                            return_dict=False)) == tok.encode(rendered)
