import math

import pytest
import torch

from litevar.attention.calibrate import save_plan
from litevar.attention.components import WindowSelection
from litevar.attention.dispatch import KernelDispatcher
from litevar.attention.sparse import GatheredLayout, gathered_attention
from litevar.attention.steps import MDWAConfig
from litevar.attention.windows import DROP, FULL, PlanError, WindowPlan, needed_width
from litevar.recipe import STEPS


def _masked(plan, layer, k, q, key, value, scale):
    """The plan's oracle: the fused dense kernel with the plan's -inf mask."""
    return KernelDispatcher("masked").attend(layer, k, q, key, value, scale, WindowSelection(plan))


def _random_plan(pipe, geometry, seed=0, **kw):
    cfg = pipe.config.var
    K = len(cfg.patch_nums)
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(1, 6, (cfg.depth, cfg.heads, K, K), generator=g, dtype=torch.int32)
    windows[torch.rand(windows.shape, generator=g) < 0.2] = DROP
    windows[torch.rand(windows.shape, generator=g) < 0.2] = FULL
    return WindowPlan(cfg.patch_nums, windows, geometry, **kw)


def test_needed_width_geometries():
    raster = needed_width("raster", 4, 2)
    # query 5 (row 1, col 1 of 4x4) maps to 5 * 2/4 = 2.5 in the flattened 2x2 scale
    assert raster[5].tolist() == [3, 2, 1, 1]
    own = needed_width("raster", 3, 3)
    assert torch.equal(own.diagonal(), torch.ones(9, dtype=torch.int32))
    square = needed_width("2d", 4, 2)
    # query (0, 0) of 4x4 corresponds to (-0.25, -0.25) in 2x2: key (0, 0) at distance 0.25, key (1, 1) at 1.25
    assert square[0].tolist() == [1, 2, 2, 2]
    assert square.shape == (16, 4)


def test_full_plan_keeps_everything_and_first_scales_stay():
    plan = WindowPlan.full((1, 2, 3, 4), depth=2, heads=3)
    assert plan.kept_fraction() == 1.0
    windows = torch.full((2, 3, 4, 4), DROP, dtype=torch.int32)
    dropped = WindowPlan((1, 2, 3, 4), windows, full_query_scales=3, kept_key_scales=2)
    keep = dropped.keep_mask(0, 3)
    assert keep[:, :, :5].all() and not keep[:, :, 5:].any()
    assert dropped.keep_mask(1, 2).all()


@pytest.mark.parametrize("geometry", ["raster", "2d"])
def test_full_plan_equals_dense_sampling(tiny_pipe, ref_dir, geometry):
    import litevar

    dense = tiny_pipe.generate([1, 4], seed=[3, 4], progress=False)
    cfg = tiny_pipe.config.var
    for backend in ("masked", "gathered", "auto"):
        pipe = litevar.load_pipeline(ref_dir / "tiny_var.pth", ref_dir / "tiny_vae.pth",
                                     config=ref_dir / "tiny_config.json")
        pipe.set_attention("selection", WindowSelection(WindowPlan.full(cfg.patch_nums, cfg.depth, cfg.heads,
                                                                         geometry)), by="test")
        pipe.set_attention("kernel", backend, by="test")
        full = pipe.generate([1, 4], seed=[3, 4], progress=False)
        assert all(torch.equal(a, b) for a, b in zip(dense.tokens, full.tokens))
        torch.testing.assert_close(full.images, dense.images, atol=1e-5, rtol=0)


