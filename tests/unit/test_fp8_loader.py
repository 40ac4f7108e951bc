"""FP8 block-quantized checkpoints: dequantization, shard-by-shard loading, the tiny K2
writer, and errors naming the tensor at fault.

FP8 error bound (e4m3, block scale s = block amax / 448): elementwise
|W - dequant(quant(W))| <= max(2^-4 |W|, 2^-10 s) — 3 mantissa bits round to nearest down
to 2^-6, subnormals below are 2^-9 apart. Over Gaussian weights that is ~2.7% RMS relative
error per matrix; the tiny random 3-layer model amplifies it to ~25% RMS relative error
on the logits (the same as Gaussian noise of that size), so the model-level check against
the bf16 source uses a 0.4 relative RMS bound, and a model whose weights are exactly the
dequantized source must match the FP8 load to float32 rounding.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from k2serve.models.deepseek_config import DeepseekV3Config
from k2serve.models.deepseek_v3 import DeepseekV3ForCausalLM
from k2serve.models.layers.attention import ContiguousAttention, Segment, SequenceKVCache
from k2serve.models.loader import load_model
from k2serve.models.loaders.fp8 import dequantize_fp8_blocks, quantize_fp8_blocks
from k2serve.models.tiny_k2 import write_tiny_k2_checkpoint

INDEX = "model.safetensors.index.json"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The same tiny K2 weights as FP8 (3 shards) and as the bf16 source."""
    root = tmp_path_factory.mktemp("tiny_k2")
    return (write_tiny_k2_checkpoint(root / "fp8", seed=7, fp8=True),
            write_tiny_k2_checkpoint(root / "bf16", seed=7, fp8=False))


