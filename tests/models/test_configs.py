import pytest

from litevar.models.configs import ConfigError, VARConfig, VQVAEConfig, config_from_dict, from_name, load_config


def test_presets_follow_the_var_rule():
    for name, width in [("d16", 1024), ("d20", 1280), ("d24", 1536), ("d30", 1920), ("d36", 2304)]:
        cfg = from_name(f"var-{name}")
        assert (cfg.var.width, cfg.var.heads, cfg.var.head_dim) == (width, int(name[1:]), 64)
    assert from_name("d36").var.shared_aln and from_name("d36").var.seq_len == 2240
    assert from_name("d16").var.seq_len == 680 and from_name("d16").vae.image_size == 256


def test_upstream_keywords(ref_dir):
    cfg = load_config(ref_dir / "tiny_config.json")
    assert (cfg.var.width, cfg.var.heads, cfg.var.vocab_size, cfg.var.z_channels) == (128, 2, 64, 8)
    assert cfg.vae.patch_nums == (1, 2, 3, 4, 6) and cfg.vae.image_size == 96


@pytest.mark.parametrize("raw, message", [
    ({"var": {"depth": 2, "colour": 3}}, "unknown var config key 'colour'"),
    ({"var": {"depth": 0}}, "depth must be >= 1"),
    ({"var": {"depth": 2, "width": 130, "heads": 4}}, "divisible"),
    ({"var": {"depth": 2, "patch_nums": [1, 3, 2]}}, "strictly increasing"),
    ({"model": {}}, "a config must be a dict"),
    ({"var": {"depth": 2, "patch_nums": [1, 2]}, "vae": {"v_patch_nums": [1, 4]}}, "differ from vae.patch_nums"),
    ({"var": {"depth": 2}, "vae": {"ch": 48}}, "multiple of 32"),
])
def test_bad_configs(raw, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict(raw)


def test_bad_config_sources(tmp_path):
    with pytest.raises(ConfigError, match="unknown model"):
        load_config("var-d17")
    broken = tmp_path / "c.json"
    broken.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(broken)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.json")


def test_custom_sizes():
    assert VARConfig(depth=4, width=256, heads=4, mlp_ratio=2.0).hidden == 512
    assert VQVAEConfig(ch=64, ch_mult=(1, 2, 2), patch_nums=(1, 2, 4)).image_size == 16
