"""The VQ-VAE decoder on int8 convolutions: choose the convolutions where int8 pays, calibrate, convert.

Which convolutions pay is chosen by ``select``. ``"rule"`` (the default) is a cost rule, measured on a CPU with AMX
(``benchmarks/bench_decoder.py``): int8 wins where a convolution is compute-bound, i.e. where its dot products are
long (``in_channels * kh * kw``, the *reduction*); short ones (the 160-channel 256px stage, 1x1 convolutions,
``conv_in``, the 3-channel ``conv_out``) are bound by memory traffic, where rounding the input costs more than the
integer kernel saves. ``"probe"`` measures instead, on the machine applying the recipe
(:mod:`litevar.quant.probe`): a CPU without VNNI / AMX gets a float decoder, one with them the convolutions that
measured faster there. Either way the choice and its reasons are kept as ``pipe.decoder_int8_report``.

Calibration records every chosen convolution's input range on the decodes of real KV-cached generations of
the pipeline (classes in turn, image i with seed ``calib_seed + i``: keep calibration seeds apart from
evaluation seeds), after the recipe's earlier steps, so the decoder is calibrated on the tokens it will see.
"""
from __future__ import annotations

import contextlib
import fnmatch
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..jobs import JobList
from ..models.vqvae import Upsample2x
from ..registry import register_step
from .conv import ACT_SPEC, Int8Conv2d, Int8Upsample2x, onednn_int8_conv_available
from .probe import MARGIN, probe_decoder

ACT_RANGES = ("minmax", "percentile", "mse")
SELECTS = ("rule", "probe")
MIN_REDUCTION = 2048
PROBE_BATCH = 1
CALIB_BATCH = 8
SAMPLE_CAP = 2 ** 18  # input values kept per convolution for the percentile / MSE rules


@dataclass
class DecoderInt8Config:
    """Run the VQ-VAE decoder's convolutions on int8 kernels (W8A8, static per-tensor input ranges).

    Args:
        calib_samples: generations whose decodes calibrate the input ranges (classes in turn).
        calib_seed: seed of the first of them (image i uses ``calib_seed + i``; keep it apart from evaluation).
        act_range: input range rule: "mse" (the percentile pair, 0.999 .. 1, with the lowest rounding error on
            a uniform sample of the inputs, as the transformer's static quantizers choose), "minmax" (the observed
            range) or "percentile" (``1 - percentile`` and ``percentile`` of that sample).
        percentile: for "percentile", in (0.5, 1].
        min_reduction: convert only convolutions with ``in_channels / groups * kh * kw`` at least this (0: all);
            the default keeps the memory-bound ones in float (see the module docstring).
        skip: decoder convolution names or glob patterns kept in float, e.g. ``["up.0.*", "conv_out"]``.
        select: how the convolutions are chosen: "rule" (``min_reduction``) or "probe" (each distinct convolution
            of the decoder timed on this machine, float vs int8, int8 where it is ``probe_margin`` faster; float
            everywhere where the CPU has no exact int8 kernel; timings cached per CPU, see
            :mod:`litevar.quant.probe`). With "probe", leave ``min_reduction`` at its default (it is not used).
        probe_batch: the decode batch the probe measures for ("probe" only); default 1, the cheapest to measure
            and the case where int8 gains least (a convolution faster at batch 1 is no slower at larger
            batches); set it to the batch you generate with to catch the convolutions that pay only there.
        probe_margin: "probe" only: int8 must be at least this much faster (0.05: its median time at most 95% of
            float's), in [0, 1).

    Example:
        >>> DecoderInt8Config(skip=["mid.*"]).skip
        ('mid.*',)
        >>> DecoderInt8Config(select="probe", probe_batch=8).probe_margin
        0.05
    """

    calib_samples: int = 8
    calib_seed: int = 100000
    act_range: str = "mse"
    percentile: float = 0.9999
    min_reduction: int = MIN_REDUCTION
    skip: tuple = ()
    select: str = "rule"
    probe_batch: int = PROBE_BATCH
    probe_margin: float = MARGIN

    def __post_init__(self) -> None:
        for key in ("calib_samples", "calib_seed", "min_reduction", "probe_batch"):
            value = getattr(self, key)
            low = 1 if key in ("calib_samples", "probe_batch") else 0
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{key} must be an integer >= {low}, got {value!r}")
        if self.act_range not in ACT_RANGES:
            raise ValueError(f"act_range must be one of {ACT_RANGES}, got {self.act_range!r}")
        if isinstance(self.percentile, bool) or not isinstance(self.percentile, (int, float)) \
                or not 0.5 < self.percentile <= 1:
            raise ValueError(f"percentile must be a number in (0.5, 1], got {self.percentile!r}")
        if isinstance(self.skip, str) or not isinstance(self.skip, (list, tuple)) \
                or not all(isinstance(p, str) for p in self.skip):
            raise ValueError(f"skip must be a list of convolution names or glob patterns, got {self.skip!r}")
        self.skip = tuple(self.skip)
        if self.select not in SELECTS:
            raise ValueError(f"select must be one of {SELECTS}, got {self.select!r}")
        if isinstance(self.probe_margin, bool) or not isinstance(self.probe_margin, (int, float)) \
                or not 0 <= self.probe_margin < 1:
            raise ValueError(f"probe_margin must be a number in [0, 1), got {self.probe_margin!r}")
        if self.select == "rule" and (self.probe_batch != PROBE_BATCH or self.probe_margin != MARGIN):
            raise ValueError("probe_batch and probe_margin apply to select 'probe' only: add \"select\": \"probe\" "
                             "or remove them")
        if self.select == "probe" and self.min_reduction != MIN_REDUCTION:
            raise ValueError("min_reduction is the rule's threshold, unused by select 'probe' (it measures): remove "
                             "min_reduction or use select 'rule'")


