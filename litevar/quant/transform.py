"""``quantize_(pipe, config)``: quantization as a model transform, one handler per config type.

Every method is a config dataclass (subclass of :class:`QuantConfig`) plus a handler registered with
:func:`register_method`; the handler computes input transforms (shift/scale/rotation) from calibration data,
folds what folds, and hands the layers to :func:`replace_linears`. Configs are also recipe steps.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from .calibrate import InputStats, collect_input_stats
from .groups import TokenGroups
from .layers import LAYER_TYPES, MAMBA_TYPES, check_layer_types, layer_type, linear_layers
from .modules import ActQuantizer, QuantLinear, hadamard
from .primitives import QuantSpec, fake_quant

ACTIVATIONS = ("dynamic", "static", "stwq")
EXECUTIONS = ("fake", "int8")
# PTQ4ARVG's static token groups per layer type (STWQ): 10 for qkv/fc1, token 0 vs rest for proj/fc2.
STWQ_GROUPING = {"mat_qkv": "scale", "fc1": "scale", "proj": "first", "fc2": "first"}
PERCENTILES = (0.999, 0.9999, 0.99999, 1.0)


def _check_bits(bits, key: str) -> None:
    try:
        QuantSpec(bits)
    except ValueError as err:
        raise ValueError(f"{key}: {err}") from None


@dataclass
class QuantConfig:
    """Settings shared by every method.

    Args:
        w_bits: weight bits (2-8), per output channel (or per group with ``w_group_size``).
        a_bits: activation bits (2-8), or None for weight-only quantization.
        w_symmetric, a_symmetric: symmetric grids (else asymmetric with a zero point).
        w_group_size: quantize weights in groups of this many input channels.
        activations: "dynamic" (per token at run time), "static" (calibrated, per tensor) or "stwq"
            (calibrated per token group: PTQ4ARVG's static token-wise quantization).
        layers: layer types to quantize (see ``litevar.quant.layers.LAYER_TYPES``).
        keep: layer types kept in 16 bit (mixed precision). On an M-VAR, Mamba-2's ``in_proj`` and ``out_proj`` are
            quantized with the other layers unless kept here.
        overrides: ``{layer_type: [w_bits, a_bits]}`` for some types (sensitivity studies).
        calib_samples, calib_seed: calibration generations (classes in turn; seeds kept apart from evaluation).
        rows_per_group: input rows sampled per (layer, scale, CFG half) during calibration.
        execution: "fake" (simulate any bit width) or "int8" (run W8A8 / weight-only on integer kernels).
        attn_bits: quantize the attention's QK^T and PV inputs to this many bits (LiteVAR's scheme, simulated;
            see :mod:`litevar.quant.attention`), or None to keep attention in the model's precision.
    """

    w_bits: int = 8
    a_bits: int | None = 8
    w_symmetric: bool = False
    a_symmetric: bool = False
    w_group_size: int | None = None
    activations: str = "dynamic"
    layers: tuple = ("mat_qkv", "proj", "fc1", "fc2", "ada_lin", "head")
    keep: tuple = ()
    overrides: dict = field(default_factory=dict)
    calib_samples: int = 32
    calib_seed: int = 100000
    rows_per_group: int = 256
    execution: str = "fake"
    attn_bits: int | None = None

    online_rotation: ClassVar[bool] = False  # a Hadamard rotation of the inputs at run time (no int8 kernel)

    def __post_init__(self) -> None:
        _check_bits(self.w_bits, "w_bits")
        if self.a_bits is not None:
            _check_bits(self.a_bits, "a_bits")
        if self.attn_bits is not None:
            _check_bits(self.attn_bits, "attn_bits")
        if self.activations not in ACTIVATIONS:
            raise ValueError(f"activations must be one of {ACTIVATIONS}, got {self.activations!r}")
        if self.execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS}, got {self.execution!r}")
        self.layers = check_layer_types(self.layers, "layers")
        self.keep = check_layer_types(self.keep, "keep")
        if not isinstance(self.overrides, dict):
            raise ValueError(f"overrides must map layer types to [w_bits, a_bits], got {self.overrides!r}")
        check_layer_types(self.overrides, "overrides")
        ignored = sorted(k for k in self.overrides if k not in self.targets())
        if ignored:
            raise ValueError(f"overrides {ignored} name layer types that are not quantized (not in layers, or in keep)")
        for kind, bits in self.overrides.items():
            if not isinstance(bits, (list, tuple)) or len(bits) != 2:
                raise ValueError(f"overrides[{kind!r}] must be [w_bits, a_bits], got {bits!r}")
            _check_bits(bits[0], f"overrides[{kind!r}] w_bits")
            if bits[1] is not None:
                _check_bits(bits[1], f"overrides[{kind!r}] a_bits")
        for key in ("calib_samples", "calib_seed", "rows_per_group"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{key} must be an integer, got {value!r}")
        if self.calib_samples < 1 or self.rows_per_group < 1:
            raise ValueError("calib_samples and rows_per_group must be >= 1")

    @property
    def needs_calibration(self) -> bool:
        return self.activations != "dynamic"

    def targets(self) -> tuple[str, ...]:
        return tuple(t for t in self.layers if t not in self.keep)

    def bits(self, kind: str) -> tuple[int, int | None]:
        w, a = self.overrides.get(kind, (self.w_bits, self.a_bits))
        return w, a


_METHODS: dict[type, Callable] = {}


def register_method(config_cls: type, handler: Callable, recipe_name: str) -> None:
    """Register ``handler(pipe, config)`` for a :class:`QuantConfig` subclass and make it a recipe step."""
    from ..registry import register_step

    if not issubclass(config_cls, QuantConfig):
        raise TypeError(f"{config_cls.__name__} must subclass QuantConfig")
    _METHODS[config_cls] = handler
    register_step(recipe_name, config_cls, lambda pipe, cfg: quantize_(pipe, cfg))


def quantize_(pipe, config: QuantConfig, filter_fn: Callable[[str, torch.nn.Module], bool] | None = None,
              skeleton: bool = False) -> None:
    """Quantize ``pipe.var`` in place with the method of ``config``'s type.

    Args:
        pipe: a loaded :class:`litevar.Pipeline`.
        config: a registered method config, e.g. ``RTNConfig(w_bits=8, a_bits=8)``.
        filter_fn: ``(name, module) -> bool`` to restrict further which Linears are quantized.
        skeleton: only build the quantized modules (no calibration, placeholder ranges), to load a saved state.

    Example:
        >>> from litevar.quant.methods import RTNConfig
        >>> quantize_(pipe, RTNConfig(w_bits=8, a_bits=8))  # doctest: +SKIP
    """
    handler = _METHODS.get(type(config))
    if handler is None:
        raise TypeError(f"no quantization method is registered for {type(config).__name__}")
    if config.execution == "int8":
        from .runtime import check_int8_execution

        check_int8_execution(config)
    pipe.identity()  # taken from the weights as loaded, before this step changes them
    if skeleton:
        replace_linears(pipe, config, targets(pipe, config, filter_fn), rotate=config.online_rotation)
    else:
        handler(pipe, config, filter_fn)
    if config.attn_bits is not None:  # after calibration: the Linears were calibrated on float attention
        from .attention import AttnPrecision

        pipe.set_attention("precision", AttnPrecision(config.attn_bits), by=_step_name(config))


def _step_name(config: QuantConfig) -> str:
    from ..registry import STEPS

    return next((name for name, s in STEPS.items() if type(config) is s.config_cls), type(config).__name__)


def targets(pipe, config: QuantConfig, filter_fn=None) -> dict[str, torch.nn.Module]:
    """The Linears a config quantizes: its target types, and on an M-VAR also Mamba-2's ``in_proj``/``out_proj``
    unless they are in ``keep`` (they hold about a third of an M-VAR block's weights)."""
    types = config.targets()
    if getattr(pipe.config, "arch", "var") == "mvar":
        types = types + tuple(t for t in MAMBA_TYPES if t not in types and t not in config.keep)
    layers = linear_layers(pipe.var, types)
    return {n: m for n, m in layers.items() if filter_fn is None or filter_fn(n, m)}


def calibrate(pipe, config: QuantConfig, names) -> dict[str, InputStats]:
    types = {layer_type(n) for n in names}
    stats = collect_input_stats(pipe, types, samples=config.calib_samples, seed=config.calib_seed,
                                rows_per_group=config.rows_per_group, progress=False)
    return {n: s for n, s in stats.items() if n in names}


def choose_range(rows: torch.Tensor, spec: QuantSpec) -> tuple[float, float]:
    """Clipping range of a static per-tensor quantizer: the percentile pair (0.999 .. 1.0) with the lowest MSE
    on the calibration rows (PTQ4ARVG's observer)."""
    values = rows.flatten().float()
    if values.numel() > 2 ** 24:
        values = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:2 ** 24]]
    # torch.quantile's linear interpolation read off the two tails: quantile sorted all the values at every call
    # (most of a calibrated build's time), while every percentile here lies in the outer 0.1% of either end.
    n = values.numel()
    ranks = {p: (torch.tensor(1 - p, dtype=torch.float32) * (n - 1), torch.tensor(p, dtype=torch.float32) * (n - 1))
             for p in PERCENTILES}
    k_low = max(int(low.ceil()) for low, _ in ranks.values()) + 1
    first_high = min(int(high) for _, high in ranks.values())
    tails = (torch.topk(values, k_low, largest=False).values, torch.topk(values, n - first_high).values.flip(0))

    def sorted_at(rank: torch.Tensor, tail: int) -> float:
        first = (0, first_high)[tail]
        below, above = rank.long(), rank.ceil().long()
        return float(torch.lerp(tails[tail][below - first], tails[tail][above - first], rank - below))

    best, best_err = None, float("inf")
    for p in PERCENTILES:
        lo, hi = sorted_at(ranks[p][0], 0), sorted_at(ranks[p][1], 1)
        approx = fake_quant(rows, spec, torch.tensor(lo), torch.tensor(hi))
        err = float((approx - rows).pow(2).mean())
        if err < best_err:
            best, best_err = (lo, hi), err
    return best


