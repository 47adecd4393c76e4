"""Strict loading of the released key layouts, config inference, and clear errors for bad checkpoints."""
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

import litevar
from litevar.models.configs import PYRAMID_256, PYRAMID_512, from_name
from litevar.models.loading import CheckpointError, infer_var_config, infer_vae_config, load_strict
from litevar.models.var import VAR
from litevar.models.vqvae import VQVAE


def manifest_state(path, device="meta"):
    """A state_dict with a manifest's keys, shapes and dtypes (lvl_1L filled as in the released files)."""
    state = {}
    for line in path.read_text().splitlines():
        key, shape, dtype = line.split("\t")
        dims = [int(d) for d in shape.strip("[]").split(",") if d.strip()]
        state[key] = torch.zeros(dims, dtype=getattr(torch, dtype), device=device)
    if "lvl_1L" in state:
        pyramid = PYRAMID_512 if state["lvl_1L"].shape[1] == 2240 else PYRAMID_256
        state["lvl_1L"] = torch.cat([torch.full((p * p,), i) for i, p in enumerate(pyramid)]).view(1, -1)
    return state


@pytest.mark.parametrize("name", ["d16", "d20", "d24", "d30", "d36"])
def test_released_manifests_load_strictly_with_inferred_config(ref_dir, name):
    state = manifest_state(ref_dir / f"manifest_var_{name}.tsv")
    cfg = infer_var_config(state)
    assert cfg == from_name(name).var
    with torch.device("meta"):
        model = VAR(cfg)
    load_strict(model, state, name)
    assert set(model.state_dict()) == set(state)


def test_vae_manifest_loads_strictly(ref_dir):
    state = manifest_state(ref_dir / "manifest_vae_ch160v4096z32.tsv")
    cfg = infer_vae_config(state)
    assert cfg == from_name("d16").vae
    assert infer_vae_config(state, PYRAMID_512).patch_nums == PYRAMID_512
    with torch.device("meta"):
        model = VQVAE(cfg)
    load_strict(model, state, "vae")


def test_d16_manifest_with_real_tensors_loads_strictly(ref_dir):
    state = manifest_state(ref_dir / "manifest_var_d16.tsv", device="cpu")
    with torch.device("meta"):
        model = VAR(infer_var_config(state))
    load_strict(model, state, "d16")
    assert model.blocks[15].attn.mat_qkv.weight.shape == (3072, 1024)
    assert not model.blocks[0].attn.mat_qkv.weight.is_meta


def test_safetensors_checkpoints_load(tmp_path, ref_dir, tiny_pipe, reference):
    for name in ("var", "vae"):
        state = torch.load(ref_dir / f"tiny_{name}.pth", weights_only=True)
        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / f"{name}.safetensors")
    pipe = litevar.load_pipeline(tmp_path / "var.safetensors", tmp_path / "vae.safetensors")
    with torch.no_grad():
        logits = pipe.var(reference["var.teacher_labels"], reference["var.teacher_input"])
    assert (logits - reference["var.teacher_logits"]).abs().max() <= 1e-4


def _save_var(tmp_path, state):
    path = tmp_path / "var.pth"
    torch.save(state, path)
    return path


def test_missing_and_extra_keys_are_named(tmp_path, ref_dir):
    state = torch.load(ref_dir / "tiny_var.pth", weights_only=True)
    state.pop("blocks.1.ffn.fc2.bias")
    state["blocks.0.attn.extra"] = torch.zeros(1)
    with pytest.raises(CheckpointError) as err:
        litevar.load_pipeline(_save_var(tmp_path, state), ref_dir / "tiny_vae.pth", config=ref_dir / "tiny_config.json")
    message = str(err.value)
    assert "missing keys: blocks.1.ffn.fc2.bias" in message
    assert "unexpected keys: blocks.0.attn.extra" in message
    assert "depth 2, width 128" in message


def test_wrong_shapes_are_named_with_a_guess(ref_dir):
    with pytest.raises(CheckpointError, match=r"wrong shapes: pos_start \[1, 1, 128\] \(expected \[1, 1, 1024\]\)"):
        litevar.load_pipeline(ref_dir / "tiny_var.pth", ref_dir / "tiny_vae.pth", config="var-d16")


def test_more_than_ten_missing_keys_are_counted(ref_dir):
    with pytest.raises(CheckpointError, match=r"missing keys: .*\(\+\d+ more\)"):
        litevar.load_pipeline(ref_dir / "tiny_var.pth", ref_dir / "tiny_vae.pth", config="var-d16")


def test_vae_given_as_var_is_recognised(ref_dir):
    with pytest.raises(CheckpointError, match="not a VAR transformer checkpoint.*looks like a VQ-VAE"):
        litevar.load_pipeline(ref_dir / "tiny_vae.pth", ref_dir / "tiny_vae.pth")


def test_corrupted_file(tmp_path, ref_dir):
    bad = tmp_path / "bad.pth"
    bad.write_bytes((ref_dir / "tiny_var.pth").read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="is not a readable checkpoint"):
        litevar.load_pipeline(bad, ref_dir / "tiny_vae.pth")


def test_pickled_objects_are_never_executed(tmp_path, ref_dir):
    evil = tmp_path / "evil.pth"
    torch.save({"weights": torch.zeros(1), "callback": os.getcwd}, evil)
    with pytest.raises(CheckpointError, match="never unpickles"):
        litevar.load_pipeline(evil, ref_dir / "tiny_vae.pth")


def test_non_state_dict_and_missing_file(tmp_path, ref_dir):
    odd = tmp_path / "odd.pth"
    torch.save([torch.zeros(1)], odd)
    with pytest.raises(CheckpointError, match="does not hold a state_dict"):
        litevar.load_pipeline(odd, ref_dir / "tiny_vae.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        litevar.load_pipeline(tmp_path / "nope.pth", ref_dir / "tiny_vae.pth")
    with pytest.raises(CheckpointError, match="var_d16.pth does not exist"):
        litevar.load_pipeline("var_d16.pth", ref_dir / "tiny_vae.pth")
    with pytest.raises(CheckpointError, match="vae_ckpt is missing"):
        litevar.load_pipeline(ref_dir / "tiny_var.pth")


@pytest.mark.slow
def offline_load_message(tmp_path, name: str) -> str:
    """What ``load_pipeline(name)`` says in a fresh process with the hub offline and an empty hub cache."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    code = f"import litevar\ntry:\n    litevar.load_pipeline({name!r})\nexcept litevar.CheckpointError as e:\n    print(e)"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120).stdout


def test_hub_name_offline_says_which_files(tmp_path):
    out = offline_load_message(tmp_path, "var-d20")
    assert "var_d20.pth" in out and "vae_ch160v4096z32.pth" in out and "FoundationVision/var" in out
