"""Checkpoint files: safe reading, strict key checks with helpful errors, config inference, hub names."""
from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path

import torch
import torch.nn as nn

from ..files import error_cause
from .configs import (MVAR_PRESETS, PRESETS, ConfigError, MVARConfig, PipelineConfig, VARConfig, VQVAEConfig,
                      from_name, pyramid_from_lengths)

HUB_REPO = "FoundationVision/var"
HUB_VAE_FILE = "vae_ch160v4096z32.pth"
MVAR_HUB_REPO = "OliverRen/M-VAR"
MAMBA_KEY = "blocks.0.mamba.in_proj.weight"
MAX_LISTED_KEYS = 10
MAX_SCALES = 64  # bounds what a corrupt lvl_1L can make torch.bincount allocate


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read or does not fit the model."""


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from ``.safetensors`` or a ``torch.save`` file without executing pickled code."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist; pass the path of a .pth or .safetensors file")
    try:
        with warnings.catch_warnings():
            # Garbage read as a pickle names a random protocol; the error below says all there is to say.
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            if path.suffix == ".safetensors":
                from safetensors.torch import load_file
                state = load_file(str(path))
            else:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as err:  # noqa: BLE001 - the parse boundary: the unpickler also raises IndexError, KeyError...
        text = str(err).strip()
        if "weights_only" in text or not text:
            reason = "truncated, corrupted, or holding objects other than tensors, which litevar never unpickles"
        else:
            reason = error_cause(err)
        raise CheckpointError(f"{path} is not a readable checkpoint ({reason}); re-download it or re-save its "
                              "state_dict") from None
    if (not isinstance(state, dict) or not state or not all(isinstance(k, str) for k in state)
            or not all(isinstance(v, torch.Tensor) for v in state.values())):
        raise CheckpointError(f"{path} does not hold a state_dict (a flat dict of tensors); save model.state_dict()")
    return state


def _depth(state: dict[str, torch.Tensor]) -> int:
    indices = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    return max(indices) + 1 if indices else 0


def infer_var_config(state: dict[str, torch.Tensor]) -> VARConfig:
    """The VAR configuration a state_dict was saved from (raises CheckpointError if it is not a VAR)."""
    needed = ("word_embed.weight", "class_emb.weight", "lvl_1L", "head.weight", "blocks.0.ffn.fc1.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise CheckpointError(f"not a VAR transformer checkpoint: missing {', '.join(missing)}{describe(state)}")
    try:
        width, z_channels = state["word_embed.weight"].shape
        scale_key = "blocks.0.attn.scale_mul_1H11"
        l2 = scale_key in state
        levels = state["lvl_1L"].flatten().long()
        if not levels.numel() or int(levels.min()) < 0 or int(levels.max()) >= MAX_SCALES:
            raise ValueError(f"lvl_1L must hold scale indices 0..{MAX_SCALES - 1}")
        counts = torch.bincount(levels).tolist()
        fields = dict(
            depth=_depth(state), width=width, heads=state[scale_key].shape[1] if l2 else max(width // 64, 1),
            mlp_ratio=state["blocks.0.ffn.fc1.weight"].shape[0] / width, shared_aln="shared_ada_lin.1.weight" in state,
            attn_l2_norm=l2, num_classes=state["class_emb.weight"].shape[0] - 1,
            patch_nums=pyramid_from_lengths(counts), vocab_size=state["head.weight"].shape[0], z_channels=z_channels)
        if MAMBA_KEY in state:
            return MVARConfig(**fields, **_mamba_fields(state, width))
        return VARConfig(**fields)
    except ConfigError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, RuntimeError, ZeroDivisionError) as err:
        raise CheckpointError(f"a VAR transformer checkpoint with malformed tensors: its configuration cannot be "
                              f"inferred ({error_cause(err)}); pass its config, or re-save its state_dict") from None


def _mamba_fields(state: dict[str, torch.Tensor], width: int) -> dict[str, int]:
    """Mamba-2 sizes from ``blocks.0.mamba.*``: d_inner from the norm, N from the conv channels, P from the heads."""
    d_inner = state["blocks.0.mamba.norm.weight"].shape[0]
    conv_channels, _, d_conv = state["blocks.0.mamba.conv1d.weight"].shape
    heads = state["blocks.0.mamba.dt_bias"].shape[0]
    if d_inner % width or d_inner % heads or (conv_channels - d_inner) % 2:
        raise ValueError(f"Mamba-2 sizes do not fit together (d_inner {d_inner}, {conv_channels} conv channels, "
                         f"{heads} heads, width {width})")
    return dict(d_state=(conv_channels - d_inner) // 2, d_conv=d_conv, expand=d_inner // width,
                headdim=d_inner // heads)


def architecture(state: dict[str, torch.Tensor]) -> str:
    """``"M-VAR"`` for a state_dict with Mamba-2 blocks, ``"VAR"`` otherwise."""
    return "M-VAR" if any(".mamba." in k for k in state) else "VAR"


def infer_vae_config(state: dict[str, torch.Tensor], patch_nums: tuple[int, ...] | None = None) -> VQVAEConfig:
    """The VQ-VAE configuration of a state_dict; the pyramid comes from the VAR (default: 256px pyramid)."""
    needed = ("encoder.conv_in.weight", "quantize.embedding.weight", "quant_conv.weight", "decoder.conv_out.weight")
    missing = [k for k in needed if k not in state]
    if missing:
        raise CheckpointError(f"not a VQ-VAE checkpoint: missing {', '.join(missing)}{describe(state)}")
    try:
        return _vae_config(state, patch_nums)
    except ConfigError:
        raise
    except (ValueError, TypeError, IndexError, KeyError, RuntimeError, ZeroDivisionError) as err:
        raise CheckpointError(f"a VQ-VAE checkpoint with malformed tensors: its configuration cannot be inferred "
                              f"({error_cause(err)}); pass its config, or re-save its state_dict") from None


def _vae_config(state: dict[str, torch.Tensor], patch_nums: tuple[int, ...] | None) -> VQVAEConfig:
    ch = state["encoder.conv_in.weight"].shape[0]
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    ch_mult = tuple(state[f"encoder.down.{i}.block.0.conv2.weight"].shape[0] // ch for i in levels)
    res_blocks = len({k.split(".")[4] for k in state if k.startswith("encoder.down.0.block.")})
    if any(k.startswith("quantize.quant_resi.qresi_ls.") for k in state):
        share = len({k.split(".")[3] for k in state if k.startswith("quantize.quant_resi.qresi_ls.")})
    elif any(k.startswith("quantize.quant_resi.qresi.") for k in state):
        share = 1
    else:
        share = 0
    vocab, z = state["quantize.embedding.weight"].shape
    last = len(ch_mult) - 1
    kwargs = dict(vocab_size=vocab, z_channels=z, ch=ch, ch_mult=ch_mult, num_res_blocks=res_blocks,
                  share_quant_resi=share, quant_conv_ks=state["quant_conv.weight"].shape[-1],
                  using_sa=f"encoder.down.{last}.attn.0.qkv.weight" in state,
                  using_mid_sa="encoder.mid.attn_1.qkv.weight" in state,
                  in_channels=state["encoder.conv_in.weight"].shape[1])
    if patch_nums is not None:
        kwargs["patch_nums"] = patch_nums
    return VQVAEConfig(**kwargs)


def describe(state: dict[str, torch.Tensor]) -> str:
    """A guess of what a state_dict is, for error messages (starts with '; ' or is empty)."""
    try:
        var = infer_var_config(state) if "word_embed.weight" in state else None
    except (CheckpointError, ConfigError, KeyError, IndexError, RuntimeError):
        var = None
    if var is not None:
        mvar = isinstance(var, MVARConfig)
        arch = "an M-VAR" if mvar else "a VAR"
        for name, preset in (MVAR_PRESETS if mvar else PRESETS).items():
            if (preset.var.depth, preset.var.width) == (var.depth, var.width):
                return f"; it looks like {arch} {name} checkpoint (depth {var.depth}, width {var.width})"
        return f"; it looks like {arch} with depth {var.depth}, width {var.width}, {var.heads} heads"
    if "quantize.embedding.weight" in state:
        vocab, z = state["quantize.embedding.weight"].shape
        return f"; it looks like a VQ-VAE checkpoint (vocab {vocab}, {z} latent channels)"
    return ""


def _listed(keys: list[str]) -> str:
    shown = ", ".join(keys[:MAX_LISTED_KEYS])
    return shown + (f" (+{len(keys) - MAX_LISTED_KEYS} more)" if len(keys) > MAX_LISTED_KEYS else "")


def check_architecture(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise CheckpointError (one line) when a VAR file meets an M-VAR model or the reverse."""
    wanted, found = architecture(model.state_dict()), architecture(state)
    if "word_embed.weight" in state and wanted != found:
        def article(arch: str) -> str:
            return f"an {arch}" if arch == "M-VAR" else f"a {arch}"

        size = f" (depth {_depth(state)}, width {state['word_embed.weight'].shape[0]})"
        raise CheckpointError(f"{what} is {article(found)} checkpoint{size} but the configuration describes "
                              f"{article(wanted)}; pass {article(found)} config (or none, to infer it from the file)")


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """Raise CheckpointError naming missing/unexpected keys and wrong shapes (up to 10 each)."""
    check_architecture(model, state, what)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    extra = [k for k in state if k not in expected]
    wrong = [f"{k} {list(state[k].shape)} (expected {list(v.shape)})" for k, v in expected.items()
             if k in state and tuple(state[k].shape) != tuple(v.shape)]
    problems = []
    if missing:
        problems.append(f"missing keys: {_listed(missing)}")
    if extra:
        problems.append(f"unexpected keys: {_listed(extra)}")
    if wrong:
        problems.append(f"wrong shapes: {_listed(wrong)}")
    if problems:
        raise CheckpointError(f"{what} does not match the configuration: {'; '.join(problems)}{describe(state)}; "
                              "pass the matching config (or none, to infer it from the file)")


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], what: str) -> nn.Module:
    """Check then load every key of ``state`` into ``model`` (built on the meta device: tensors are assigned)."""
    check_state_dict(model, state, what)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def infer_config(var_state: dict[str, torch.Tensor], vae_state: dict[str, torch.Tensor]) -> PipelineConfig:
    var_cfg = infer_var_config(var_state)
    return PipelineConfig(var_cfg, infer_vae_config(vae_state, var_cfg.patch_nums))