def _grouping(config: QuantConfig, kind: str) -> str:
    if config.activations == "stwq":
        return STWQ_GROUPING.get(kind, "tensor")
    return "tensor"


def _act_quantizer(config: QuantConfig, kind: str, a_bits: int, patch_nums, stats: InputStats | None,
                   transform: Callable[[torch.Tensor], torch.Tensor], cond_share: float | None) -> ActQuantizer:
    if config.activations == "dynamic":
        return ActQuantizer(QuantSpec(a_bits, config.a_symmetric, "token"))
    spec = QuantSpec(a_bits, config.a_symmetric, "tensor")
    groups = TokenGroups(patch_nums, _grouping(config, kind))
    quantizer = ActQuantizer(spec, groups)
    if stats is None:  # a structure to load a saved state into
        return quantizer
    lo, hi = torch.zeros(groups.n_groups), torch.zeros(groups.n_groups)
    scale_groups = groups.group_of_pos.new_zeros(len(patch_nums))
    for s, p in enumerate(patch_nums):
        scale_groups[s] = groups.ids(p * p)[0]
    for g in range(groups.n_groups):
        members = (scale_groups == g).nonzero().flatten().tolist()
        rows = transform(stats.sample(members, cond_share))
        lo[g], hi[g] = choose_range(rows, spec)
    quantizer.set_ranges(lo, hi)
    return quantizer


