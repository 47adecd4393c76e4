"""The int8 KV cache: values recovered within half a step, compute-dtype views, bytes, and sampling with it."""
import pytest
import torch

import litevar
from litevar.attention.components import KVCacheSpec
from litevar.attention.kv_cache import Int8KVCache, KVCache


def half_step(x: torch.Tensor) -> torch.Tensor:
    return x.abs().amax(dim=-1, keepdim=True) / 127 / 2


def test_appended_values_are_recovered_within_half_a_step():
    cache = Int8KVCache(2, 3, 10, 16, torch.float32, "cpu")
    k1, v1 = torch.randn(2, 3, 4, 16), torch.randn(2, 3, 4, 16)
    k2, v2 = torch.randn(2, 3, 6, 16) * 5, torch.zeros(2, 3, 6, 16)
    cache.append(k1, v1)
    k, v = cache.append(k2, v2)
    assert cache.k.dtype == torch.int8 and cache.length == 10 and k.shape == (2, 3, 10, 16)
    for got, want in ((k, torch.cat((k1, k2), 2)), (v, torch.cat((v1, v2), 2))):
        assert torch.all((got - want).abs() <= half_step(want) * (1 + 1e-6))
    assert torch.all(v[:, :, 4:] == 0)


def test_views_have_the_compute_dtype():
    cache = Int8KVCache(1, 2, 8, 16, torch.bfloat16, "cpu")
    k_new = torch.randn(1, 2, 5, 16, dtype=torch.bfloat16)
    k, v = cache.append(k_new, k_new)
    assert k.dtype == v.dtype == torch.bfloat16 == cache.k_scale.dtype
    # half a step plus the bf16 rounding of the scale and of the product
    bound = half_step(k_new.float()) + 2 ** -7 * k_new.float().abs()
    assert torch.all((k.float() - k_new.float()).abs() <= bound)


def test_append_rows_writes_and_returns_only_those_rows():
    cache = Int8KVCache(4, 2, 10, 8, torch.float32, "cpu")
    cache.append(torch.randn(4, 2, 3, 8), torch.randn(4, 2, 3, 8))
    k_new = torch.randn(2, 2, 5, 8)
    k, v = cache.append_rows(k_new, k_new, rows=2)
    assert k.shape == (2, 2, 8, 8) and cache.length == 8
    assert torch.all((k[:, :, 3:] - k_new).abs() <= half_step(k_new) * (1 + 1e-6))
    with pytest.raises(ValueError, match="append_rows got 3 rows"):
        cache.append_rows(torch.zeros(3, 2, 1, 8), torch.zeros(3, 2, 1, 8), rows=2)
    with pytest.raises(RuntimeError, match="KV cache full"):
        cache.append(torch.zeros(4, 2, 3, 8), torch.zeros(4, 2, 3, 8))


def test_bytes_are_about_half_of_a_bf16_cache():
    D = 64
    int8 = Int8KVCache(2, 4, 100, D, torch.bfloat16, "cpu")
    bf16 = KVCache(2, 4, 100, D, torch.bfloat16, "cpu")
    assert int8.reserved_bytes() / bf16.reserved_bytes() == (D + 2) / (2 * D)
    x = torch.randn(2, 4, 30, D, dtype=torch.bfloat16)
    int8.append(x, x)
    bf16.append(x, x)
    assert int8.nbytes() / bf16.nbytes() == (D + 2) / (2 * D)
    assert int8.max_len == 100 and int8.nbytes() == 2 * 2 * 4 * 30 * (D + 2)


@pytest.fixture(scope="module", params=["fp32", pytest.param("bf16", marks=pytest.mark.slow)])
def tiny(ref_dir, request):
    return litevar.load_pipeline(ref_dir / "tiny_var.pth", ref_dir / "tiny_vae.pth",
                                 config=ref_dir / "tiny_config.json", dtype=request.param)


def sample(pipe, storage):
    logits = []
    previous = pipe.attention.kv
    pipe.attention.kv = KVCacheSpec(storage)
    try:
        out = pipe.generate(list(range(8)), seed=0, progress=False, timings=True,
                            on_logits=lambda si, l_BlV: logits.append(l_BlV.clone()))
    finally:
        pipe.attention.kv = previous
    return out, logits


def test_sampling_with_the_int8_cache_stays_close_to_the_float_cache(tiny):
    assert tiny.attention.kv.storage == "model"
    dense, dense_logits = sample(tiny, "model")
    int8, int8_logits = sample(tiny, "int8")
    agreement = [float((a == b).float().mean()) for a, b in zip(dense.tokens, int8.tokens)]
    # measured: fp32 1.0 at every scale; bf16 1.0, 1.0, 1.0, 0.99, 0.99
    assert min(agreement) >= 0.9 and min(agreement[:3]) >= 0.95
    first = (int8_logits[0] - dense_logits[0]).abs().max() / dense_logits[0].abs().max()
    assert 0 < first < 0.02  # measured 2.5e-3 (fp32), 5.6e-3 (bf16): the cache is used, and close
    head_dim = tiny.config.var.head_dim
    element = torch.finfo(tiny.dtype).bits // 8
    ratio = int8.timings["kv_cache_bytes"] / dense.timings["kv_cache_bytes"]
    assert ratio == (head_dim + element) / (element * head_dim)
