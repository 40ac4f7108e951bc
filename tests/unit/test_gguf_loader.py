"""GGUF loading: dequantization of each quant type, q/k un-permutation, config, errors.

Everything runs on small synthetic arrays and tiny GGUF files written here with
gguf.GGUFWriter; the real SmolLM2 file is covered by tests/reference.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from k2serve.models.config import ModelConfig  # noqa: E402
from k2serve.models.layers.attention import ContiguousAttention, Segment, SequenceKVCache  # noqa: E402
from k2serve.models.loader import load_model  # noqa: E402
from k2serve.models.loaders import gguf as gguf_loader  # noqa: E402
from tests.tiny_models import tiny_hf_llama  # noqa: E402

Q = gguf.GGMLQuantizationType

# type -> (bits, symmetric): the quantization step per 32-value block is
# amax / 2**(bits-1) (symmetric) or (max - min) / (2**bits - 1) (with a min offset).
ROUND_TRIP = {Q.Q8_0: (8, True), Q.Q4_0: (4, True), Q.Q4_1: (4, False), Q.Q5_0: (5, True), Q.Q5_1: (5, False)}


def _random(rows=8, cols=256, seed=0):
    return np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)


@pytest.mark.parametrize("qtype", list(ROUND_TRIP), ids=lambda t: t.name)
def test_block_quant_round_trip_error_is_bounded(qtype):
    x = _random()
    restored = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)
    assert restored.shape == x.shape and restored.dtype == np.float32
    bits, symmetric = ROUND_TRIP[qtype]
    blocks, err = x.reshape(-1, 32), np.abs(restored - x).reshape(-1, 32)
    if symmetric:
        step = np.abs(blocks).max(1) / 2 ** (bits - 1)
    else:
        step = (blocks.max(1) - blocks.min(1)) / (2**bits - 1)
    # at most one step (the clamped extreme of symmetric types), plus fp16 scale rounding
    assert (err.max(1) <= step * 1.01 + 1e-6).all()
    assert err.mean() < step.mean() / 2  # typical error is about a quarter step


@pytest.mark.parametrize("qtype, rtol", [(Q.F16, 1e-3), (Q.BF16, 8e-3)], ids=["F16", "BF16"])
def test_float_round_trip(qtype, rtol):
    x = _random()
    restored = gguf.quants.dequantize(gguf.quants.quantize(x, qtype), qtype)
    np.testing.assert_allclose(restored, x, rtol=rtol, atol=1e-6)


def _f16_bytes(value):
    return np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)


def _q4_k_blocks(rows, rng):
    """Q4_K blocks with d=1, dmin=0 and every 6-bit scale 1, min 0: values are the nibbles."""
    qs = rng.integers(0, 256, size=(rows, 128), dtype=np.uint8)
    scales = np.array([1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1], dtype=np.uint8)
    block = [np.tile(_f16_bytes(1.0), (rows, 1)), np.tile(_f16_bytes(0.0), (rows, 1)),
             np.tile(scales, (rows, 1)), qs]
    # each 64-value chunk: 32 low nibbles, then the 32 high nibbles of the same bytes
    chunks = qs.reshape(rows, 4, 32)
    expected = np.concatenate([chunks & 0xF, chunks >> 4], axis=2).reshape(rows, 256)
    return np.concatenate(block, axis=1), expected.astype(np.float32)


def _q6_k_blocks(rows, rng):
    """Q6_K blocks with d=1 and every scale 1: values are the 6-bit quants minus 32."""
    ql = rng.integers(0, 256, size=(rows, 128), dtype=np.uint8)
    qh = rng.integers(0, 256, size=(rows, 64), dtype=np.uint8)
    scales = np.ones((rows, 16), dtype=np.int8).view(np.uint8)
    raw = np.concatenate([ql, qh, scales, np.tile(_f16_bytes(1.0), (rows, 1))], axis=1)
    expected = np.empty((rows, 256), dtype=np.float32)
    for half in range(2):  # ggml's dequantize_row_q6_K
        lo, hi, out = ql[:, 64 * half:64 * half + 64], qh[:, 32 * half:32 * half + 32], 128 * half
        expected[:, out + 0:out + 32] = (lo[:, :32] & 0xF) | ((hi >> 0) & 3) << 4
        expected[:, out + 32:out + 64] = (lo[:, 32:] & 0xF) | ((hi >> 2) & 3) << 4
        expected[:, out + 64:out + 96] = (lo[:, :32] >> 4) | ((hi >> 4) & 3) << 4
        expected[:, out + 96:out + 128] = (lo[:, 32:] >> 4) | ((hi >> 6) & 3) << 4
    return raw, expected - 32


@pytest.mark.parametrize("make, qtype", [(_q4_k_blocks, Q.Q4_K), (_q6_k_blocks, Q.Q6_K)], ids=["Q4_K", "Q6_K"])
def test_k_quant_known_values(make, qtype):
    raw, expected = make(3, np.random.default_rng(1))
    assert raw.shape[1] == gguf.GGML_QUANT_SIZES[qtype][1]
    np.testing.assert_array_equal(gguf.quants.dequantize(raw, qtype), expected)


def _write_raw_tensors(path, tensors):
    """tensors: name -> (array as stored, qtype or None for plain float arrays)."""
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (array, qtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_reader_tensors_of_every_type_go_through_gguf_dequantize(tmp_path, monkeypatch):
    x, rng = _random(rows=6), np.random.default_rng(2)
    tensors, expected = {}, {}
    for qtype in [Q.F32, Q.F16, Q.BF16, *ROUND_TRIP]:
        stored = gguf.quants.quantize(x, qtype)
        tensors[f"t.{qtype.name}"] = (stored, None if qtype in (Q.F32, Q.F16) else qtype)
        expected[qtype] = gguf.quants.dequantize(stored, qtype)
    for make, qtype in ((_q4_k_blocks, Q.Q4_K), (_q6_k_blocks, Q.Q6_K)):
        raw, expected[qtype] = make(6, rng)
        tensors[f"t.{qtype.name}"] = (raw, qtype)
    path = tmp_path / "types.gguf"
    _write_raw_tensors(path, tensors)

    seen = []
    real = gguf.quants.dequantize
    monkeypatch.setattr(gguf.quants, "dequantize", lambda data, qtype: seen.append(qtype) or real(data, qtype))
    reader = gguf.GGUFReader(str(path))
    for tensor in reader.tensors:
        qtype = tensor.tensor_type
        out = gguf_loader.dequantize_tensor(tensor)
        assert out.dtype == np.float32 and out.shape == (6, 256) and out.flags.writeable, qtype.name
        np.testing.assert_array_equal(out, expected[qtype])
    assert set(seen) == set(expected)


def test_unsupported_tensor_type_is_a_value_error(tmp_path):
    path = tmp_path / "i32.gguf"
    _write_raw_tensors(path, {"t.int": (np.arange(64, dtype=np.int32).reshape(2, 32), None)})
    tensor = gguf.GGUFReader(str(path)).tensors[0]
    with pytest.raises(ValueError, match="t.int"):
        gguf_loader.dequantize_tensor(tensor)


def test_unpermute_inverts_llama_cpp_permute():
    w = np.arange(12 * 4 * 5, dtype=np.float32).reshape(48, 5)
    for n_head in (1, 2, 3, 6):
        assert np.array_equal(gguf_loader.unpermute_qk(_llama_cpp_permute(w, n_head), n_head), w)


def test_name_mapping_round_trips():
    for name in ("token_embd.weight", "output_norm.weight", "output.weight", "blk.7.attn_q.weight",
                 "blk.0.ffn_down.weight", "blk.12.attn_norm.weight", "blk.3.ffn_norm.weight"):
        assert gguf_loader.hf_to_gguf_name(gguf_loader.gguf_to_hf_name(name)) == name
    assert gguf_loader.gguf_to_hf_name("blk.1.attn_output.weight") == "model.layers.1.self_attn.o_proj.weight"
    assert gguf_loader.gguf_to_hf_name("blk.1.mystery.weight") is None


# ---------------------------------------------------------------- tiny models vs transformers

def _llama_cpp_permute(w, n_head):
    """convert_hf_to_gguf.py's LlamaModel.permute (HF rotate-half rows -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_GGUF_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_tiny_gguf(path, hf_model, qtype=Q.F32, arch="llama", skip=(), reshape=None, rope_freqs=None,
                    extra=None):
    """Write an HF Llama as llama.cpp's converter would (q/k permuted). Updates hf_model in
    place to the dequantized weights so it stays the exact reference."""
    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_token_list([f"<t{i}>" for i in range(cfg.vocab_size)])

    for hf_name, param in hf_model.state_dict().items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}.get(hf_name)
        if name is None:
            layer, module = hf_name.removeprefix("model.layers.").removesuffix(".weight").split(".", 1)
            name = f"blk.{layer}.{_GGUF_NAMES[module]}.weight"
        if name in skip:
            continue
        w = param.numpy()
        if "attn_q" in name:
            w = _llama_cpp_permute(w, cfg.num_attention_heads)
        elif "attn_k" in name:
            w = _llama_cpp_permute(w, cfg.num_key_value_heads)
        if reshape and name in reshape:
            w = w[: reshape[name]]
        if w.ndim == 2 and qtype != Q.F32:
            stored = gguf.quants.quantize(w, qtype)
            writer.add_tensor(name, stored, raw_dtype=None if qtype == Q.F16 else qtype)
            # The permutation only moves whole rows and blocks lie within rows, so quantizing
            # the HF-layout weight gives the reference values in HF layout.
            restored = gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), qtype), qtype)
            with torch.no_grad():
                param.copy_(torch.from_numpy(restored.copy()))
        else:
            writer.add_tensor(name, np.ascontiguousarray(w, dtype=np.float32))
    if rope_freqs is not None:
        writer.add_tensor("rope_freqs.weight", rope_freqs.numpy().astype(np.float32))
    for name, array in (extra or {}).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if cfg.tie_word_embeddings:
        hf_model.tie_weights()
    return path


