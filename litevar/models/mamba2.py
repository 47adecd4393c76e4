"""Mamba-2 in plain PyTorch (CPU and CUDA): the chunked SSD scan with an initial state, a depthwise causal conv that
continues from carried rows, and the gated RMSNorm; parameter names as in ``mamba_ssm.Mamba2`` (one group).

Per head h, with ``a_t = dt_t * A_h`` (A < 0): ``S_t = exp(a_t) S_{t-1} + dt_t x_t B_t^T`` ([P, N]) and
``y_t = S_t C_t + D_h x_t``. :func:`ssd_scan` evaluates it chunk by chunk: inside a chunk as a masked quadratic form,
across chunks through the carried state, so any chunking (and any length) gives the same function.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..attention.components import STATE_STORAGES


@dataclass
class MambaState:
    """What a Mamba-2 layer carries from one call to the next, per row.

    Args:
        conv_BKD: the last ``d_conv - 1`` pre-conv ``xBC`` rows [B, d_conv - 1, conv_dim] (zeros before the start).
        ssm_BHPN: the SSM state [B, heads, headdim, d_state], float32 (float64 for a float64 layer).
    """

    conv_BKD: torch.Tensor
    ssm_BHPN: torch.Tensor

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv_BKD, self.ssm_BHPN))


class Int8MambaState:
    """A :class:`MambaState` whose SSM state is kept between calls as int8 with one float32 scale per
    (row, head, headdim index), symmetric over ``d_state``: about a quarter of the float32 bytes. Reading
    ``ssm_BHPN`` dequantizes, assigning it quantizes; the conv rows stay in the model's dtype (a few % of the bytes).
    """

    def __init__(self, conv_BKD: torch.Tensor, ssm_BHPN: torch.Tensor) -> None:
        self.conv_BKD = conv_BKD
        self.ssm_BHPN = ssm_BHPN

    @property
    def ssm_BHPN(self) -> torch.Tensor:
        return self._codes.to(self._scales.dtype) * self._scales

    @ssm_BHPN.setter
    def ssm_BHPN(self, value: torch.Tensor) -> None:
        scales = value.abs().amax(-1, keepdim=True).div_(127).clamp_min_(torch.finfo(value.dtype).tiny)
        self._codes = (value / scales).round_().clamp_(-127, 127).to(torch.int8)
        self._scales = scales

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.conv_BKD, self._codes, self._scales))


def _chunk_step(x_BlHP, a_BlH, dt_BlH, B_BlN, C_BlN, state_BHPN):
    """One chunk of the scan from ``state_BHPN``: (y [B, l, H, P], state at the chunk's end)."""
    cum_BHl = a_BlH.cumsum(1).transpose(1, 2)
    l = cum_BHl.shape[-1]
    seg_BHll = cum_BHl.unsqueeze(-1) - cum_BHl.unsqueeze(-2)
    causal_ll = torch.ones(l, l, dtype=torch.bool, device=x_BlHP.device).tril()
    decay_BHll = seg_BHll.masked_fill(~causal_ll, -torch.inf).exp()
    scores_Bll = C_BlN @ B_BlN.transpose(1, 2)
    weights_BHll = decay_BHll * scores_Bll.unsqueeze(1) * dt_BlH.transpose(1, 2).unsqueeze(2)
    x_BHlP = x_BlHP.transpose(1, 2)
    y_BHlP = weights_BHll @ x_BHlP
    from_state_BHlP = (C_BlN.unsqueeze(1) @ state_BHPN.transpose(-1, -2)) * cum_BHl.exp().unsqueeze(-1)
    y_BHlP = y_BHlP + from_state_BHlP
    to_end_BHl = (cum_BHl[..., -1:] - cum_BHl).exp() * dt_BlH.transpose(1, 2)
    added_BHPN = (x_BHlP * to_end_BHl.unsqueeze(-1)).transpose(-1, -2) @ B_BlN.unsqueeze(1)
    state_BHPN = state_BHPN * cum_BHl[..., -1:].exp().unsqueeze(-1) + added_BHPN
    return y_BHlP.transpose(1, 2), state_BHPN


def ssd_scan(x_BLHP: torch.Tensor, dt_BLH: torch.Tensor, A_H: torch.Tensor, B_BLN: torch.Tensor, C_BLN: torch.Tensor,
             chunks: Sequence[int] | int = 256,
             initial_BHPN: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The SSD recurrence (without the D skip) over L steps, in the inputs' dtype.

    Args:
        x_BLHP: inputs per head [B, L, H, P].
        dt_BLH: step sizes (after softplus) [B, L, H].
        A_H: decay rates per head (negative) [H].
        B_BLN, C_BLN: input and output projections of the state, shared by the heads (one group) [B, L, N].
        chunks: the chunk lengths (they must sum to L), or one chunk size (the last chunk takes the rest).
        initial_BHPN: the state before the first step [B, H, P, N] (None: zeros).

    Returns:
        (y [B, L, H, P], the state after the last step [B, H, P, N]).
    """
    Bsz, L, H, P = x_BLHP.shape
    if isinstance(chunks, int):
        if chunks < 1:
            raise ValueError(f"chunk size must be >= 1, got {chunks}")
        chunks = [min(chunks, L - start) for start in range(0, L, chunks)]
    if sum(chunks) != L or any(c < 1 for c in chunks):
        raise ValueError(f"chunk lengths {list(chunks)} must be positive and sum to the sequence length {L}")
    state = (x_BLHP.new_zeros(Bsz, H, P, B_BLN.shape[-1]) if initial_BHPN is None
             else initial_BHPN.to(x_BLHP.dtype))
    a_BLH = dt_BLH * A_H
    outs = []
    start = 0
    for length in chunks:
        part = slice(start, start + length)
        y, state = _chunk_step(x_BLHP[:, part], a_BLH[:, part], dt_BLH[:, part], B_BLN[:, part], C_BLN[:, part], state)
        outs.append(y)
        start += length
    return torch.cat(outs, 1), state


def _at_least_fp32(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


class GatedRMSNorm(nn.Module):
    """``RMSNorm(y * SiLU(z)) * weight`` over the last dimension (one group; mamba_ssm's ``norm_before_gate=False``)."""

    def __init__(self, width: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, y_BLD: torch.Tensor, z_BLD: torch.Tensor) -> torch.Tensor:
        wide = _at_least_fp32(y_BLD.dtype)
        gated = y_BLD.to(wide) * F.silu(z_BLD.to(wide))
        normed = gated * torch.rsqrt(gated.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * self.weight.to(wide)).to(y_BLD.dtype)


class Mamba2(nn.Module):
    """A Mamba-2 layer (SSD, scalar decay per head, one B/C group) with ``mamba_ssm.Mamba2``'s state_dict keys:
    ``in_proj`` (z | xBC | dt), ``conv1d``, ``dt_bias``, ``A_log``, ``D``, ``norm.weight``, ``out_proj``.

    ``forward(u, chunks, state)`` runs the causal scan over the given tokens, continuing from ``state`` when given
    (conv rows and SSM state of the tokens before); the state is updated in place. The scan runs in float32 (or float64)
    whatever the weights' dtype.

    Args:
        d_model: the model width C.
        d_state: N.
        d_conv: the causal conv's width.
        expand: d_inner = expand * C.
        headdim: P (heads = d_inner / P).
        norm_eps: the gated RMSNorm's epsilon.

    Example:
        >>> m = Mamba2(128)
        >>> m(torch.zeros(2, 5, 128)).shape
        torch.Size([2, 5, 128])
    """

    def __init__(self, d_model: int, d_state: int = 64, d_conv: int = 4, expand: int = 2, headdim: int = 64,
                 norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.d_inner = expand * d_model
        if self.d_inner % headdim:
            raise ValueError(f"expand * d_model ({self.d_inner}) must be a multiple of headdim ({headdim})")
        self.d_state, self.d_conv, self.headdim = d_state, d_conv, headdim
        self.nheads = self.d_inner // headdim
        self.conv_dim = self.d_inner + 2 * d_state
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + self.nheads, bias=False)
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, d_conv, groups=self.conv_dim, bias=True)
        self.dt_bias = nn.Parameter(torch.zeros(self.nheads))
        self.A_log = nn.Parameter(torch.zeros(self.nheads))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.norm = GatedRMSNorm(self.d_inner, norm_eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def empty_state(self, rows: int, dtype: torch.dtype, device: torch.device | str,
                    storage: str = "model") -> MambaState | Int8MambaState:
        """The state before the first token (zeros) for ``rows`` rows; ``storage`` "int8" keeps the SSM state
        in int8 between calls (:class:`Int8MambaState`)."""
        if storage not in STATE_STORAGES:
            raise ValueError(f"Mamba state storage must be one of {STATE_STORAGES}, got {storage!r}")
        conv = torch.zeros(rows, self.d_conv - 1, self.conv_dim, dtype=dtype, device=device)
        ssm = torch.zeros(rows, self.nheads, self.headdim, self.d_state, dtype=_at_least_fp32(dtype), device=device)
        return Int8MambaState(conv, ssm) if storage == "int8" else MambaState(conv, ssm)

    def _causal_conv(self, padded_BLK: torch.Tensor) -> torch.Tensor:
        """``conv1d`` (depthwise, valid) as ``d_conv`` shifted multiply-adds in [B, L, K] layout: faster than a
        depthwise ``nn.Conv1d`` call on CPU, forward and backward, and no transposes."""
        weight_KW, length = self.conv1d.weight[:, 0], padded_BLK.shape[1] - self.d_conv + 1
        out_BLK = padded_BLK[:, :length] * weight_KW[:, 0]
        for tap in range(1, self.d_conv):
            out_BLK = out_BLK + padded_BLK[:, tap:tap + length] * weight_KW[:, tap]
        return out_BLK + self.conv1d.bias

    def forward(self, u_BLC: torch.Tensor, chunks: Sequence[int] | int = 256,
                state: MambaState | None = None) -> torch.Tensor:
        """Outputs [B, L, C] of the tokens ``u_BLC``; with ``state``, they follow the tokens it summarises (and it is
        advanced past them)."""
        Bsz, L, _ = u_BLC.shape
        z_BLD, xBC_BLK, dt_BLH = self.in_proj(u_BLC).split([self.d_inner, self.conv_dim, self.nheads], dim=-1)
        history = (xBC_BLK.new_zeros(Bsz, self.d_conv - 1, self.conv_dim) if state is None
                   else state.conv_BKD.to(xBC_BLK.dtype))
        padded_BLK = torch.cat((history, xBC_BLK), 1)
        conv_BLK = F.silu(self._causal_conv(padded_BLK))
        wide = _at_least_fp32(u_BLC.dtype)
        x_BLD, B_BLN, C_BLN = conv_BLK.to(wide).split([self.d_inner, self.d_state, self.d_state], dim=-1)
        dt_BLH = F.softplus(dt_BLH.to(wide) + self.dt_bias.to(wide))
        A_H = -self.A_log.to(wide).exp()
        x_BLHP = x_BLD.view(Bsz, L, self.nheads, self.headdim)
        with torch.autocast(u_BLC.device.type, enabled=False):  # the scan stays in float32 under mixed precision
            y_BLHP, final_BHPN = ssd_scan(x_BLHP, dt_BLH, A_H, B_BLN, C_BLN, chunks,
                                          None if state is None else state.ssm_BHPN)
        y_BLHP = y_BLHP + x_BLHP * self.D.to(wide).view(-1, 1)
        if state is not None:
            state.conv_BKD = padded_BLK[:, padded_BLK.shape[1] - (self.d_conv - 1):].to(state.conv_BKD.dtype)
            state.ssm_BHPN = final_BHPN
        y_BLD = self.norm(y_BLHP.reshape(Bsz, L, self.d_inner).to(u_BLC.dtype), z_BLD)
        return self.out_proj(y_BLD)