def hub_files(name: str) -> tuple[tuple[str, str], tuple[str, str]]:
    """((repo, transformer file), (repo, VQ-VAE file)) of a released model: VAR's on ``FoundationVision/var``,
    M-VAR's (``mvar-d16`` ... ``mvar-d32``, file ``d16.pth`` ...) on ``OliverRen/M-VAR`` with VAR's VQ-VAE."""
    from_name(name)
    if name.startswith(("mvar-", "mvar_")):
        return (MVAR_HUB_REPO, f"{name[5:]}.pth"), (HUB_REPO, HUB_VAE_FILE)
    return (HUB_REPO, f"var_{name.removeprefix('var-').removeprefix('var_')}.pth"), (HUB_REPO, HUB_VAE_FILE)


def resolve_hub(name: str) -> tuple[Path, Path]:
    """Local paths of a released model's files, from the Hugging Face cache or downloaded into it."""
    (var_repo, var_file), (vae_repo, vae_file) = hub_files(name)
    try:
        from huggingface_hub import hf_hub_download
        return tuple(Path(hf_hub_download(repo, f)) for repo, f in ((var_repo, var_file), (vae_repo, vae_file)))
    except Exception as err:  # noqa: BLE001 - offline, auth, missing package: all end in the same advice
        repos = var_repo if var_repo == vae_repo else f"{var_repo} and {vae_repo}"
        commands = " and ".join(f"huggingface-cli download {repo} {' '.join(files)}" for repo, files in
                                ([(var_repo, [var_file, vae_file])] if var_repo == vae_repo
                                 else [(var_repo, [var_file]), (vae_repo, [vae_file])]))
        raise CheckpointError(
            f"cannot get {var_file} and {vae_file} from the hub repo {repos} ({type(err).__name__}); "
            f"download them on a machine with network into the Hugging Face cache ({commands}) or pass their "
            "paths as var_ckpt/vae_ckpt") from None