@torch.no_grad()
def replace_linears(pipe, config: QuantConfig, layers: dict[str, torch.nn.Module],
                    stats: dict[str, InputStats] | None = None, rotate: bool = False,
                    cond_share: float | None = None) -> None:
    """Swap each Linear for a :class:`QuantLinear` (or an int8 runtime module with ``execution="int8"``).

    Static activation ranges are chosen on the calibration rows after the input transforms the layers already
    carry (folded shifts/scales are in ``stats`` via ``transforms``; an online rotation is applied here).
    """
    var = pipe.var
    for name, linear in layers.items():
        kind = layer_type(name)
        w_bits, a_bits = config.bits(kind)
        w_spec = QuantSpec(w_bits, config.w_symmetric, "group" if config.w_group_size else "channel",
                           config.w_group_size)
        weight = hadamard(linear.weight.float()).to(linear.weight.dtype) if rotate else linear.weight
        transform = hadamard if rotate else (lambda rows: rows)
        act = None
        if a_bits is not None:
            act = _act_quantizer(config, kind, a_bits, var.cfg.patch_nums, None if stats is None else stats[name],
                                 transform, cond_share)
        module = QuantLinear(weight, linear.bias, w_spec, act, rotate=rotate)
        if config.execution == "int8":
            from .runtime import to_runtime

            module = to_runtime(module)
        var.set_submodule(name, module)
    if config.execution == "int8":
        from .fusions import install_int8_fusions

        install_int8_fusions(var)


def fold_transforms(pipe, stats: dict[str, InputStats], transforms: dict[str, tuple]) -> None:
    """Fold ``{name: (shift, scale)}`` into the AdaLNs and weights and update the calibration rows to match."""
    from .layers import absorb_input_transform

    for name, (shift, scale) in transforms.items():
        absorb_input_transform(pipe.var, name, shift, scale)
        stats[name] = transformed_stats(stats[name], shift, scale)


def transformed_stats(stats: InputStats, shift: torch.Tensor | None, scale: torch.Tensor | None) -> InputStats:
    """The statistics of ``(X - shift) / scale`` (exact for rows and, with a positive scale, for min/max)."""
    K = stats.lo.shape[-1]
    shift = torch.zeros(K) if shift is None else shift.float()
    scale = torch.ones(K) if scale is None else scale.float()
    rows = [[(r - shift) / scale for r in half] for half in stats.rows]
    return dataclasses.replace(stats, lo=(stats.lo - shift) / scale, hi=(stats.hi - shift) / scale, rows=rows)


__all__ = ["QuantConfig", "quantize_", "register_method", "replace_linears", "fold_transforms", "LAYER_TYPES"]