@pytest.mark.parametrize("geometry", ["raster", "2d"])
def test_masking_is_exact(geometry):
    plan = WindowPlan((1, 2, 4, 6), torch.randint(1, 4, (1, 2, 4, 4), dtype=torch.int32), geometry,
                      full_query_scales=1, kept_key_scales=1)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 36 if i == 0 else 57, 8, generator=g) for i in range(3))
    out = _masked(plan, 0, 3, q, k, v, 0.5)
    keep = plan.keep_mask(0, 3)
    logits = (q @ k.transpose(-1, -2)) * 0.5
    probs = logits.masked_fill(~keep, -math.inf).softmax(-1)
    torch.testing.assert_close(out, probs @ v, atol=1e-5, rtol=1e-5)
    # a masked key has no influence at all, however large its value
    v_changed = v.clone()
    v_changed[:, :, 20:] += 1000 * (~keep[:, :, 20:]).all(dim=1).unsqueeze(-1).float()
    torch.testing.assert_close(_masked(plan, 0, 3, q, k, v_changed, 0.5), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("geometry", ["raster", "2d"])
@pytest.mark.parametrize("tile", [1, 5, 64, None])
def test_gathered_kernel_equals_masked_dense(geometry, tile):
    plan = WindowPlan((1, 2, 3, 5, 8), torch.randint(0, 5, (1, 3, 5, 5), dtype=torch.int32), geometry,
                      full_query_scales=2, kept_key_scales=1)
    g = torch.Generator().manual_seed(1)
    L = 1 + 4 + 9 + 25 + 64
    q = torch.randn(2, 3, 64, 16, generator=g)
    k, v = torch.randn(2, 3, L, 16, generator=g), torch.randn(2, 3, L, 16, generator=g)
    layout = GatheredLayout.from_mask(plan.keep_mask(0, 4), "cpu", tile=tile)
    masked = _masked(plan, 0, 4, q, k, v, 0.3)
    torch.testing.assert_close(gathered_attention(q, k, v, 0.3, layout), masked, atol=1e-5, rtol=1e-5)
    kept = int(plan.keep_mask(0, 4).sum())
    assert kept <= layout.kept_pairs <= 3 * 64 * L


def test_plan_round_trip_and_wrong_model(fresh_pipe, tmp_path):
    plan = _random_plan(fresh_pipe, "2d", model={"weights_sha256": "abc", "patch_nums": [1, 2]})
    again = WindowPlan.from_state(plan.to_state())
    assert torch.equal(again.windows, plan.windows) and again.geometry == "2d"
    assert torch.equal(again.keep_mask(1, 4), plan.keep_mask(1, 4))
    with pytest.raises(PlanError, match="another model"):
        again.check_model({"weights_sha256": "def", "patch_nums": [1, 2]})
    wrong = WindowPlan.full((1, 2, 3), depth=2, heads=2)
    save_plan(wrong, tmp_path / "wrong.json")
    with pytest.raises(PlanError, match="the model has depth"):
        STEPS["mdwa"].handler(fresh_pipe, MDWAConfig(str(tmp_path / "wrong.json")))
    with pytest.raises(PlanError, match="not a window plan"):
        WindowPlan.from_state({"windows": []})


def test_gathered_kernel_chunks_groups_and_cache_views(monkeypatch):
    """Per-head windows (several head groups, heads out of order), keys read from a KV-cache slice (a view),
    and chunks cut over heads and rows all give the masked dense result."""
    from litevar.attention import sparse

    windows = torch.randint(1, 9, (1, 4, 5, 5), dtype=torch.int32)
    windows[0, 1] = 1  # narrow head
    windows[0, 2, 4, 4] = FULL  # one head keeps its whole scale
    plan = WindowPlan((1, 2, 3, 5, 8), windows, "raster", full_query_scales=2, kept_key_scales=1)
    g = torch.Generator().manual_seed(2)
    L = 1 + 4 + 9 + 25 + 64
    cache = torch.randn(2, 3, 4, L + 7, 16, generator=g)  # k/v storage with room left, as the KV cache
    k, v = cache[0, :, :, :L], cache[1, :, :, :L]
    q = torch.randn(3, 4, 64, 16, generator=g)
    masked = _masked(plan, 0, 4, q, k, v, 0.3)
    layout = GatheredLayout.from_mask(plan.keep_mask(0, 4), "cpu", tile=16)
    assert len(layout.groups) > 1
    for chunk_bytes in (sparse.CHUNK_BYTES, 64):
        monkeypatch.setattr(sparse, "CHUNK_BYTES", chunk_bytes)
        torch.testing.assert_close(gathered_attention(q, k, v, 0.3, layout), masked, atol=1e-5, rtol=1e-5)


def test_gathered_kernel_counts_what_it_computes():
    from litevar.flops import FlopCounter

    plan = WindowPlan((1, 2, 4, 8), torch.full((1, 2, 4, 4), 3, dtype=torch.int32), "raster",
                      full_query_scales=2, kept_key_scales=1)
    layout = GatheredLayout.from_mask(plan.keep_mask(0, 3), "cpu")
    q, k, v = torch.randn(2, 2, 64, 8), torch.randn(2, 2, 85, 8), torch.randn(2, 2, 85, 8)
    with FlopCounter() as counter:
        gathered_attention(q, k, v, 1.0, layout)
    assert counter.totals["attention"] == 2 * 2 * 2 * 8 * layout.kept_pairs  # batch x (QK + PV) x 2 x d
    assert layout.kept_pairs < 2 * 64 * 85
