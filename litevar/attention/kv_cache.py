"""The KV cache as an object: preallocated per block, appended scale by scale.

Eviction or compression policies act on this object (not inside the attention math), so CFG sharing,
sparse attention and KV compression compose.
"""
from __future__ import annotations

import torch


class KVCache:
    """Keys and values of one attention layer, laid out [B, H, L, head_dim].

    Storage for ``max_len`` tokens is allocated once; :meth:`append` writes the new tokens in place and
    returns views of everything cached so far (no re-allocation per scale).

    Args:
        batch: rows (both CFG halves).
        heads: attention heads.
        max_len: tokens to reserve (the whole pyramid).
        head_dim: per-head width.
        dtype: storage dtype.
        device: storage device.

    Example:
        >>> cache = KVCache(2, 4, 10, 8, torch.float32, "cpu")
        >>> k, v = cache.append(torch.ones(2, 4, 3, 8), torch.ones(2, 4, 3, 8))
        >>> k.shape, cache.length
        (torch.Size([2, 4, 3, 8]), 3)
    """

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.k = torch.empty(batch, heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def append(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values; return all cached keys/values (views)."""
        new_len = self.length + k_BHlc.shape[2]
        if new_len > self.max_len:
            raise RuntimeError(f"KV cache full: {new_len} tokens > reserved {self.max_len}")
        self.k[:, :, self.length:new_len] = k_BHlc
        self.v[:, :, self.length:new_len] = v_BHlc
        self.length = new_len
        return self.k[:, :, :new_len], self.v[:, :, :new_len]

    def append_rows(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values of the first ``rows`` rows only (the other rows' slots stay unwritten and must
        not be read again); return those rows' cached keys/values (views)."""
        if k_BHlc.shape[0] != rows:
            raise ValueError(f"append_rows got {k_BHlc.shape[0]} rows of keys, expected {rows}")
        new_len = self.length + k_BHlc.shape[2]
        if new_len > self.max_len:
            raise RuntimeError(f"KV cache full: {new_len} tokens > reserved {self.max_len}")
        self.k[:rows, :, self.length:new_len] = k_BHlc
        self.v[:rows, :, self.length:new_len] = v_BHlc
        self.length = new_len
        return self.k[:rows, :, :new_len], self.v[:rows, :, :new_len]

    def nbytes(self) -> int:
        """Bytes of the keys/values currently held (what a compressed cache would shrink)."""
        per_token = self.k[:, :, :1].numel() * self.k.element_size()
        return 2 * per_token * self.length

    def reserved_bytes(self) -> int:
        """Bytes allocated for the cache."""
        return 2 * self.k.numel() * self.k.element_size()
