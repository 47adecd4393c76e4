"""FLOPs per image of one generation of a pipeline, by bucket and by scale, with :class:`litevar.flops.FlopCounter`."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..attention.context import AttnContext
from ..flops import BUCKETS, FlopCounter


def _per(value: int, n: int) -> int | float:
    return value // n if value % n == 0 else value / n


def count_generation_flops(pipe, labels: Sequence[int], seeds: Sequence[int], **sampling: Any) -> dict[str, Any]:
    """FLOPs per image of one ``pipe.generate`` call (both CFG halves are computed), by bucket and by scale.

    Args:
        pipe: a :class:`litevar.Pipeline`.
        labels: class ids, one per image.
        seeds: one seed per image.
        **sampling: cfg / top_k / top_p / more_smooth (None or missing: ``pipe.sampling``).

    Returns:
        ``{"attention", "linear", "decoder", "other", "total"}`` FLOPs per image, ``per_scale`` (a list of
        ``{"attention", "linear", "other"}`` per image; scale s holds the work from the start of its transformer
        pass to the next one's, the decoder excluded), ``ops`` (per-op calls and FLOPs for the whole batch),
        ``uncounted`` (matmul-like ops with no formula, with call counts) and ``images``.

    Example:
        >>> flops = count_generation_flops(pipe, [0], [0])  # doctest: +SKIP
        >>> flops["linear"], flops["decoder"]  # doctest: +SKIP
    """
    counter = FlopCounter()
    counter.scale = 0
    handles = counter.track_module(pipe.vae.decoder, "decoder") + counter.track_module(pipe.vae.post_quant_conv, "decoder")

    def on_block(module, args, kwargs):
        ctx = next((a for a in (*args, *kwargs.values()) if isinstance(a, AttnContext)), None)
        if ctx is not None and ctx.scale_index is not None:
            counter.scale = ctx.scale_index

    handles.append(pipe.var.blocks[0].register_forward_pre_hook(on_block, with_kwargs=True))
    try:
        with counter:
            out = pipe.generate(list(labels), seed=list(seeds), progress=False, **sampling)
    finally:
        for handle in handles:
            handle.remove()
    n = out.images.shape[0]
    report: dict[str, Any] = {bucket: _per(counter.totals[bucket], n) for bucket in BUCKETS}
    report["total"] = _per(counter.total, n)
    report["per_scale"] = [{b: _per(v, n) for b, v in counter.per_scale[s].items()} for s in sorted(counter.per_scale)]
    report["ops"] = {name: dict(rec) for name, rec in sorted(counter.by_op.items())}
    report["uncounted"] = [{"op": name, "calls": calls} for name, calls in sorted(counter.uncounted.items())]
    report["images"] = n
    return report
