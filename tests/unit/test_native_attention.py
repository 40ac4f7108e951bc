"""The native paged decode-attention kernel against PyTorch's SDPA over gathered K/V."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from k2serve import native

kernels = native.kernels()
pytestmark = pytest.mark.skipif(kernels is None, reason="no C++ toolchain: fallbacks only")

BLOCK = 16


@pytest.fixture(params=kernels.vector_isas() if kernels is not None else [], autouse=True)
def vector_path(request):
    """Every test on every vector path this CPU runs (K2SERVE_ISA picks one per process)."""
    before = kernels.vector_isa()
    kernels.set_vector_isa(request.param)
    yield request.param
    kernels.set_vector_isa(before)


def _random_tables(lengths, num_blocks, generator):
    """Disjoint random block ids (never the null block 0) per sequence, padded with 0."""
    widest = max(-(-n // BLOCK) for n in lengths)
    ids = torch.randperm(num_blocks - 1, generator=generator) + 1
    tables = torch.zeros(len(lengths), widest, dtype=torch.long)
    used = 0
    for i, n in enumerate(lengths):
        blocks = -(-n // BLOCK)
        tables[i, :blocks] = ids[used:used + blocks]
        used += blocks
    return tables


def _slots(table, length):
    positions = torch.arange(length)
    return table[positions // BLOCK] * BLOCK + positions % BLOCK


POOL_DTYPES = [torch.float32, torch.bfloat16]


# (10, 2, 64): five query heads per kv head, which the head-dim-64 path takes 4 + 1 at a time.
# A bfloat16 pool is widened exactly, so the reference is SDPA over its float32 values.
@pytest.mark.parametrize("pool_dtype", POOL_DTYPES)
@pytest.mark.parametrize("heads,kv_heads,dim", [(9, 3, 64), (10, 2, 64), (8, 8, 32), (4, 1, 128)])
def test_grouped_query_decode_matches_sdpa(heads, kv_heads, dim, pool_dtype):
    g = torch.Generator().manual_seed(heads * 100 + kv_heads)
    lengths = [1, 15, 16, 17, 300]
    k_pool = torch.randn(128 * BLOCK, kv_heads, dim, generator=g).to(pool_dtype)
    v_pool = torch.randn(128 * BLOCK, kv_heads, dim, generator=g).to(pool_dtype)
    q = torch.randn(len(lengths), heads, dim, generator=g)
    tables = _random_tables(lengths, 128, g)
    out = kernels.paged_decode_attention(q, k_pool, v_pool, tables, torch.tensor(lengths),
                                         BLOCK, dim ** -0.5)
    assert out.dtype == torch.float32
    for i, n in enumerate(lengths):
        slots = _slots(tables[i], n)
        ref = F.scaled_dot_product_attention(q[i].unsqueeze(1), k_pool[slots].float().transpose(0, 1),
                                             v_pool[slots].float().transpose(0, 1), scale=dim ** -0.5,
                                             enable_gqa=True)[:, 0]
        torch.testing.assert_close(out[i], ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("pool_dtype", POOL_DTYPES)
def test_values_inside_the_keys_as_in_mla(pool_dtype):
    """MLA's latent cache: one 576-wide key per token whose first 512 dims are the value."""
    g = torch.Generator().manual_seed(7)
    lengths = [33, 5]
    pool = torch.randn(16 * BLOCK, 1, 576, generator=g).to(pool_dtype)
    q = torch.randn(2, 16, 576, generator=g)
    tables = _random_tables(lengths, 16, g)
    out = kernels.paged_decode_attention(q, pool, pool[..., :512], tables, torch.tensor(lengths),
                                         BLOCK, 0.05)
    for i, n in enumerate(lengths):
        keys = pool[_slots(tables[i], n), 0].float()
        ref = torch.softmax(q[i] @ keys.T * 0.05, dim=-1) @ keys[:, :512]
        torch.testing.assert_close(out[i], ref, atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("pool_dtype", POOL_DTYPES)
@pytest.mark.parametrize("heads,dim", [(9, 64), (15, 64), (9, 32)])
def test_a_sequence_result_does_not_depend_on_the_batch(heads, dim, pool_dtype):
    """A batch at least as large as the thread count splits its work by sequence, a single
    sequence by kv head: bitwise the same result either way."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # so that the batch of 6 (not 1) is split by sequence
    try:
        _sequence_alone_and_batched(heads, dim, pool_dtype)
    finally:
        torch.set_num_threads(threads)


def _sequence_alone_and_batched(heads, dim, pool_dtype):
    g = torch.Generator().manual_seed(3)
    k_pool = torch.randn(64 * BLOCK, 3, dim, generator=g).to(pool_dtype)
    v_pool = torch.randn(64 * BLOCK, 3, dim, generator=g).to(pool_dtype)
    q = torch.randn(6, heads, dim, generator=g)
    lengths = [40, 7, 100, 1, 64, 20]
    tables = _random_tables(lengths, 64, g)
    together = kernels.paged_decode_attention(q, k_pool, v_pool, tables, torch.tensor(lengths),
                                              BLOCK, 0.125)
    for i in range(len(lengths)):
        alone = kernels.paged_decode_attention(q[i:i + 1], k_pool, v_pool, tables[i:i + 1],
                                               torch.tensor(lengths[i:i + 1]), BLOCK, 0.125)
        assert torch.equal(alone[0], together[i])


def test_bad_lengths_are_an_error_not_a_wild_read():
    pool = torch.zeros(4 * BLOCK, 1, 8)
    with pytest.raises(RuntimeError, match="bad sequence length"):
        kernels.paged_decode_attention(torch.zeros(1, 1, 8), pool, pool,
                                       torch.ones(1, 2, dtype=torch.long), torch.tensor([33]),
                                       BLOCK, 1.0)


@pytest.mark.parametrize("pool_dtype", POOL_DTYPES)
def test_engine_context_native_and_fallback_agree(pool_dtype):
    """KVPool's attention context with the kernel and with the gather + SDPA fallback."""
    from k2serve.engine.kv_cache import KVPool
    from k2serve.models.layers.attention import KVCacheSpec

    class Seq:  # what attention_context reads of a decoding sequence
        def __init__(self, blocks, computed):
            self.block_table, self.num_computed, self.is_decoding = blocks, computed, True

    spec = KVCacheSpec(num_layers=1, num_kv_heads=3, key_dim=64, value_dim=64)
    g = torch.Generator().manual_seed(11)
    pools = [KVPool(spec, BLOCK, num_blocks=32, dtype=pool_dtype, use_native=native_)
             for native_ in (True, False)]
    for pool in pools[1:]:
        pool.k[0].copy_(pools[0].k[0].normal_(generator=g))
        pool.v[0].copy_(pools[0].v[0].normal_(generator=g))
    batch = [(Seq([3, 9, 4], 40), 1), (Seq([7], 2), 1), (Seq([12, 2], 16), 1)]
    q = torch.randn(3, 9, 64, generator=g)
    k, v = torch.randn(3, 3, 64, generator=g), torch.randn(3, 3, 64, generator=g)
    native_ctx, fallback_ctx = (pool.attention_context(batch) for pool in pools)
    assert native_ctx.decode_kernel is not None and fallback_ctx.decode_kernel is None
    torch.testing.assert_close(native_ctx.attend(0, q, k, v, 0.125),
                               fallback_ctx.attend(0, q, k, v, 0.125), atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("pool_dtype", POOL_DTYPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_rotary_decode_writes_what_the_pytorch_path_writes(dtype, pool_dtype):
    """RoPE + KV write + attention in one call: the cached K/V and the output are bitwise
    those of rotate_qkv + index_copy_ + paged_decode_attention (a preempted sequence's
    generated tokens are recomputed by the PyTorch path and must cache the same K)."""
    from k2serve.models.layers.attention import rotate_qkv
    from k2serve.models.layers.rotary import RotaryEmbedding

    heads, kv_heads, dim = 9, 3, 64
    g = torch.Generator().manual_seed(5)
    lengths = [37, 1, 200]
    pool_shape = (64 * BLOCK, kv_heads, dim)
    k_fused = torch.randn(*pool_shape, generator=g).to(pool_dtype)
    v_fused = torch.randn(*pool_shape, generator=g).to(pool_dtype)
    k_ref, v_ref = k_fused.clone(), v_fused.clone()
    tables = _random_tables(lengths, 64, g)
    slots = torch.stack([_slots(tables[i], n)[-1] for i, n in enumerate(lengths)])
    qkv = torch.randn(3, (heads + 2 * kv_heads) * dim, generator=g).to(dtype)
    cos, sin = RotaryEmbedding(dim, 100000.0, None)(torch.tensor(lengths) - 1, torch.float32)
    sin_signed = torch.cat((-sin[..., :dim // 2], sin[..., dim // 2:]), dim=-1)

    fused = kernels.decode_rotary_attention(qkv, cos[:, 0], sin_signed[:, 0], k_fused, v_fused,
                                            slots, tables, torch.tensor(lengths), BLOCK, 0.125,
                                            heads, kv_heads)
    q, k, v = rotate_qkv(qkv, cos, sin_signed, heads, dim)
    k_ref.index_copy_(0, slots, k.to(pool_dtype))  # as PagedAttention.attend writes them
    v_ref.index_copy_(0, slots, v.to(pool_dtype))
    reference = kernels.paged_decode_attention(q, k_ref, v_ref, tables, torch.tensor(lengths),
                                               BLOCK, 0.125)
    assert torch.equal(k_fused, k_ref) and torch.equal(v_fused, v_ref)
    assert torch.equal(fused, reference)


def test_a_pool_is_float32_or_bfloat16():
    from k2serve.engine.kv_cache import KVPool
    from k2serve.models.layers.attention import KVCacheSpec

    spec = KVCacheSpec(num_layers=1, num_kv_heads=1, key_dim=8, value_dim=8)
    assert KVPool(spec, BLOCK, num_blocks=2, dtype=torch.bfloat16).k[0].dtype == torch.bfloat16
    with pytest.raises(ValueError, match="float32 or bfloat16, not torch.float16"):
        KVPool(spec, BLOCK, num_blocks=2, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="float32 or bfloat16 pools"):
        pool = torch.zeros(2 * BLOCK, 1, 8, dtype=torch.float16)
        kernels.paged_decode_attention(torch.zeros(1, 1, 8), pool, pool,
                                       torch.ones(1, 1, dtype=torch.long), torch.tensor([1]), BLOCK, 1.0)
