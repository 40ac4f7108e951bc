"""compressed-tensors pack-quantized INT4 (Kimi K2-Thinking's experts) against the library.

compressed-tensors 0.20 (its own packer, unpacker and compressor) is the reference: our
unpacked codes, our dequantized weights and the int4 kernels' (scale, code, min) are bitwise
what it reads from the same tensors, and the tiny K2-Thinking writer's packed experts are
bitwise what its compressor writes for those weights. Then: the loader keeps exactly the
routed experts 4-bit, and a config.json that disagrees with the tensors (or a scheme we do
not run) is an error naming the tensor or the key.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from k2serve.models.layers.int4_linear import Int4Linear
from k2serve.models.layers.quantization import QuantizationConfig
from k2serve.models.loader import load_model, open_checkpoint
from k2serve.models.loaders.compressed_tensors import (
    PackedInt4Tensor,
    pack_int4,
    unpack_int4,
)
from k2serve.models.tiny_k2 import write_tiny_k2_checkpoint

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors.pack_quantized import (  # noqa: E402
    PackedQuantizationCompressor,
    pack_to_int32,
    unpack_from_int32,
)
from compressed_tensors.quantization import QuantizationScheme  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def int4_scheme(group_size: int = 32) -> QuantizationScheme:
    return QuantizationScheme(targets=["Linear"], weights={
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group",
        "group_size": group_size})


@pytest.fixture(scope="module")
def thinking_dir(tmp_path_factory):
    return write_tiny_k2_checkpoint(tmp_path_factory.mktemp("k2t") / "ckpt", seed=5, fp8=False,
                                    thinking=True, int4_experts=True)


def read_all(directory) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in directory.glob("model-*.safetensors"):
        tensors.update(load_file(str(file)))
    return tensors


@pytest.mark.parametrize("shape", [(16, 32), (48, 96), (5, 224)])
def test_pack_and_unpack_bitwise_as_the_library(shape):
    g = torch.Generator().manual_seed(shape[1])
    signed = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
    theirs = pack_to_int32(signed, 4)
    assert theirs.dtype == torch.int32
    assert torch.equal(pack_int4((signed + 8).to(torch.uint8)), theirs)
    ours = unpack_int4(theirs, shape[1])
    assert torch.equal(ours.to(torch.int8) - 8, unpack_from_int32(theirs, 4, torch.Size(shape)))


@pytest.mark.parametrize("group_size", [32, 64])
def test_dequantized_weights_bitwise_as_the_library(group_size):
    """(code - 8) * scale from a bf16 scale: the library's decompress (scale given as float32,
    so it computes in float32) and ours agree bit for bit, and so does the int4 kernels'
    w = scale * code + min per 32 columns."""
    g = torch.Generator().manual_seed(group_size)
    out_f, in_f = 24, 128
    signed = torch.randint(-8, 8, (out_f, in_f), generator=g, dtype=torch.int8)
    scale = (torch.rand(out_f, in_f // group_size, generator=g) * 0.1).to(torch.bfloat16)
    packed = pack_to_int32(signed, 4)
    theirs = PackedQuantizationCompressor.decompress(
        {"weight_packed": packed, "weight_scale": scale.float(),
         "weight_shape": torch.tensor([out_f, in_f])}, int4_scheme(group_size))["weight"]
    tensor = PackedInt4Tensor("x.weight_packed", packed, scale, (out_f, in_f), group_size)
    assert torch.equal(tensor.dequantize(), theirs)
    codes, s, minimum = tensor.int4_affine()
    assert s.shape == (out_f, in_f // 32)
    affine = codes.float().view(out_f, -1, 32) * s[..., None] + minimum[..., None]
    assert torch.equal(affine.view(out_f, in_f), theirs)


def test_writer_packs_experts_as_the_library_compressor(thinking_dir):
    config = json.loads((thinking_dir / "config.json").read_text())
    assert ct.QuantizationConfig.model_validate(config["quantization_config"]).format == "pack-quantized"
    tensors = read_all(thinking_dir)
    packed = sorted(n.removesuffix(".weight_packed") for n in tensors if n.endswith(".weight_packed"))
    assert packed and all(".mlp.experts." in n for n in packed)
    assert not any(".mlp.experts." in n and n.endswith(".weight") for n in tensors)
    for module in packed[:6]:
        scale = tensors[module + ".weight_scale"]
        assert scale.dtype == torch.bfloat16
        shape = tuple(tensors[module + ".weight_shape"].tolist())
        weight = PackedInt4Tensor(module, tensors[module + ".weight_packed"], scale, shape, 32).dequantize()
        theirs = PackedQuantizationCompressor.compress(
            {"weight": weight, "weight_scale": scale.float()}, int4_scheme())
        assert torch.equal(theirs["weight_packed"], tensors[module + ".weight_packed"]), module


def test_loader_keeps_exactly_the_routed_experts_4bit(thinking_dir):
    model, config = load_model(str(thinking_dir), progress=False, quantized=QuantizationConfig(native=False))
    int4 = {n for n, m in model.named_modules() if isinstance(m, Int4Linear) and m.is_int4}
    assert len(int4) == 2 * config.n_routed_experts * (config.num_layers - config.first_k_dense_replace)
    assert all(".mlp.experts." in n for n in int4)
    expert = model.model.layers[1].mlp.experts.down[3]
    assert expert.weight is None  # 4-bit memory only by default (expert_dense_min_rows=None)
    assert expert.int4_bytes < 4 * config.moe_intermediate_size * config.hidden_size // 2
    # everything else is the bf16 checkpoint's value, in float32
    tensors = read_all(thinking_dir)
    q_a = model.model.layers[1].self_attn.fused_qkv_a_proj.weight[:config.q_lora_rank]
    assert torch.equal(q_a, tensors["model.layers.1.self_attn.q_a_proj.weight"].float())


def test_int4_kernel_experts_close_to_float32(thinking_dir):
    """The int4 kernel (bfloat16 activations) vs the same experts in float32."""
    exact, c = load_model(str(thinking_dir), progress=False,
                          quantized=QuantizationConfig(expert_dense_min_rows=0))
    kernel, _ = load_model(str(thinking_dir), progress=False, quantized=QuantizationConfig())
    x = torch.randn(6, c.hidden_size, generator=torch.Generator().manual_seed(0))
    a, b = (m.model.layers[1].mlp(x) for m in (exact, kernel))
    assert (a - b).abs().max() <= 0.02 * a.abs().max()


def _variant(thinking_dir, tmp_path, edit_config=None, edit_tensors=None):
    path = tmp_path / "variant"
    shutil.copytree(thinking_dir, path)
    if edit_config:
        config = json.loads((path / "config.json").read_text())
        edit_config(config["quantization_config"])
        (path / "config.json").write_text(json.dumps(config))
    return str(path)


def _weights(q):
    return q["config_groups"]["group_0"]["weights"]


@pytest.mark.parametrize("edit, message", [
    (lambda q: _weights(q).update(group_size=16), "group_size = 16 is not supported"),
    (lambda q: _weights(q).update(num_bits=8), "weights.num_bits = 8 is not supported"),
    (lambda q: _weights(q).update(symmetric=False), "weights.symmetric = False"),
    (lambda q: _weights(q).update(actorder="group"), "actorder = 'group'"),
    (lambda q: q.update(format="float-quantized"), "unsupported compressed-tensors format 'float-quantized'"),
    (lambda q: q["config_groups"]["group_0"].update(input_activations={"num_bits": 8}),
     "activation quantization"),
])
def test_unsupported_scheme_is_a_clear_error(thinking_dir, tmp_path, edit, message):
    with pytest.raises(ValueError, match="config.json: quantization_config.config_groups.group_0") as e:
        open_checkpoint(_variant(thinking_dir, tmp_path, edit))
    assert message in str(e.value)


def test_config_and_tensors_disagreeing_name_the_tensor(thinking_dir, tmp_path):
    ignored = _variant(thinking_dir, tmp_path, lambda q: q["ignore"].append("re:.*experts.*"))
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.\d+\.mlp\.experts\.\d+\.\w+_proj"
                                         r"\.weight_packed' is packed, but .* does not quantize"):
        open_checkpoint(ignored)
    shutil.rmtree(ignored)
    targeted = _variant(thinking_dir, tmp_path, lambda q: q["ignore"].remove("re:.*self_attn.*"))
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.\d+\.self_attn\.\w+\.weight' is "
                                         r"stored unpacked, but .* quantizes"):
        open_checkpoint(targeted)
    shutil.rmtree(targeted)
    # group 64 is a scheme we run, but these tensors hold group-32 scales
    wrong_group = _variant(thinking_dir, tmp_path, lambda q: _weights(q).update(group_size=64))
    with pytest.raises(ValueError, match=r"tensor 'model\.layers\.\d+\.mlp\.experts\.\d+\.\w+_proj"
                                         r"\.weight_scale': expected float scales of shape"):
        load_model(wrong_group, progress=False, quantized=True)
