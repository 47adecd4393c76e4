"""M-VAR files: the released layouts load strictly with inferred configurations, architecture mix-ups are named, hub
names resolve like VAR's, and configurations round-trip."""

import pytest
import torch

import litevar
from litevar.models.configs import MVARConfig, config_from_dict, from_name, load_config
from litevar.models.loading import CheckpointError, infer_var_config, load_strict
from litevar.models.mvar import MVAR, build_transformer
from litevar.models.var import VAR

from .test_loading import manifest_state, offline_load_message

# upstream's parameter counts (reference README), in millions
RELEASED_PARAMS_M = {"d16": 464.16, "d20": 900.53, "d24": 1550.07, "d32": 3658.71}


@pytest.mark.parametrize("name", ["d16", "d20", "d24", "d32"])
def test_released_manifests_load_strictly_with_inferred_config(ref_dir, name):
    state = manifest_state(ref_dir / f"manifest_mvar_{name}.tsv")
    cfg = infer_var_config(state)
    assert isinstance(cfg, MVARConfig)
    assert cfg == from_name(f"mvar-{name}").var
    assert cfg.attn_l2_norm == (name in ("d24", "d32"))  # d16 and d20 were trained without l2-normalised q/k
    with torch.device("meta"):
        model = build_transformer(cfg)
    assert isinstance(model, MVAR)
    load_strict(model, state, name)
    assert list(model.state_dict()) == list(state)  # same keys in the same order as upstream's state_dict
    params = sum(p.numel() for p in model.parameters())
    assert round(params / 1e6, 2) == RELEASED_PARAMS_M[name]


def test_mvar_file_where_a_var_is_expected_names_the_architecture(ref_dir):
    with pytest.raises(CheckpointError) as err:
        litevar.load_pipeline(ref_dir / "mvar_tiny_var.pth", ref_dir / "tiny_vae.pth",
                              config=ref_dir / "tiny_config.json")
    message = str(err.value)
    assert "\n" not in message
    assert "is an M-VAR checkpoint (depth 2, width 128) but the configuration describes a VAR" in message


def test_var_file_where_an_mvar_is_expected_names_the_architecture(ref_dir):
    with pytest.raises(CheckpointError) as err:
        litevar.load_pipeline(ref_dir / "tiny_var.pth", ref_dir / "tiny_vae.pth",
                              config=ref_dir / "mvar_tiny_config.json")
    message = str(err.value)
    assert "\n" not in message and "is a VAR checkpoint" in message and "describes an M-VAR" in message
    with torch.device("meta"):
        model = VAR(from_name("d16").var)
    with pytest.raises(CheckpointError, match="is an M-VAR checkpoint .* describes a VAR"):
        load_strict(model, manifest_state(ref_dir / "manifest_mvar_d16.tsv"), "d16")


def test_config_round_trips_and_upstream_mamba2_section_is_checked(ref_dir):
    cfg = load_config(ref_dir / "mvar_tiny_config.json")
    assert cfg.arch == "mvar" and isinstance(cfg.var, MVARConfig)
    assert config_from_dict(cfg.to_dict()) == cfg
    assert set(cfg.to_dict()) == {"mvar", "vae"}
    raw = {"mvar": {"depth": 2, "embed_dim": 128, "num_heads": 2, "patch_nums": [1, 2]},
           "vae": {"ch": 32, "vocab_size": 64, "z_channels": 8}, "mamba2": {"ngroups": 2}}
    with pytest.raises(ValueError, match="mamba2.ngroups=2 is not supported"):
        config_from_dict(raw)
    with pytest.raises(ValueError, match="known: var-d16.*mvar-d32"):
        from_name("mvar-d12")


def test_random_mvar_pipeline_by_shape_name_samples():
    from litevar.pipeline import random_pipeline

    pipe = random_pipeline({"mvar": {"depth": 1, "width": 128, "heads": 2, "num_classes": 4,
                                             "patch_nums": [1, 2, 3]},
                                    "vae": {"ch": 32, "vocab_size": 16, "z_channels": 4}})
    assert isinstance(pipe.var, MVAR)
    out = pipe.generate([0, 3], seed=1, progress=False)
    assert [t.shape for t in out.tokens] == [(2, 1), (2, 4), (2, 9)]


def test_safetensors_round_trip_loads_as_mvar(tmp_path, ref_dir, mvar_reference):
    from safetensors.torch import save_file

    state = torch.load(ref_dir / "mvar_tiny_var.pth", weights_only=True)
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "mvar.safetensors")
    pipe = litevar.load_pipeline(tmp_path / "mvar.safetensors", ref_dir / "tiny_vae.pth")
    with torch.no_grad():
        logits = pipe.var(mvar_reference["mvar.teacher_labels"], mvar_reference["mvar.teacher_input"])
    assert (logits - mvar_reference["mvar.teacher_logits"]).abs().max() <= 1e-4


@pytest.mark.slow
def test_mvar_hub_name_offline_says_which_files(tmp_path):
    out = offline_load_message(tmp_path, "mvar-d32")
    assert "d32.pth" in out and "OliverRen/M-VAR" in out and "vae_ch160v4096z32.pth" in out
    assert "FoundationVision/var" in out and "huggingface-cli download" in out
