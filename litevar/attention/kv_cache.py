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
        """Store new keys/values; return all cached keys/values (views). Fewer rows than the cache holds are its
        first rows (the conditional half once the unconditional rows are dropped): see :meth:`append_rows`."""
        rows = k_BHlc.shape[0]
        if rows < self.k.shape[0]:
            return self.append_rows(k_BHlc, v_BHlc, rows)
        new_len = self._new_length(k_BHlc.shape[2])
        self._write(slice(None), new_len, k_BHlc, v_BHlc)
        self.length = new_len
        return self._read(slice(None), new_len)

    def append_rows(self, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Store new keys/values of the first ``rows`` rows only (the other rows' slots stay unwritten and must
        not be read again); return those rows' cached keys/values (views)."""
        if k_BHlc.shape[0] != rows:
            raise ValueError(f"append_rows got {k_BHlc.shape[0]} rows of keys, expected {rows}")
        new_len = self._new_length(k_BHlc.shape[2])
        self._write(slice(0, rows), new_len, k_BHlc, v_BHlc)
        self.length = new_len
        return self._read(slice(0, rows), new_len)

    def _new_length(self, new_tokens: int) -> int:
        new_len = self.length + new_tokens
        if new_len > self.max_len:
            raise RuntimeError(f"KV cache full: {new_len} tokens > reserved {self.max_len}")
        return new_len

    def _write(self, rows: slice, new_len: int, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> None:
        self.k[rows, :, self.length:new_len] = k_BHlc
        self.v[rows, :, self.length:new_len] = v_BHlc

    def _read(self, rows: slice, new_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[rows, :, :new_len], self.v[rows, :, :new_len]

    def nbytes(self) -> int:
        """Bytes of the keys/values currently held (what a compressed cache would shrink)."""
        per_token = self.k[:, :, :1].numel() * self.k.element_size()
        return 2 * per_token * self.length

    def reserved_bytes(self) -> int:
        """Bytes allocated for the cache."""
        return 2 * self.k.numel() * self.k.element_size()


class Int8KVCache(KVCache):
    """A :class:`KVCache` holding int8 keys/values with one symmetric scale per (row, head, token).

    About half the bytes of a bf16 cache (plus ``2 / head_dim`` for the scales). :meth:`append` quantizes the
    new tokens and returns everything cached so far dequantized to ``dtype`` (new tensors, not views).

    Args:
        batch, heads, max_len, head_dim, device: as for :class:`KVCache`.
        dtype: compute dtype of the returned keys/values; the scales are stored in it too.

    Example:
        >>> cache = Int8KVCache(2, 4, 10, 8, torch.float32, "cpu")
        >>> k, v = cache.append(torch.ones(2, 4, 3, 8), torch.ones(2, 4, 3, 8))
        >>> k.dtype, cache.k.dtype, float(k.max())
        (torch.float32, torch.int8, 1.0)
    """

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device | str) -> None:
        self.dtype = dtype
        self.k = torch.empty(batch, heads, max_len, head_dim, dtype=torch.int8, device=device)
        self.v = torch.empty_like(self.k)
        # zeros: slots left unwritten by append_rows then dequantize to 0 rather than to garbage
        self.k_scale = torch.zeros(batch, heads, max_len, 1, dtype=dtype, device=device)
        self.v_scale = torch.zeros_like(self.k_scale)
        self.length = 0

    def _write(self, rows: slice, new_len: int, k_BHlc: torch.Tensor, v_BHlc: torch.Tensor) -> None:
        for store, scales, x in ((self.k, self.k_scale, k_BHlc), (self.v, self.v_scale, v_BHlc)):
            x = x.float()
            scale = (x.abs().amax(dim=-1, keepdim=True) / 127).to(self.dtype)
            # quantize against the stored (rounded) scale; an all-zero vector has scale 0 and stays 0
            divisor = torch.where(scale > 0, scale, torch.ones_like(scale)).float()
            store[rows, :, self.length:new_len] = torch.round(x / divisor).clamp_(-127, 127).to(torch.int8)
            scales[rows, :, self.length:new_len] = scale

    def _read(self, rows: slice, new_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        k = self.k[rows, :, :new_len].to(self.dtype) * self.k_scale[rows, :, :new_len]
        v = self.v[rows, :, :new_len].to(self.dtype) * self.v_scale[rows, :, :new_len]
        return k, v

    def nbytes(self) -> int:
        per_token = self.k[:, :, :1].numel() * self.k.element_size()
        per_token += self.k_scale[:, :, :1].numel() * self.k_scale.element_size()
        return 2 * per_token * self.length

    def reserved_bytes(self) -> int:
        return 2 * (self.k.numel() * self.k.element_size() + self.k_scale.numel() * self.k_scale.element_size())