def our_logits(model, config, ids):
    cache = SequenceKVCache(config.num_layers, config.num_kv_heads, config.head_dim)
    ctx = ContiguousAttention([Segment(cache, 0, len(ids))])
    return model.compute_logits(model(ids, torch.arange(len(ids)), ctx))


def _compare(tmp_path, hf_model, atol=1e-4, **kw):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", hf_model, **kw)
    model, config = load_model(str(path), progress=False)
    ids = torch.randint(0, hf_model.config.vocab_size, (40,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf_model(ids[None]).logits[0]
    diff = (our_logits(model, config, ids) - ref).abs().max().item()
    assert diff <= atol, diff
    return model, config


@pytest.mark.parametrize("qtype", [Q.F32, Q.F16, Q.Q8_0, Q.Q4_1], ids=lambda t: t.name)
def test_tiny_gguf_matches_transformers(tmp_path, qtype):
    _, config = _compare(tmp_path, tiny_hf_llama(), qtype=qtype)
    assert not config.tie_word_embeddings
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (4, 2, 16)
    assert (config.bos_token_id, config.eos_token_id) == (1, 2)


def test_tiny_gguf_tied_embeddings(tmp_path):
    model, config = _compare(tmp_path, tiny_hf_llama(tie=True))
    assert config.tie_word_embeddings and model.lm_head is None


def test_tiny_gguf_llama3_rope_freqs(tmp_path):
    """llama.cpp stores Llama 3.1 rope scaling as per-frequency divisors (rope_freqs.weight)."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
    hf_model = tiny_hf_llama(rope_parameters=rope)
    base = 1.0 / (10000.0 ** (torch.arange(0, 16, 2).float() / 16))
    factors = base / hf_model.model.rotary_emb.inv_freq
    assert not torch.allclose(factors, torch.ones_like(factors))
    _compare(tmp_path, hf_model, rope_freqs=factors)


def test_metadata_and_config_from_reader(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_llama())
    checkpoint = gguf_loader.GGUFCheckpoint(str(path))
    assert checkpoint.metadata["general.architecture"] == "llama"
    assert checkpoint.metadata["tokenizer.ggml.tokens"][:2] == ["<t0>", "<t1>"]
    assert ModelConfig.from_gguf(gguf.GGUFReader(str(path))) == checkpoint.config
    assert gguf_loader.GGUFCheckpoint(str(path)).metadata["llama.block_count"] == 2


def test_missing_tensor_names_it(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_llama(), skip={"blk.1.ffn_up.weight"})
    with pytest.raises(ValueError, match=r"missing tensor 'blk\.1\.ffn_up\.weight'"):
        load_model(str(path), progress=False)


def test_wrong_shape_names_the_tensor(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_llama(), reshape={"blk.0.attn_v.weight": 16})
    with pytest.raises(ValueError, match=r"blk\.0\.attn_v\.weight.*expected shape \(32, 64\), got \(16, 64\)"):
        load_model(str(path), progress=False)


def test_unsupported_architecture(tmp_path):
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_llama(), arch="falcon")
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'falcon'"):
        load_model(str(path), progress=False)


def test_unexpected_tensor(tmp_path):
    extra = {"blk.0.attn_rot_embd.weight": np.zeros(8, dtype=np.float32)}
    path = write_tiny_gguf(tmp_path / "tiny.gguf", tiny_hf_llama(), extra=extra)
    with pytest.raises(ValueError, match=r"unexpected GGUF tensor 'blk\.0\.attn_rot_embd\.weight'"):
        load_model(str(path), progress=False)