def reduction(conv: nn.Conv2d) -> int:
    """The dot-product length of a convolution: ``in_channels / groups * kh * kw``."""
    return conv.weight.shape[1] * conv.weight.shape[2] * conv.weight.shape[3]


def _candidates(decoder: nn.Module, config: DecoderInt8Config) -> dict[str, nn.Conv2d]:
    """The decoder's float convolutions outside ``skip``, in model order."""
    convs = {n: m for n, m in decoder.named_modules() if isinstance(m, nn.Conv2d)}
    unused = [p for p in config.skip if not any(fnmatch.fnmatchcase(n, p) for n in convs)]
    if unused:
        raise ValueError(f"skip patterns {unused} match no decoder convolution (names look like "
                         f"{next(iter(convs), 'conv_in')!r}; see `vae.decoder.named_modules()`)")
    return {n: m for n, m in convs.items() if not any(fnmatch.fnmatchcase(n, p) for p in config.skip)}


def select_convs(decoder: nn.Module, config: DecoderInt8Config) -> list[str]:
    """Names (relative to the decoder) of the float convolutions the rule converts, in model order (``select``
    "probe" chooses by measuring instead: :func:`selection`)."""
    return [n for n, m in _candidates(decoder, config).items() if reduction(m) >= config.min_reduction]


def selection(vae, config: DecoderInt8Config, **probe_kwargs) -> dict:
    """Which decoder convolutions ``config`` converts on this machine, and why: a report with ``chosen`` (names in
    model order) and ``convs`` (``{name: {"int8": bool, "why": str, ...}}``, every decoder convolution).

    Args:
        vae: the VQ-VAE, its decoder still float.
        config: see :class:`DecoderInt8Config`.
        probe_kwargs: passed to :func:`~litevar.quant.probe.probe_decoder` ("probe" only: ``cache_dir``,
            ``timer``, ``repeats``, ``use_cache``).

    Example:
        >>> selection(pipe.vae, DecoderInt8Config(select="probe"))["chosen"]  # doctest: +SKIP
        []
    """
    decoder = vae.decoder
    candidates = _candidates(decoder, config)
    skipped = {n: {"int8": False, "why": "skip"} for n, m in decoder.named_modules()
               if isinstance(m, nn.Conv2d) and n not in candidates}
    if config.select == "probe":
        report = probe_decoder(vae, config.probe_batch, config.probe_margin, names=list(candidates),
                               **probe_kwargs).to_dict()
        unused = {"int8": False, "why": "not run in a decode"}
        probed = report["convs"]
        report["convs"] = {n: probed.get(n, unused) for n in candidates} | skipped
        report["chosen"] = [n for n in candidates if report["convs"][n]["int8"]]  # model order
        return report
    convs = {}
    for name, conv in candidates.items():
        r = reduction(conv)
        convs[name] = {"int8": r >= config.min_reduction, "reduction": r,
                       "why": f"reduction {r} {'>=' if r >= config.min_reduction else '<'} {config.min_reduction}"}
    convs.update(skipped)
    return {"select": "rule", "min_reduction": config.min_reduction,
            "chosen": [n for n in candidates if convs[n]["int8"]], "convs": convs}


