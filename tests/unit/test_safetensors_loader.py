"""HF safetensors checkpoints (single file and sharded) against transformers, and errors."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from k2serve.models.config import ModelConfig  # noqa: E402
from k2serve.models.layers.attention import ContiguousAttention, Segment, SequenceKVCache  # noqa: E402
from k2serve.models.loader import load_model  # noqa: E402
from tests.tiny_models import tiny_hf_llama  # noqa: E402



def our_logits(model, config, ids):
    cache = SequenceKVCache(config.num_layers, config.num_kv_heads, config.head_dim,
                            dtype=model.model.embed_tokens.weight.dtype)
    ctx = ContiguousAttention([Segment(cache, 0, len(ids))])
    return model.compute_logits(model(ids, torch.arange(len(ids)), ctx))


IDS = torch.randint(0, 256, (48,), generator=torch.Generator().manual_seed(5))


def check_against_hf(path, hf_model, dtype=torch.float32, atol=1e-4):
    model, config = load_model(str(path), dtype=dtype, progress=False)
    with torch.no_grad():
        ref = hf_model.float()(IDS[None]).logits[0]
    logits = our_logits(model, config, IDS)
    assert logits.dtype == torch.float32
    diff = (logits - ref).abs().max().item()
    assert diff <= atol, diff
    return model, config


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_single_file(tmp_path, tie):
    hf_model = tiny_hf_llama(tie=tie)
    hf_model.save_pretrained(tmp_path)
    assert os.path.isfile(tmp_path / "model.safetensors")
    model, config = check_against_hf(tmp_path, hf_model)
    assert config.tie_word_embeddings == tie and (model.lm_head is None) == tie
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.num_layers) == (4, 2, 16, 2)


def test_sharded_with_index(tmp_path):
    hf_model = tiny_hf_llama()
    hf_model.save_pretrained(tmp_path, max_shard_size="40KB")
    with open(tmp_path / "model.safetensors.index.json") as f:
        assert len(set(json.load(f)["weight_map"].values())) > 2
    assert not os.path.exists(tmp_path / "model.safetensors")
    check_against_hf(tmp_path, hf_model)


def test_bf16_checkpoint_is_upcast(tmp_path):
    hf_model = tiny_hf_llama(dtype=torch.bfloat16)
    hf_model.save_pretrained(tmp_path)
    assert next(iter(load_file(tmp_path / "model.safetensors").values())).dtype == torch.bfloat16
    model, _ = check_against_hf(tmp_path, hf_model)  # reference: the bf16 weights in fp32
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_load_in_bf16(tmp_path):
    hf_model = tiny_hf_llama()
    hf_model.save_pretrained(tmp_path)
    model, _ = check_against_hf(tmp_path, hf_model, dtype=torch.bfloat16, atol=0.1)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "rope_theta": 500.0, "factor": 4.0},
    {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
], ids=["linear", "llama3"])
def test_rope_scaling(tmp_path, rope):
    hf_model = tiny_hf_llama(rope_parameters=rope)
    hf_model.save_pretrained(tmp_path)
    _, config = check_against_hf(tmp_path, hf_model)
    assert config.rope_scaling["rope_type"] == rope["rope_type"]
    assert config.rope_theta == rope["rope_theta"]


def test_transformers_v4_style_config():
    cfg = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 2048, "intermediate_size": 8192,
           "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
           "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
           "tie_word_embeddings": True, "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009],
           "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"}}
    config = ModelConfig.from_hf_config(cfg)
    assert config.rope_theta == 500000.0 and config.head_dim == 64
    assert config.rope_scaling == cfg["rope_scaling"]
    assert config.eos_token_id == [128001, 128008, 128009] and config.context_length == 131072


def _rewrite(path, edit):
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_names_it(tmp_path):
    tiny_hf_llama().save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.mlp\.up_proj\.weight'"):
        load_model(str(tmp_path), progress=False)


def test_missing_lm_head_when_untied(tmp_path):
    tiny_hf_llama().save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.pop("lm_head.weight"))
    with pytest.raises(ValueError, match="missing tensor 'lm_head.weight'"):
        load_model(str(tmp_path), progress=False)


def test_wrong_shape_names_the_tensor(tmp_path):
    tiny_hf_llama().save_pretrained(tmp_path)

    def edit(t):
        name = "model.layers.0.self_attn.k_proj.weight"
        t[name] = t[name][:, :32].contiguous()
    _rewrite(tmp_path, edit)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*"
                                         r"expected shape \(32, 64\), got \(32, 32\)"):
        load_model(str(tmp_path), progress=False)


def test_unexpected_tensor(tmp_path):
    tiny_hf_llama().save_pretrained(tmp_path)
    _rewrite(tmp_path, lambda t: t.__setitem__("model.layers.0.self_attn.q_proj.bias", torch.zeros(64)))
    with pytest.raises(ValueError, match=r"unexpected tensor 'model\.layers\.0\.self_attn\.q_proj\.bias'"):
        load_model(str(tmp_path), progress=False)


def test_unsupported_architecture(tmp_path):
    tiny_hf_llama().save_pretrained(tmp_path)
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    cfg["model_type"], cfg["architectures"] = "gpt2", ["GPT2LMHeadModel"]
    with open(tmp_path / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match="unsupported architecture model_type='gpt2'"):
        load_model(str(tmp_path), progress=False)


def test_missing_shard_and_bad_paths(tmp_path):
    tiny_hf_llama().save_pretrained(tmp_path / "m", max_shard_size="40KB")
    with open(tmp_path / "m" / "model.safetensors.index.json") as f:
        shard = sorted(set(json.load(f)["weight_map"].values()))[-1]
    os.remove(tmp_path / "m" / shard)
    with pytest.raises(ValueError, match=f"shard '{shard}'"):
        load_model(str(tmp_path / "m"), progress=False)
    with pytest.raises(ValueError, match="no such model file or directory"):
        load_model(str(tmp_path / "nope"), progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_model(str(tmp_path / "empty"), progress=False)
    (tmp_path / "model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported model file"):
        load_model(str(tmp_path / "model.bin"), progress=False)


def test_progress_bar(tmp_path, capsys):
    tiny_hf_llama().save_pretrained(tmp_path)
    load_model(str(tmp_path), progress=True)
    err = capsys.readouterr().err
    assert "Loading" in err and "tensor" in err
    load_model(str(tmp_path), progress=False)
    assert capsys.readouterr().err == ""