def read_all(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in directory.glob("model-*.safetensors"):
        tensors.update(load_file(str(file)))
    return tensors


def logits_of(model, ids):
    c = model.config
    cache = SequenceKVCache(c.num_layers, 1, c.latent_dim, value_dim=0, dtype=model.model.embed_tokens.weight.dtype)
    return model.compute_logits(model(ids, torch.arange(len(ids)), ContiguousAttention([Segment(cache, 0, len(ids))])))


def within_fp8_bound(source: torch.Tensor, dequantized: torch.Tensor, scale: torch.Tensor, block=(128, 128)):
    s = scale.repeat_interleave(block[0], 0)[:source.shape[0]].repeat_interleave(block[1], 1)[:, :source.shape[1]]
    bound = torch.maximum(source.abs() * 2 ** -4, s * 2 ** -10) * (1 + 1e-6)
    return bool(((source - dequantized).abs() <= bound).all())


# ---------------------------------------------------------------------- dequantization
@pytest.mark.parametrize("shape", [(128, 128), (256, 384), (200, 300), (40, 64), (1, 129)])
def test_dequantize_matches_blockwise_definition(shape):
    g = torch.Generator().manual_seed(sum(shape))
    weight = (torch.randn(shape, generator=g) * 40).clamp(-448, 448).to(torch.float8_e4m3fn)
    scale = torch.rand(-(-shape[0] // 128), -(-shape[1] // 128), generator=g) + 0.01
    rows, cols = torch.arange(shape[0])[:, None], torch.arange(shape[1])[None, :]
    expected = weight.float() * scale[rows // 128, cols // 128]  # element (i, j) uses block (i//128, j//128)
    assert torch.equal(dequantize_fp8_blocks(weight, scale), expected)


@pytest.mark.parametrize("shape", [(96, 64), (300, 200), (128, 256)])
def test_quantize_round_trip_within_fp8_bound(shape):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=g) * torch.logspace(-3, 1, shape[1])  # small and large columns
    q, scale = quantize_fp8_blocks(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (-(-shape[0] // 128), -(-shape[1] // 128))
    assert within_fp8_bound(w, dequantize_fp8_blocks(q, scale), scale)


def test_dequantize_rejects_wrong_scale_shape():
    with pytest.raises(ValueError, match=r"expected block scales of shape \(2, 1\)"):
        dequantize_fp8_blocks(torch.zeros(200, 64, dtype=torch.float8_e4m3fn), torch.ones(1, 1))


# ---------------------------------------------------------------------- the tiny K2 writer
def test_writer_layout(checkpoints):
    fp8_dir, _ = checkpoints
    config = json.loads((fp8_dir / "config.json").read_text())
    assert config["model_type"] == "kimi_k2" and config["architectures"] == ["DeepseekV3ForCausalLM"]
    assert "AutoModelForCausalLM" in config["auto_map"] and config["rope_scaling"]["type"] == "yarn"
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    assert (fp8_dir / "tiktoken.model").is_file() and (fp8_dir / "tokenizer_config.json").is_file()
    weight_map = json.loads((fp8_dir / INDEX).read_text())["weight_map"]
    assert sorted(set(weight_map.values())) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    tensors = read_all(fp8_dir)
    assert set(tensors) == set(weight_map)
    assert tensors["model.layers.1.self_attn.kv_b_proj.weight"].dtype == torch.float8_e4m3fn
    assert tensors["model.layers.1.mlp.experts.7.down_proj.weight_scale_inv"].dtype == torch.float32
    assert tensors["model.layers.2.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.0.input_layernorm.weight"):
        assert tensors[name].dtype == torch.bfloat16 and name + "_scale_inv" not in tensors
    assert config["vocab_size"] == tensors["model.embed_tokens.weight"].shape[0]


def test_fp8_weights_within_bound_of_source(checkpoints):
    fp8, source = (read_all(d) for d in checkpoints)
    quantized = [n for n in fp8 if n.endswith("_scale_inv")]
    assert len(quantized) > 40
    for scale_name in quantized:
        name = scale_name[:-len("_scale_inv")]
        src = source[name].float()
        deq = dequantize_fp8_blocks(fp8[name], fp8[scale_name])
        assert within_fp8_bound(src, deq, fp8[scale_name]), name
        assert (deq - src).norm() / src.norm() < 0.035, name  # ~2.7% RMS for Gaussian weights


def test_fp8_model_matches_dequantized_source_and_approximates_bf16(checkpoints, tmp_path):
    fp8_dir, source_dir = checkpoints
    fp8_model, config = load_model(str(fp8_dir), progress=False)
    assert isinstance(fp8_model, DeepseekV3ForCausalLM) and isinstance(config, DeepseekV3Config)
    source_model, _ = load_model(str(source_dir), progress=False)
    # the source checkpoint with FP8-rounded weights, stored unquantized in float32
    fp8_tensors, rounded = read_all(fp8_dir), tmp_path / "rounded"
    rounded.mkdir()
    plain = {n: (dequantize_fp8_blocks(t, fp8_tensors[n + "_scale_inv"]) if t.dtype == torch.float8_e4m3fn else t)
             for n, t in fp8_tensors.items() if not n.endswith("_scale_inv")}
    save_file(plain, str(rounded / "model.safetensors"))
    hf_config = json.loads((fp8_dir / "config.json").read_text())
    del hf_config["quantization_config"]
    (rounded / "config.json").write_text(json.dumps(hf_config))
    rounded_model, _ = load_model(str(rounded), progress=False)

    ids = torch.randint(0, config.vocab_size, (48,), generator=torch.Generator().manual_seed(0))
    fp8_logits, source_logits = logits_of(fp8_model, ids), logits_of(source_model, ids)
    assert (fp8_logits - logits_of(rounded_model, ids)).abs().max() <= 1e-5
    rel_rms = ((fp8_logits - source_logits).pow(2).mean() / source_logits.pow(2).mean()).sqrt().item()
    print(f"\nFP8 vs bf16 source: relative RMS logits error {rel_rms:.3f}, "
          f"max abs {(fp8_logits - source_logits).abs().max().item():.3f}")
    assert rel_rms <= 0.4


def test_bfloat16_model_runs_close_to_float32(checkpoints):
    fp8_dir, _ = checkpoints
    model32, _ = load_model(str(fp8_dir), progress=False)
    model16, _ = load_model(str(fp8_dir), dtype=torch.bfloat16, progress=False)
    ids = torch.arange(24)
    l32, l16 = logits_of(model32, ids), logits_of(model16, ids)
    assert l16.dtype == torch.float32
    assert ((l16 - l32).pow(2).mean() / l32.pow(2).mean()).sqrt() < 0.1


# ---------------------------------------------------------------------- sharding
def move_tensor(directory, name: str, to_shard: str) -> None:
    """Move one tensor into another shard file and update the index."""
    index = json.loads((directory / INDEX).read_text())
    from_shard = index["weight_map"][name]
    src = load_file(str(directory / from_shard))
    dst = load_file(str(directory / to_shard))
    dst[name] = src.pop(name)
    save_file(src, str(directory / from_shard), metadata={"format": "pt"})
    save_file(dst, str(directory / to_shard), metadata={"format": "pt"})
    index["weight_map"][name] = to_shard
    (directory / INDEX).write_text(json.dumps(index))


def test_scale_in_another_shard_than_its_weight(tmp_path, checkpoints):
    directory = write_tiny_k2_checkpoint(tmp_path / "k2", seed=7, fp8=True)
    # one scale in a shard read before its weight's shard, one in a shard read after it
    first = "model.layers.2.mlp.experts.5.up_proj.weight_scale_inv"
    last = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    move_tensor(directory, first, "model-00001-of-00003.safetensors")
    move_tensor(directory, last, "model-00003-of-00003.safetensors")
    index = json.loads((directory / INDEX).read_text())["weight_map"]
    assert index[first[:-len("_scale_inv")]] > index[first] and index[last[:-len("_scale_inv")]] < index[last]
    moved, _ = load_model(str(directory), progress=False)
    reference, _ = load_model(str(checkpoints[0]), progress=False)
    for (name, a), (_, b) in zip(moved.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b), name


def test_mtp_layers_are_skipped(tmp_path):
    directory = write_tiny_k2_checkpoint(tmp_path / "k2", seed=1, fp8=True)
    config = json.loads((directory / "config.json").read_text())
    config["num_nextn_predict_layers"] = 1
    (directory / "config.json").write_text(json.dumps(config))
    index = json.loads((directory / INDEX).read_text())
    mtp = {"model.layers.3.eh_proj.weight": torch.zeros(64, 128, dtype=torch.float8_e4m3fn),
           "model.layers.3.eh_proj.weight_scale_inv": torch.ones(1, 1),
           "model.layers.3.enorm.weight": torch.ones(64, dtype=torch.bfloat16)}
    save_file(mtp, str(directory / "model-mtp.safetensors"), metadata={"format": "pt"})
    index["weight_map"].update({n: "model-mtp.safetensors" for n in mtp})
    (directory / INDEX).write_text(json.dumps(index))
    model, config = load_model(str(directory), progress=False)
    assert config.num_layers == 3 and len(model.model.layers) == 3


# ---------------------------------------------------------------------- errors
def rewrite(directory, edit) -> None:
    """Apply edit(tensors) to every shard (by name) and rewrite the index to match."""
    index = json.loads((directory / INDEX).read_text())
    weight_map = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(directory / file), "pt") as f:
            tensors = {n: f.get_tensor(n) for n in f.keys()}
        edit(tensors)
        save_file(tensors, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in tensors})
    index["weight_map"] = weight_map
    (directory / INDEX).write_text(json.dumps(index))


@pytest.mark.parametrize("case, message", [
    ("missing_weight", "missing tensor 'model.layers.1.self_attn.o_proj.weight'"),
    ("missing_scale", "missing tensor 'model.layers.1.self_attn.o_proj.weight_scale_inv'"),
    ("scale_without_weight", "scale 'model.layers.1.self_attn.o_proj.weight_scale_inv' has no weight"),
    ("wrong_scale_shape", "tensor 'model.layers.1.self_attn.o_proj.weight_scale_inv': expected block scales"),
    ("wrong_weight_shape", r"tensor 'model.layers.1.self_attn.o_proj.weight': expected shape \(64, 64\), got \(64, 32\)"),
    ("wrong_bias_shape", r"'model.layers.2.mlp.gate.e_score_correction_bias': expected shape \(8,\)"),
    ("unexpected", "unexpected tensor 'model.layers.1.self_attn.k_proj.weight'"),
])
def test_errors_name_the_tensor(tmp_path, case, message):
    directory = write_tiny_k2_checkpoint(tmp_path / "k2", seed=2, fp8=True, tokenizer=False)
    w = "model.layers.1.self_attn.o_proj.weight"

    def edit(t):
        if case == "missing_weight" and w in t:
            del t[w], t[w + "_scale_inv"]
        elif case == "missing_scale":
            t.pop(w + "_scale_inv", None)
        elif case == "scale_without_weight":
            t.pop(w, None)
        elif case == "wrong_scale_shape" and w in t:
            t[w + "_scale_inv"] = torch.ones(2, 1)
        elif case == "wrong_weight_shape" and w in t:
            t[w] = t[w][:, :32].contiguous()
        elif case == "wrong_bias_shape" and "model.layers.2.mlp.gate.e_score_correction_bias" in t:
            t["model.layers.2.mlp.gate.e_score_correction_bias"] = torch.zeros(9)
        elif case == "unexpected" and w in t:
            t["model.layers.1.self_attn.k_proj.weight"] = torch.zeros(4, 4, dtype=torch.bfloat16)

    rewrite(directory, edit)
    with pytest.raises(ValueError, match=message):
        load_model(str(directory), progress=False)