class _RangeRecorder:
    """Exact min/max of a convolution's inputs, and a uniform sample of the values (weighted reservoir:
    each call offers ``cap`` random values weighted by how many each stands for, so call sizes do not matter)."""

    def __init__(self, cap: int, generator: torch.Generator | None) -> None:
        self.lo, self.hi = float("inf"), float("-inf")
        self.cap, self.gen = cap, generator
        self.values = torch.empty(0)
        self.keys = torch.empty(0)

    def __call__(self, module, args) -> None:
        x = args[0].detach()
        lo, hi = torch.aminmax(x)
        self.lo, self.hi = min(self.lo, float(lo)), max(self.hi, float(hi))
        if self.gen is None:
            return
        channels_last = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)
        flat = (x.permute(0, 2, 3, 1) if channels_last else x).reshape(-1)  # a view, not a copy
        k = min(flat.numel(), self.cap)
        picks = flat[torch.randint(flat.numel(), (k,), generator=self.gen, device=flat.device)].float().cpu()
        # Efraimidis-Spirakis: key = u^(1/w) with w = numel / k values per pick; compared as log(u) / w
        keys = torch.rand(k, generator=self.gen, device=flat.device).log_().mul_(k / flat.numel()).cpu()
        keys, values = torch.cat((self.keys, keys)), torch.cat((self.values, picks))
        keep = torch.topk(keys, min(self.cap, len(keys))).indices
        self.keys, self.values = keys[keep], values[keep]

    def range(self, rule: str, percentile: float) -> tuple[float, float]:
        if self.lo > self.hi:
            raise RuntimeError("a convolution chosen for int8 saw no input during calibration")
        if rule == "minmax":
            return self.lo, self.hi
        if rule == "percentile":
            q = torch.quantile(self.values, torch.tensor([1 - percentile, percentile]))
            return float(q[0]), float(q[1])
        from .transform import choose_range

        return choose_range(self.values, ACT_SPEC)


@contextlib.contextmanager
def recording(decoder: nn.Module, names: Iterable[str], sample: bool, seed: int = 0) -> Iterator[dict]:
    """Record the inputs of the named decoder convolutions inside the ``with`` block: yields ``{name: recorder}``."""
    gen = torch.Generator().manual_seed(seed) if sample else None
    recorders, handles = {}, []
    try:
        for name in names:
            recorders[name] = _RangeRecorder(SAMPLE_CAP, gen)
            handles.append(decoder.get_submodule(name).register_forward_pre_hook(recorders[name]))
        yield recorders
    finally:
        for handle in handles:
            handle.remove()


