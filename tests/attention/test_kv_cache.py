import pytest
import torch

from litevar.attention import KVCache


def test_append_returns_everything_cached_and_counts_bytes():
    cache = KVCache(2, 3, 10, 4, torch.float32, "cpu")
    k1, v1 = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    k2, v2 = torch.randn(2, 3, 6, 4), torch.randn(2, 3, 6, 4)
    cache.append(k1, v1)
    k, v = cache.append(k2, v2)
    assert torch.equal(k, torch.cat((k1, k2), 2)) and torch.equal(v, torch.cat((v1, v2), 2))
    assert cache.nbytes() == 2 * 2 * 3 * 10 * 4 * 4 == cache.reserved_bytes()


def test_overflow_is_an_error():
    cache = KVCache(1, 1, 2, 4, torch.float32, "cpu")
    with pytest.raises(RuntimeError, match="KV cache full"):
        cache.append(torch.zeros(1, 1, 3, 4), torch.zeros(1, 1, 3, 4))
