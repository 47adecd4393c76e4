"""Model configurations: dataclasses with presets for the released VAR models.

Derived fields follow the VAR rule (head dim 64: ``width = 64 * depth``, ``heads = depth``) unless given.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PYRAMID_256 = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)
PYRAMID_512 = (1, 2, 3, 4, 6, 9, 13, 18, 24, 32)


class ConfigError(ValueError):
    """A model configuration that cannot describe a valid model."""


def _check_pyramid(patch_nums: tuple[int, ...], owner: str) -> None:
    if len(patch_nums) < 1 or any(not isinstance(p, int) or p < 1 for p in patch_nums):
        raise ConfigError(f"{owner}.patch_nums must be positive integers, got {patch_nums}")
    if list(patch_nums) != sorted(set(patch_nums)):
        raise ConfigError(f"{owner}.patch_nums must be strictly increasing, got {patch_nums}")


@dataclass
class VQVAEConfig:
    """Multi-scale residual VQ-VAE.

    Args:
        vocab_size: codebook entries.
        z_channels: latent channels (codebook vector size).
        ch: base channel count of encoder/decoder.
        ch_mult: channel multiplier per resolution level; ``2**(len-1)`` is the downsampling factor.
        num_res_blocks: residual blocks per encoder level (the decoder has one more).
        share_quant_resi: number of partially shared Phi convs (0: one per scale, 1: fully shared).
        quant_resi: Phi mixing ratio, ``Phi(h) = (1-r) h + r conv(h)``.
        quant_conv_ks: kernel size of ``quant_conv``/``post_quant_conv`` (the Phi convs are 3x3).
        using_sa: self-attention at the lowest resolution level.
        using_mid_sa: self-attention in the middle block.
        patch_nums: token pyramid (side of each scale); the last equals the latent side.

    Example:
        >>> VQVAEConfig(ch=32, vocab_size=64, z_channels=8, patch_nums=(1, 2, 3, 4, 6)).image_size
        96
    """

    vocab_size: int = 4096
    z_channels: int = 32
    ch: int = 160
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    share_quant_resi: int = 4
    quant_resi: float = 0.5
    quant_conv_ks: int = 3
    using_sa: bool = True
    using_mid_sa: bool = True
    in_channels: int = 3
    patch_nums: tuple[int, ...] = PYRAMID_256

    def __post_init__(self) -> None:
        self.ch_mult = tuple(self.ch_mult)
        self.patch_nums = tuple(self.patch_nums)
        _check_pyramid(self.patch_nums, "vae")
        if self.ch < 32 or self.ch % 32:
            raise ConfigError(f"vae.ch must be a positive multiple of 32 (GroupNorm uses 32 groups), got {self.ch}")
        if self.vocab_size < 2 or self.z_channels < 1 or self.num_res_blocks < 1 or not self.ch_mult:
            raise ConfigError("vae.vocab_size >= 2, z_channels >= 1, num_res_blocks >= 1 and a non-empty ch_mult are required")
        if self.share_quant_resi < 0:
            raise ConfigError(f"vae.share_quant_resi must be >= 0, got {self.share_quant_resi}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.patch_nums[-1] * self.downsample


@dataclass
class VARConfig:
    """VAR transformer (AdaLN blocks, block-causal next-scale prediction).

    Args:
        depth: number of blocks.
        width: embedding width C (default ``64 * depth``).
        heads: attention heads (default ``depth``).
        mlp_ratio: FFN hidden width over C.
        norm_eps: LayerNorm epsilon.
        shared_aln: one AdaLN projection shared by all blocks (d36) plus per-block ``ada_gss``.
        attn_l2_norm: l2-normalised q/k with a learned per-head scale (all current checkpoints).
        num_classes: class count; index ``num_classes`` is the unconditional (null) class.
        patch_nums: token pyramid.
        vocab_size: VQ-VAE codebook size (logit width).
        z_channels: VQ-VAE latent channels (token feature size).

    Example:
        >>> VARConfig(depth=16).width, VARConfig(depth=16).heads
        (1024, 16)
    """

    depth: int = 16
    width: int | None = None
    heads: int | None = None
    mlp_ratio: float = 4.0
    norm_eps: float = 1e-6
    shared_aln: bool = False
    attn_l2_norm: bool = True
    num_classes: int = 1000
    patch_nums: tuple[int, ...] = PYRAMID_256
    vocab_size: int = 4096
    z_channels: int = 32

    def __post_init__(self) -> None:
        if self.depth < 1:
            raise ConfigError(f"var.depth must be >= 1, got {self.depth}")
        self.width = 64 * self.depth if self.width is None else self.width
        self.heads = self.depth if self.heads is None else self.heads
        self.patch_nums = tuple(self.patch_nums)
        _check_pyramid(self.patch_nums, "var")
        if self.heads < 1 or self.width % self.heads:
            raise ConfigError(f"var.width ({self.width}) must be divisible by var.heads ({self.heads})")
        if self.num_classes < 1 or self.vocab_size < 2 or self.z_channels < 1 or self.mlp_ratio <= 0:
            raise ConfigError("var.num_classes >= 1, vocab_size >= 2, z_channels >= 1 and mlp_ratio > 0 are required")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def hidden(self) -> int:
        return round(self.width * self.mlp_ratio)

    @property
    def seq_len(self) -> int:
        return sum(pn * pn for pn in self.patch_nums)


@dataclass
class MVARConfig(VARConfig):
    """M-VAR (arXiv 2411.10433): VAR's embeddings and head, blocks of intra-scale attention, Mamba-2 and FFN.

    Args:
        (VARConfig's fields), and the Mamba-2 layer's:
        d_state: SSM state size N.
        d_conv: the causal conv's width.
        expand: Mamba-2's inner width over C.
        headdim: Mamba-2's head size P (heads = expand * C / P).

    Example:
        >>> MVARConfig(depth=16, attn_l2_norm=False).mamba_heads
        32
    """

    d_state: int = 64
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.d_state, self.d_conv, self.expand, self.headdim) < 1:
            raise ConfigError("mvar.d_state, d_conv, expand and headdim must be >= 1")
        if (self.expand * self.width) % self.headdim:
            raise ConfigError(f"mvar: expand * width ({self.expand * self.width}) must be a multiple of headdim "
                              f"({self.headdim})")
        if self.shared_aln:
            raise ConfigError("mvar.shared_aln is not supported (upstream's shared-AdaLN path is broken)")

    @property
    def mamba_heads(self) -> int:
        return self.expand * self.width // self.headdim


@dataclass
class PipelineConfig:
    """A VAR transformer and its VQ-VAE tokenizer (their pyramids and codebooks must agree)."""

    var: VARConfig = field(default_factory=VARConfig)
    vae: VQVAEConfig = field(default_factory=VQVAEConfig)

    def __post_init__(self) -> None:
        if self.var.patch_nums != self.vae.patch_nums:
            raise ConfigError(f"var.patch_nums {self.var.patch_nums} differ from vae.patch_nums {self.vae.patch_nums}")
        if (self.var.vocab_size, self.var.z_channels) != (self.vae.vocab_size, self.vae.z_channels):
            raise ConfigError(
                f"VAR expects vocab {self.var.vocab_size} x {self.var.z_channels} channels but the VQ-VAE has "
                f"{self.vae.vocab_size} x {self.vae.z_channels}")

    @property
    def arch(self) -> str:
        """``"mvar"`` for an M-VAR transformer, ``"var"`` for VAR."""
        return "mvar" if isinstance(self.var, MVARConfig) else "var"

    def to_dict(self) -> dict[str, Any]:
        return {self.arch: dataclasses.asdict(self.var), "vae": dataclasses.asdict(self.vae)}


PRESETS: dict[str, PipelineConfig] = {
    "d16": PipelineConfig(VARConfig(depth=16)),
    "d20": PipelineConfig(VARConfig(depth=20)),
    "d24": PipelineConfig(VARConfig(depth=24)),
    "d30": PipelineConfig(VARConfig(depth=30)),
    "d36": PipelineConfig(VARConfig(depth=36, shared_aln=True, patch_nums=PYRAMID_512),
                          VQVAEConfig(patch_nums=PYRAMID_512)),
}


# upstream's README: the small M-VARs (d16, d20) were trained with attn_l2_norm=False
MVAR_PRESETS: dict[str, PipelineConfig] = {
    f"d{depth}": PipelineConfig(MVARConfig(depth=depth, attn_l2_norm=depth > 20)) for depth in (16, 20, 24, 32)}


def from_name(name: str) -> PipelineConfig:
    """The configuration of a released model: ``"d16"`` ... ``"d36"`` (``"var-d16"`` also accepted), or an M-VAR
    ``"mvar-d16"`` ... ``"mvar-d32"``."""
    presets, key = PRESETS, name.removeprefix("var-").removeprefix("var_")
    if name.startswith(("mvar-", "mvar_")):
        presets, key = MVAR_PRESETS, name[5:]
    if key not in presets:
        known = [f"var-{k}" for k in PRESETS] + [f"mvar-{k}" for k in MVAR_PRESETS]
        raise ConfigError(f"unknown model {name!r}; known: {', '.join(known)}")
    preset = presets[key]
    return PipelineConfig(dataclasses.replace(preset.var), dataclasses.replace(preset.vae))


# upstream constructor keyword -> our field name
_UPSTREAM_VAR_KEYS = {"embed_dim": "width", "num_heads": "heads"}
_UPSTREAM_VAE_KEYS = {"v_patch_nums": "patch_nums"}
_IGNORED_UPSTREAM_KEYS = {"drop_rate", "attn_drop_rate", "drop_path_rate", "cond_drop_rate", "flash_if_available",
                          "fused_if_available", "dropout", "beta", "using_znorm", "test_mode", "default_qresi_counts"}


def _build(cls: type, raw: dict[str, Any], renames: dict[str, str], owner: str) -> Any:
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        name = renames.get(key, key)
        if key in _IGNORED_UPSTREAM_KEYS:
            continue
        if name not in names:
            raise ConfigError(f"unknown {owner} config key {key!r}; known: {', '.join(sorted(names))}")
        kwargs[name] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def config_from_dict(raw: dict[str, Any]) -> PipelineConfig:
    """Build a :class:`PipelineConfig` from ``{"var": {...}, "vae": {...}}``.

    Accepts litevar field names and the upstream constructor keywords (``embed_dim``, ``num_heads``,
    ``v_patch_nums``). The VAR's vocabulary and latent size are taken from the VQ-VAE section when absent.

    Example:
        >>> config_from_dict({"var": {"depth": 2, "embed_dim": 128, "num_heads": 2, "patch_nums": [1, 2]},
        ...                   "vae": {"ch": 32, "vocab_size": 64, "z_channels": 8, "v_patch_nums": [1, 2]}}).var.width
        128
    """
    if isinstance(raw, dict) and "mvar" in raw:
        return _mvar_config_from_dict(raw)
    if not isinstance(raw, dict) or set(raw) - {"var", "vae"} or "var" not in raw:
        raise ConfigError('a config must be a dict {"var": {...}, "vae": {...}} (or {"mvar": {...}, "vae": {...}})')
    vae = _build(VQVAEConfig, raw.get("vae", {}), _UPSTREAM_VAE_KEYS, "vae")
    return _with_vae(VARConfig, dict(raw["var"]), raw, vae)


# upstream's Mamba2 arguments that M-VAR must have at these values (litevar implements only these)
_MAMBA2_FIXED = {"ngroups": 1, "D_has_hdim": False, "rmsnorm": True, "norm_before_gate": False, "bias": False,
                 "conv_bias": True}
_MAMBA2_INIT_ONLY = {"A_init_range", "dt_min", "dt_max", "dt_init_floor", "chunk_size", "dt_limit"}


def _mvar_config_from_dict(raw: dict[str, Any]) -> PipelineConfig:
    """``{"mvar": {...}, "vae": {...}}`` with an optional upstream ``"mamba2": {...}`` section."""
    if set(raw) - {"mvar", "vae", "mamba2"}:
        raise ConfigError(f'an M-VAR config has the sections "mvar", "vae" and "mamba2", got {sorted(raw)}')
    vae = _build(VQVAEConfig, raw.get("vae", {}), _UPSTREAM_VAE_KEYS, "vae")
    var_raw = dict(raw["mvar"])
    for key, value in (raw.get("mamba2") or {}).items():
        if key in _MAMBA2_FIXED:
            if value != _MAMBA2_FIXED[key]:
                raise ConfigError(f"mamba2.{key}={value!r} is not supported (litevar's Mamba-2 has "
                                  f"{key}={_MAMBA2_FIXED[key]!r})")
        elif key not in _MAMBA2_INIT_ONLY:
            var_raw[key] = value
    return _with_vae(MVARConfig, var_raw, raw, vae)


def _with_vae(cls: type, var_raw: dict[str, Any], raw: dict[str, Any], vae: VQVAEConfig) -> PipelineConfig:
    var_raw.setdefault("vocab_size", vae.vocab_size)
    var_raw.setdefault("z_channels", vae.z_channels)
    if "vae" not in raw or not any(k in raw["vae"] for k in ("patch_nums", "v_patch_nums")):
        vae.patch_nums = tuple(var_raw.get("patch_nums", vae.patch_nums))
    var = _build(cls, var_raw, _UPSTREAM_VAR_KEYS, "mvar" if cls is MVARConfig else "var")
    return PipelineConfig(var, vae)


def load_config(source: str | Path | dict[str, Any]) -> PipelineConfig:
    """A config from a dict, a JSON file path, or a preset name (``"var-d16"``)."""
    if isinstance(source, PipelineConfig):
        return source
    if isinstance(source, dict):
        return config_from_dict(source)
    path = Path(source)
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass a JSON file, a dict or a preset name")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"config file {path} is not valid JSON ({err})") from None
        return config_from_dict(raw)
    return from_name(str(source))


def pyramid_from_lengths(counts: list[int]) -> tuple[int, ...]:
    """Pyramid sides from the token count of each scale (each must be a perfect square)."""
    sides = []
    for count in counts:
        side = math.isqrt(count)
        if side * side != count:
            raise ConfigError(f"scale with {count} tokens is not a square token map")
        sides.append(side)
    return tuple(sides)
