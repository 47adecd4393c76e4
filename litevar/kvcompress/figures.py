"""Pictures of KV-cache compression: which keys a policy keeps (HACK's kept-key figure) and the head types.

:class:`KeptKeysRecorder` wraps a policy and counts, per (layer, selection scale, head), the original positions of
the keys its ``select`` keeps for the conditional rows; it returns the policy's choice unchanged, so generation is
the same as without it. Where a head group's candidates all fit its budget, ``select`` is not called and every
key is kept; :meth:`KeptKeys.share` fills those in. Figures use matplotlib's object API with the Agg canvas.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..files import write_atomic
from .heads import classify

STRUCTURAL_COLOUR, CONTEXTUAL_COLOUR = "tab:red", "tab:blue"


@dataclass
class KeptKeys:
    """What a policy kept: ``counts[(layer, scale)]`` float64 [heads, seq_len], how many recorded rows kept each
    original position after the selection at ``scale``; ``rows[(layer, scale)]`` float64 [heads], the rows recorded
    for each head there (0: the head's group never selected at that scale, so it kept everything).

    Args:
        heads: attention heads per layer. policy: the policy's name. ratio: the share removed (for titles), or None.
    """

    heads: int
    policy: str
    ratio: float | None = None
    counts: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)
    rows: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)

    def add(self, layer: int, scale: int, heads: torch.Tensor, positions: torch.Tensor, seq_len: int) -> None:
        """Count kept ``positions`` long [rows, len(heads), kept] (of a pyramid of ``seq_len`` tokens) of the group
        of ``heads`` at (layer, scale)."""
        key = (layer, scale)
        if key not in self.counts:
            self.counts[key] = torch.zeros(self.heads, seq_len, dtype=torch.float64)
            self.rows[key] = torch.zeros(self.heads, dtype=torch.float64)
        rows, g, _ = positions.shape
        hits = torch.zeros(rows, g, seq_len, device=positions.device)
        hits.scatter_(2, positions.long(), 1.0)
        self.counts[key][heads.cpu()] += hits.sum(dim=0).double().cpu()
        self.rows[key][heads.cpu()] += rows

    def share(self, layer: int, scale: int, patch_nums: Sequence[int]) -> torch.Tensor:
        """float64 [heads, stored]: the share of recorded rows keeping each stored position after the selection at
        ``scale`` (1 where the head kept everything); NaN for positions of later scales (not generated yet).
        ``stored`` is the pyramid without its last scale (never stored)."""
        ends = np.cumsum([p * p for p in patch_nums])
        stored, end = int(ends[-2]) if len(ends) > 1 else 0, int(ends[scale])
        out = torch.full((self.heads, stored), float("nan"), dtype=torch.float64)
        out[:, :end] = 1.0
        if (layer, scale) in self.counts:
            counts, rows = self.counts[(layer, scale)], self.rows[(layer, scale)]
            selected = rows > 0
            out[selected, :end] = counts[selected, :end] / rows[selected].unsqueeze(1)
        return out


class KeptKeysRecorder:
    """A KV policy that records what the wrapped ``policy`` keeps; every other attribute is the policy's.

    Args:
        policy: the policy object (``pipe.attention.kv_policy``).
        ratio: the share removed, for figure titles.
        rows: how many leading rows of each selection to record: the conditional rows when it is at most the batch
            (set it to the batch before each generation; 1: the first conditional row).

    Example:
        >>> recorder = KeptKeysRecorder(pipe.attention.kv_policy, ratio=0.7)  # doctest: +SKIP
        >>> pipe.attention.kv_policy = recorder; pipe.generate([1, 2], seed=[0, 1])  # doctest: +SKIP
        >>> recorder.record.share(0, 3, pipe.config.var.patch_nums).shape  # doctest: +SKIP
    """

    def __init__(self, policy: Any, ratio: float | None = None, rows: int = 1) -> None:
        self.policy = policy
        self.rows = rows
        self.record = KeptKeys(policy.heads, policy.name, ratio)
        self._group_heads: dict[int, list[torch.Tensor]] = {}

    def __getattr__(self, name: str) -> Any:
        if name == "policy":  # not set yet (copying, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.policy, name)

    def select(self, ctx) -> torch.Tensor:
        index = self.policy.select(ctx)
        if ctx.layer not in self._group_heads:
            groups = self.policy.groups(ctx.layer)
            self._group_heads[ctx.layer] = [torch.as_tensor(h, dtype=torch.long) for h, _ in groups]
        rows = min(self.rows, index.shape[0])
        kept = ctx.positions[:rows].gather(2, index[:rows])
        self.record.add(ctx.layer, ctx.scale, self._group_heads[ctx.layer][ctx.group], kept, ctx.scale_of.numel())
        return index


def record_kept_keys(pipe, samples: int, batch_size: int, seed: int = 0, ratio: float | None = None,
                     progress: bool = True, **sampling) -> KeptKeys:
    """Generate ``samples`` images (classes in turn, image i with seed ``seed + i``) with ``pipe``'s own attention
    (its KV policy wrapped by a :class:`KeptKeysRecorder`, put back afterwards) and return what was kept for the
    conditional rows.

    Args:
        pipe: a pipeline with a KV policy (a recipe with a kv-compress step). ratio: for titles. sampling: as for
            :meth:`~litevar.pipeline.Pipeline.generate`.

    Example:
        >>> record = record_kept_keys(build_pipeline("kv_recipe.json"), 4, 4)  # doctest: +SKIP
    """
    from ..jobs import JobList

    policy = pipe.attention.kv_policy
    if policy is None:
        raise ValueError("the pipeline has no KV policy: apply a recipe with a kv-compress step")
    recorder = KeptKeysRecorder(policy, ratio)
    jobs = JobList(range(pipe.num_classes), samples=samples, seed=seed)
    pipe.attention.kv_policy = recorder
    try:
        for chunk in tqdm(jobs.chunks(batch_size), desc="kept keys", disable=not progress):
            labels, seeds = jobs.batch(chunk)
            recorder.rows = len(labels)
            pipe.generate(labels, seed=seeds, progress=False, **sampling)
    finally:
        pipe.attention.kv_policy = policy
    return recorder.record


def _head_type(contextual: torch.Tensor | None, layer: int, head: int) -> str | None:
    if contextual is None:
        return None
    return "contextual" if bool(contextual[layer, head]) else "structural"


def kept_keys_summary(record: KeptKeys, patch_nums: Sequence[int], depth: int,
                      contextual: torch.Tensor | None = None) -> dict[str, Any]:
    """Per layer, selection scale and head: mean keys kept per row, and per earlier scale the mean keys kept and
    their share of that scale's tokens (``{"layers": {"0": {"2": [{"head": 0, ...}, ...]}}}``).

    Args:
        record: from :func:`record_kept_keys`. patch_nums, depth: the model's. contextual: bool [depth, heads] (HACK:
            each entry gets its ``type``), or None.
    """
    sizes = [p * p for p in patch_nums]
    begins = np.cumsum([0] + sizes)
    layers: dict[str, Any] = {}
    for layer in range(depth):
        per_scale = {}
        for scale in range(len(sizes) - 1):
            share = record.share(layer, scale, patch_nums)
            rows = record.rows.get((layer, scale), torch.zeros(record.heads))
            entries = []
            for head in range(record.heads):
                by_scale = [float(share[head, begins[j]:begins[j + 1]].sum()) for j in range(scale + 1)]
                entry = {"head": head, "kept": round(sum(by_scale), 4), "selected": bool(rows[head] > 0),
                         "kept_by_scale": [round(v, 4) for v in by_scale],
                         "share_by_scale": [round(v / sizes[j], 4) for j, v in enumerate(by_scale)]}
                kind = _head_type(contextual, layer, head)
                if kind is not None:
                    entry["type"] = kind
                entries.append(entry)
            per_scale[str(scale)] = entries
        layers[str(layer)] = per_scale
    return {"policy": record.policy, "ratio": record.ratio, "patch_nums": list(patch_nums),
            "what": "keys kept for the next scale after the selection at each scale, mean per conditional row: "
                    "kept (tokens), kept_by_scale (tokens of each earlier scale), share_by_scale (their share of "
                    "that scale's tokens); selected: false where the head's group kept everything",
            "layers": layers}


def _figure(width_in: float, height_in: float, layout: str | None = "constrained"):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def draw_kept_keys(record: KeptKeys, patch_nums: Sequence[int], contextual: torch.Tensor | None,
                   layers: Sequence[int], path: Path) -> None:
    """HACK-style kept-key picture: a row of panels per chosen layer, one panel per head; in a panel, y is the scale
    after which the selection was made and x the key's original position in the stored pyramid: coloured by the
    share of rows keeping it, white evicted, grey not generated yet; dotted lines at scale borders.

    Args:
        record: from :func:`record_kept_keys`. patch_nums: the model's pyramid.
        contextual: bool [depth, heads] (HACK: panel titles say structural / contextual), or None.
        layers: the layers drawn. path: the PNG written.
    """
    from matplotlib import colormaps

    sizes = [p * p for p in patch_nums]
    begins = np.cumsum([0] + sizes)
    selections = len(sizes) - 1
    n_layers, heads = len(layers), record.heads
    width, height = 1.9 * heads + 1.4, (0.12 * selections + 0.5) * n_layers + 1.0
    fig = _figure(width, height, layout=None)
    fig.subplots_adjust(left=0.8 / width, right=1 - 1.1 / width, top=1 - 0.75 / height, bottom=0.45 / height,
                        hspace=min(0.9, 2.4 / max(selections, 1)), wspace=0.12)
    axes = fig.subplots(n_layers, heads, squeeze=False)
    cmap = colormaps["Blues"].with_extremes(bad="0.82")
    labels, last = [], -float("inf")
    for b in begins[1:selections]:  # label the scale borders far enough apart to be read
        labels.append(str(b) if b - last >= 0.06 * begins[selections] else "")
        last = b if labels[-1] else last
    image = None
    for r, layer in enumerate(layers):
        for head in range(heads):
            ax = axes[r][head]
            share = torch.stack([record.share(layer, s, patch_nums)[head] for s in range(selections)]).numpy()
            image = ax.imshow(np.ma.masked_invalid(share), cmap=cmap, vmin=0, vmax=1, aspect="auto",
                              interpolation="nearest")
            for b in begins[1:selections]:
                ax.axvline(b - 0.5, color="0.35", linewidth=0.4, linestyle=":")
            kind = _head_type(contextual, layer, head)
            colour = {"structural": STRUCTURAL_COLOUR, "contextual": CONTEXTUAL_COLOUR}.get(kind, "black")
            ax.set_title(f"layer {layer} head {head}" + (f" {kind}" if kind else ""), fontsize=6, color=colour, pad=2)
            ax.set_xticks(begins[1:selections] - 0.5, labels, fontsize=4)
            ax.set_yticks(range(selections), [str(s) for s in range(selections)] if head == 0 else [], fontsize=4)
            if head == 0:
                ax.set_ylabel("selection after scale", fontsize=5)
            if r == n_layers - 1:
                ax.set_xlabel("key position", fontsize=5)
    cax = fig.add_axes([1 - 0.9 / width, 0.25, 0.18 / width, 0.5])
    fig.colorbar(image, cax=cax).set_label("share of rows keeping the key", fontsize=6)
    cax.tick_params(labelsize=5)
    ratio = "" if record.ratio is None else f" at ratio {record.ratio:g}"
    fig.suptitle(f"{record.policy}{ratio}: keys kept for the next scale\n(conditional rows; white: evicted, grey: "
                 "later scales)", fontsize=8)
    write_atomic(Path(path), lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def draw_heads(variance: torch.Tensor, alpha: float, path: Path) -> None:
    """Each head's summed column variance (log scale) by layer, contextual heads (lowest alpha share) in blue."""
    contextual = classify(variance, alpha)
    depth, heads = variance.shape
    fig = _figure(max(4.0, 0.35 * depth + 2), 3.2)
    ax = fig.add_subplot()
    for label, mask, colour in (("structural", ~contextual, STRUCTURAL_COLOUR),
                                ("contextual", contextual, CONTEXTUAL_COLOUR)):
        layer, head = torch.nonzero(mask, as_tuple=True)
        ax.scatter(layer.numpy(), variance[layer, head].clamp_min(1e-12).numpy(), s=14, c=colour, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("column variance of last-scale attention")
    ax.set_title(f"{int(contextual.sum())} of {depth * heads} heads contextual (alpha {alpha:.2f})", fontsize=9)
    ax.set_xticks(range(depth))
    ax.legend(fontsize=8)
    write_atomic(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))