def calibrate_decoder(vae, data: Iterable, names: Iterable[str] | None = None, act_range: str = "mse",
                      percentile: float = 0.9999, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Input ranges of decoder convolutions from decoding ``data``.

    Args:
        vae: the VQ-VAE (float decoder).
        data: batches, each an accumulated latent ``f_hat`` [B, C, h, w] or per-scale token indices
            (a list of [B, pn*pn] tensors, as ``pipe.generate(...).tokens``).
        names: decoder convolution names (default: every Conv2d of the decoder).
        act_range, percentile: see :class:`DecoderInt8Config`.
        seed: of the value sample (percentile / MSE rules).

    Example:
        >>> ranges = calibrate_decoder(pipe.vae, [pipe.generate([0, 1], seed=[7, 8]).tokens])  # doctest: +SKIP
    """
    if act_range not in ACT_RANGES:
        raise ValueError(f"act_range must be one of {ACT_RANGES}, got {act_range!r}")
    decoder = vae.decoder
    names = [n for n, m in decoder.named_modules() if isinstance(m, nn.Conv2d)] if names is None else list(names)
    with recording(decoder, names, act_range != "minmax", seed) as recorders:
        for batch in data:
            f_hat = vae.quantize.idx_to_fhat(batch) if isinstance(batch, (list, tuple)) else batch
            vae.fhat_to_img(f_hat)
    return {n: r.range(act_range, percentile) for n, r in recorders.items()}


@torch.no_grad()
def replace_decoder_convs(decoder: nn.Module, ranges: dict[str, tuple[float, float]]) -> None:
    """Swap each named Conv2d for an :class:`Int8Conv2d` with its input range (an upsampling convolution's
    ``Upsample2x`` becomes an :class:`Int8Upsample2x`).

    Args:
        decoder: the VQ-VAE decoder (in place).
        ranges: ``{conv name: (lo, hi)}``, e.g. from :func:`calibrate_decoder`.

    Example:
        >>> replace_decoder_convs(vae.decoder, {"mid.block_1.conv1": (-0.28, 6.1)})  # doctest: +SKIP
    """
    for name, (lo, hi) in ranges.items():
        module = Int8Conv2d.from_conv(decoder.get_submodule(name), lo, hi)
        owner, _, child = name.rpartition(".")
        if owner and child == "conv" and isinstance(decoder.get_submodule(owner), Upsample2x):
            decoder.set_submodule(owner, Int8Upsample2x(module))
        else:
            decoder.set_submodule(name, module)


def _calibration_ranges(pipe, names: list[str], config: DecoderInt8Config) -> dict[str, tuple[float, float]]:
    """Ranges from the decodes at the end of ``calib_samples`` real generations (the pipeline's own decode)."""
    jobs = JobList(range(pipe.num_classes), samples=config.calib_samples, seed=config.calib_seed)
    with recording(pipe.vae.decoder, names, config.act_range != "minmax", config.calib_seed) as recorders:
        for chunk in jobs.chunks(CALIB_BATCH):
            labels, seeds = jobs.batch(chunk)
            pipe.generate(labels, seed=seeds, progress=False)
    return {n: r.range(config.act_range, config.percentile) for n, r in recorders.items()}


def quantize_decoder_(pipe, config: DecoderInt8Config, skeleton: bool = False, names: list[str] | None = None,
                      **probe_kwargs) -> list[str]:
    """Convert the pipeline's decoder convolutions chosen by ``config`` to int8, in place; returns their names.
    The choice and its reasons (rule or probe timings) are kept as ``pipe.decoder_int8_report``.

    Args:
        pipe: a loaded :class:`litevar.Pipeline` (any earlier recipe steps applied).
        config: see :class:`DecoderInt8Config`.
        skeleton: only build the int8 modules (placeholder ranges, no calibration), to load a saved state.
        names: convert exactly these (e.g. the ones a saved model holds) instead of choosing; needed to restore
            a "probe" selection, which depends on the machine that made it.
        probe_kwargs: see :func:`selection`.

    Example:
        >>> quantize_decoder_(pipe, DecoderInt8Config(calib_samples=8))  # doctest: +SKIP
    """
    if names is not None:
        convs = {n for n, m in pipe.vae.decoder.named_modules() if isinstance(m, nn.Conv2d)}
        unknown = sorted(set(names) - convs)
        if unknown:
            raise ValueError(f"decoder-int8: {unknown} are not float convolutions of the decoder")
        names = [n for n, m in pipe.vae.decoder.named_modules() if n in set(names)]
        pipe.decoder_int8_report = {"select": "given", "chosen": names,
                                    "convs": {n: {"int8": n in names, "why": "given"} for n in convs}}
        if not names:
            return names
    elif skeleton and config.select == "probe":
        raise ValueError("decoder-int8 with select 'probe': a skeleton needs the names of the saved int8 "
                         "convolutions (the probe's choice depends on the machine that made it)")
    else:
        pipe.decoder_int8_report = selection(pipe.vae, config, **probe_kwargs)
        names = pipe.decoder_int8_report["chosen"]
    if not names:
        if config.select == "probe" and pipe.decoder_int8_report.get("gate"):
            warnings.warn(f"decoder-int8: the decoder stays in float: {pipe.decoder_int8_report['gate']}",
                          stacklevel=2)
        elif config.select == "probe":
            warnings.warn(f"decoder-int8: no decoder convolution measured faster on int8 by the margin "
                          f"({config.probe_margin}) at batch {config.probe_batch}; the decoder stays in float",
                          stacklevel=2)
        else:
            warnings.warn(f"decoder-int8: no decoder convolution has a reduction >= {config.min_reduction} outside "
                          f"skip {list(config.skip)}; the decoder stays in float (lower min_reduction to convert "
                          "more)", stacklevel=2)
        return names
    if not skeleton and not (pipe.device.type == "cpu" and onednn_int8_conv_available()):
        warnings.warn("decoder-int8: no oneDNN int8 convolution for this device/build; the int8 decoder runs as "
                      "an exact float emulation (same images, slower than float)", stacklevel=2)
    ranges = {n: (0.0, 1.0) for n in names} if skeleton else _calibration_ranges(pipe, names, config)
    replace_decoder_convs(pipe.vae.decoder, ranges)
    return names


register_step("decoder-int8", DecoderInt8Config, lambda pipe, config: quantize_decoder_(pipe, config), phase="decoder")

__all__ = ["DecoderInt8Config", "calibrate_decoder", "quantize_decoder_", "replace_decoder_convs", "select_convs",
           "selection"]
