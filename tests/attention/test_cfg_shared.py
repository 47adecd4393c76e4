import pytest
import torch

from litevar.attention.calibrate import collect_stats, model_identity, save_plan
from litevar.attention.cfg_shared import SharingSchedule, measure_cfg_similarity
from litevar.attention.components import AttentionComponents, WindowSelection
from litevar.attention.context import AttnContext
from litevar.attention.dense import DenseAttnProcessor
from litevar.attention.kv_cache import KVCache
from litevar.attention.processor import ComposedAttnProcessor
from litevar.attention.windows import WindowPlan
from litevar.recipe import RecipeError, build_pipeline


def _generate(pipe):
    return pipe.generate([1, 4, 7], seed=[3, 4, 5], progress=False)


def _restore(pipe):
    pipe.var.set_attn_processor(DenseAttnProcessor())


def _sharing(schedule, selection=None, kernel="auto"):
    return ComposedAttnProcessor(AttentionComponents(selection=selection, sharing=schedule, kernel=kernel))


def test_sharing_off_equals_dense(tiny_pipe):
    cfg = tiny_pipe.config.var
    dense = _generate(tiny_pipe)
    off = torch.zeros(cfg.depth, len(cfg.patch_nums), dtype=torch.bool)
    full_plan = WindowPlan.full(cfg.patch_nums, cfg.depth, cfg.heads)
    for mode in ("map", "output"):
        for selection in (None, WindowSelection(full_plan)):
            tiny_pipe.var.set_attn_processor(_sharing(SharingSchedule(mode, off), selection, "gathered"))
            try:
                out = _generate(tiny_pipe)
            finally:
                _restore(tiny_pipe)
            assert all(torch.equal(a, b) for a, b in zip(dense.tokens, out.tokens))
            torch.testing.assert_close(out.images, dense.images, atol=1e-5, rtol=0)


def _layer_call(tiny_pipe, processor, B=2):
    attn = tiny_pipe.var.blocks[1].attn
    cfg = tiny_pipe.config.var
    g = torch.Generator().manual_seed(0)
    caches = [KVCache(2 * B, cfg.heads, cfg.seq_len, cfg.head_dim, torch.float32, "cpu") for _ in range(cfg.depth)]
    outs, xs = [], []
    for si, pn in enumerate(cfg.patch_nums[:3]):
        xs.append(torch.randn(2 * B, pn * pn, cfg.width, generator=g))
        outs.append(processor(attn, xs[-1], AttnContext(kv_caches=caches, scale_index=si, cfg_batch=B)))
    return outs, caches, xs


def test_output_sharing_copies_the_conditional_output(tiny_pipe):
    cfg = tiny_pipe.config.var
    shared = torch.zeros(cfg.depth, len(cfg.patch_nums), dtype=torch.bool)
    shared[1, 2:] = True
    outs, _, _ = _layer_call(tiny_pipe, _sharing(SharingSchedule("output", shared)))
    dense_outs, _, _ = _layer_call(tiny_pipe, DenseAttnProcessor())
    torch.testing.assert_close(outs[1], dense_outs[1])  # scale 1 not shared
    torch.testing.assert_close(outs[2][:2], dense_outs[2][:2], atol=1e-5, rtol=1e-5)  # cond half is exact
    assert torch.equal(outs[2][2:], outs[2][:2]) and not torch.allclose(dense_outs[2][2:], dense_outs[2][:2])


def test_map_sharing_uses_conditional_probabilities_with_own_values(tiny_pipe):
    cfg = tiny_pipe.config.var
    shared = torch.zeros(cfg.depth, len(cfg.patch_nums), dtype=torch.bool)
    shared[1, 2] = True
    outs, caches, xs = _layer_call(tiny_pipe, _sharing(SharingSchedule("map", shared)))
    attn = tiny_pipe.var.blocks[1].attn
    L = caches[1].length
    k, v = caches[1].k[:, :, :L], caches[1].v[:, :, :L]
    q = attn.project_qkv(xs[2])[0]
    probs_cond = ((q[:2] @ k[:2].transpose(-1, -2)) * attn.softmax_scale).softmax(-1)
    expected_uncond = attn.project_out(probs_cond @ v[2:])
    torch.testing.assert_close(outs[2][2:], expected_uncond, atol=1e-5, rtol=1e-5)
    dense_outs, _, _ = _layer_call(tiny_pipe, DenseAttnProcessor())
    torch.testing.assert_close(outs[2][:2], dense_outs[2][:2], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(outs[2][2:], dense_outs[2][2:], atol=1e-4)


def test_schedules():
    with pytest.raises(ValueError, match="every scale after the first"):
        SharingSchedule("output", torch.tensor([[0, 1, 0]]))
    SharingSchedule("map", torch.tensor([[0, 1, 0]]))
    similarity = torch.tensor([[0.5, 0.95, 0.8, 0.99], [0.99, 0.99, 0.99, 0.99]])
    assert SharingSchedule.from_similarity("output", similarity, 0.9).shared.int().tolist() == [[0, 0, 0, 1], [1, 1, 1, 1]]
    assert SharingSchedule.from_similarity("map", similarity, 0.9).shared.int().tolist() == [[0, 1, 0, 1], [1, 1, 1, 1]]
    with pytest.raises(ValueError, match="unknown sharing mode"):
        SharingSchedule("both", torch.ones(1, 1))


def test_similarity_is_measured_and_in_range(tiny_pipe):
    sim = measure_cfg_similarity(tiny_pipe, samples=2, batch_size=2, progress=False)
    assert sim.shape == (2, 5) and bool(((sim > -1) & (sim <= 1 + 1e-6)).all())
    assert isinstance(tiny_pipe.var.blocks[0].attn.processor, DenseAttnProcessor)


@pytest.mark.slow
def test_recipe_steps_compose_and_check_the_plan(tmp_path, ref_dir, tiny_pipe):
    args = dict(var_ckpt=ref_dir / "tiny_var.pth", vae_ckpt=ref_dir / "tiny_vae.pth", config=ref_dir / "tiny_config.json")
    stats = collect_stats(tiny_pipe, samples=2, batch_size=2, progress=False)
    plan = stats.plan("raster", 0.9, full_query_scales=1, kept_key_scales=1, model=model_identity(tiny_pipe.var))
    save_plan(plan, tmp_path / "plan.json")
    recipe = {"dtype": "bf16", "steps": [{"type": "mdwa", "plan": str(tmp_path / "plan.json")},
                                        {"type": "asc", "mode": "output"}]}
    pipe = build_pipeline(recipe, **args)
    processor = pipe.var.blocks[0].attn.processor
    assert isinstance(processor, ComposedAttnProcessor) and processor.components is pipe.attention
    assert pipe.attention.selection.plan.kept_fraction() < 1 and pipe.attention.sharing.mode == "output"
    assert _generate(pipe).images.shape[0] == 3
    calibrated = build_pipeline({"steps": [{"type": "asc", "min_similarity": 0.5, "calib_samples": 2}]}, **args)
    schedule = calibrated.attention.sharing
    assert schedule.mode == "output" and schedule.shared.shape == (2, 5)
    plan.model = {**plan.model, "weights_bf16_sha256": "0" * 16}
    save_plan(plan, tmp_path / "other.json")
    with pytest.raises(ValueError, match="another model"):
        build_pipeline({"steps": [{"type": "mdwa", "plan": str(tmp_path / "other.json")}]}, **args)
    with pytest.raises(RecipeError, match="backend"):
        build_pipeline({"steps": [{"type": "mdwa", "plan": "p.json", "backend": "flexible"}]}, **args)