def write_kv_figures(pipe, step, layers: Sequence[int], jobs: tuple[int, int, int], out: Path,
                     progress: bool = True, extra: dict | None = None, **sampling) -> list[Path]:
    """``litevar analyze-attention --kv-recipe``: OUT/kv_kept_keys.png and .json for ``pipe`` (built with a recipe
    whose kv-compress config is ``step``) over ``jobs`` = (samples, batch size, seed), and OUT/kv_heads.png for
    policy hack. Returns the files written."""
    from .heads import load_heads

    samples, batch_size, seed = jobs
    cfg = pipe.config.var
    record = record_kept_keys(pipe, samples, batch_size, seed, step.ratio, progress, **sampling)
    policy = pipe.attention.kv_policy
    contextual = getattr(policy, "contextual", None) if step.policy == "hack" else None
    written = [out / "kv_kept_keys.png", out / "kv_kept_keys.json"]
    draw_kept_keys(record, cfg.patch_nums, contextual, layers, written[0])
    report = {**kept_keys_summary(record, cfg.patch_nums, cfg.depth, contextual), "kv_policy": policy.describe(),
              "samples": samples, "seed": seed, "sampling": sampling, **(extra or {})}
    write_atomic(written[1], lambda tmp: tmp.write_text(json.dumps(report, indent=1)))
    if step.policy == "hack":
        variance, calibrated = load_heads(step.heads, pipe.identity())
        written.append(out / "kv_heads.png")
        draw_heads(variance, calibrated if step.alpha is None else step.alpha, written[-1])
    return written
