"""Attention analysis for MDWA/ASC (LiteVAR Fig. 2): mean attention maps on the KV-cached path, and figures of
them and of the cond/uncond similarity. Figures use matplotlib's object API with the Agg canvas (no pyplot state).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..files import write_atomic
from .probe import generate_with_processor
from .context import AttnContext
from .dense import DenseAttnProcessor
from .windows import WindowPlan

MAP_FLOOR = 1e-4


class AttentionMapProcessor:
    """Dense attention that sums the explicit probabilities of chosen (layer, query scale) pairs and heads.

    ``sums[(layer, k)]`` is float64 [len(heads), n_k^2, L_k] summed over every row of the batch (both CFG halves);
    ``rows[(layer, k)]`` counts those rows. Other layers and scales run plain dense attention.
    """

    def __init__(self, layers: Sequence[int], heads: Sequence[int], scales: Sequence[int]) -> None:
        self.layers, self.heads, self.scales = set(layers), list(heads), set(scales)
        self.sums: dict[tuple[int, int], torch.Tensor] = {}
        self.rows: dict[tuple[int, int], int] = {}
        self.dense = DenseAttnProcessor()

    def __call__(self, attn, x_BLC: torch.Tensor, ctx: AttnContext) -> torch.Tensor:
        layer, k = attn.block_idx, ctx.scale_index
        if ctx.kv_caches is None or layer not in self.layers or k not in self.scales:
            return self.dense(attn, x_BLC, ctx)
        q, key, v = attn.project_qkv(x_BLC)
        key, v = ctx.kv_caches[layer].append(key, v)
        probs_BHlL = ((q.float() @ key.float().transpose(-1, -2)) * attn.softmax_scale).softmax(dim=-1)
        chosen = probs_BHlL[:, self.heads].sum(dim=0).double().cpu()
        self.sums[(layer, k)] = self.sums.get((layer, k), 0) + chosen
        self.rows[(layer, k)] = self.rows.get((layer, k), 0) + probs_BHlL.shape[0]
        return attn.project_out((probs_BHlL @ v.float()).to(v.dtype))


def collect_attention_maps(pipe, layers: Sequence[int], heads: Sequence[int], scales: Sequence[int],
                           samples: int = 8, batch_size: int = 8, seed: int = 0, progress: bool = True,
                           **sampling) -> dict[tuple[int, int], torch.Tensor]:
    """Mean attention probabilities of the queries of each chosen scale over all cached keys.

    Generates ``samples`` images (classes in turn, image i with seed ``seed + i``, as :func:`collect_stats`) and
    averages over images and both CFG halves.

    Returns:
        ``{(layer, k): float32 [len(heads), n_k^2, L_k]}`` with ``L_k`` the tokens of scales 0..k.

    Example:
        >>> maps = collect_attention_maps(pipe, [0], [0, 1], [9], samples=4)  # doctest: +SKIP
        >>> maps[(0, 9)].shape  # doctest: +SKIP
        torch.Size([2, 256, 680])
    """
    probe = AttentionMapProcessor(layers, heads, scales)
    generate_with_processor(pipe, probe, samples, batch_size, seed, "attention maps", progress, **sampling)
    return {key: (total / probe.rows[key]).float() for key, total in probe.sums.items()}


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path: Path, dpi: int = 100) -> None:
    write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=dpi))


def draw_attention_maps(maps: dict[tuple[int, int], torch.Tensor], patch_nums: Sequence[int], layers: Sequence[int],
                        heads: Sequence[int], scales: Sequence[int], path: Path, plan: WindowPlan | None = None) -> None:
    """One panel per (layer, head) row and query scale column: queries (rows) x cached keys (columns), log colour
    scale, key-scale boundaries as dotted lines, and the plan's kept region outlined in red when given."""
    from matplotlib.colors import LogNorm

    begins = np.cumsum([0] + [p * p for p in patch_nums])
    vmax = max(float(m.max()) for m in maps.values())
    norm = LogNorm(vmin=MAP_FLOOR, vmax=max(vmax, MAP_FLOOR * 10))
    rows = [(layer, hi, h) for layer in layers for hi, h in enumerate(heads)]
    fig = _figure(4.2 * len(scales) + 0.8, 2.6 * len(rows) + 0.6)
    axes = fig.subplots(len(rows), len(scales), squeeze=False)
    image = None
    for r, (layer, hi, h) in enumerate(rows):
        for c, k in enumerate(scales):
            ax = axes[r][c]
            probs = maps[(layer, k)][hi].numpy()
            image = ax.imshow(np.maximum(probs, MAP_FLOOR), norm=norm, cmap="magma", aspect="auto",
                              interpolation="nearest")
            for j in range(1, k + 1):
                ax.axvline(begins[j] - 0.5, color="cyan", linewidth=0.5, linestyle=":")
            if plan is not None:
                keep = plan.keep_mask(layer, k)[h].float().numpy()
                if 0 < keep.mean() < 1:
                    ax.contour(keep, levels=[0.5], colors="red", linewidths=0.6)
            n_k = patch_nums[k]
            ax.set_title(f"layer {layer} head {h}: queries of scale {k} ({n_k}x{n_k})", fontsize=8)
            ax.set_xticks(begins[1:k + 1] - 0.5, [str(b) for b in begins[1:k + 1]], fontsize=6)
            ax.tick_params(axis="y", labelsize=6)
            if r == len(rows) - 1:
                ax.set_xlabel("cached key index (dotted: key-scale boundaries)", fontsize=7)
            if c == 0:
                ax.set_ylabel("query index in its scale", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.6, label="mean attention probability (log)")
    title = "mean attention maps (samples x both CFG halves)"
    if plan is not None:
        title += f"; red: kept region of the {plan.geometry} plan (threshold {plan.meta.get('threshold')})"
    fig.suptitle(title, fontsize=9)
    _save_png(fig, path)


def draw_cfg_similarity(similarity: torch.Tensor, patch_nums: Sequence[int], path: Path) -> None:
    """Heatmap layers x scales of the cond/uncond attention-output cosine similarity, with the values written in."""
    values = similarity.double().numpy()
    depth, K = values.shape
    fig = _figure(0.75 * K + 2.0, 0.45 * depth + 1.6)
    ax = fig.subplots()
    low = float(values.min())
    image = ax.imshow(values, cmap="viridis", vmin=min(low, 0.99), vmax=1.0, aspect="auto")
    middle = (min(low, 0.99) + 1.0) / 2
    for layer in range(depth):
        for k in range(K):
            ax.text(k, layer, f"{values[layer, k]:.2f}", ha="center", va="center", fontsize=6,
                    color="black" if values[layer, k] > middle else "white")
    ax.set_xticks(range(K), [f"{k}\n{p}x{p}" for k, p in enumerate(patch_nums)], fontsize=7)
    ax.set_yticks(range(depth), [str(layer) for layer in range(depth)], fontsize=7)
    ax.set_xlabel("scale")
    ax.set_ylabel("layer")
    ax.set_title("cosine similarity of cond / uncond attention outputs", fontsize=9)
    fig.colorbar(image, ax=ax)
    _save_png(fig, path)
