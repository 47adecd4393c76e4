"""The compiled interval kernel: equal to masked dense attention, counted as what it computes."""
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from litevar.attention import sparse
from litevar.attention.interval import IntervalLayout, interval_attention
from litevar.attention.native import interval_kernel_available
from litevar.attention.windows import FULL, WindowPlan

pytestmark = pytest.mark.slow  # builds the C++ extension on first use (~20 s on 2 cores)

if shutil.which("c++") is None:
    pytest.skip("no C++ compiler: the compiled kernel cannot be built here", allow_module_level=True)


@pytest.fixture(scope="module", autouse=True)
def kernel():
    assert interval_kernel_available(), "a C++ compiler is present but the interval kernel did not build"


def _masked_reference(q, k, v, keep, scale):
    bias = torch.zeros(keep.shape).masked_fill_(~keep, -math.inf)
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias, scale=scale)


def _plan(geometry, heads, seed):
    g = torch.Generator().manual_seed(seed)
    windows = torch.randint(1, 6, (1, heads, 5, 5), generator=g, dtype=torch.int32)
    windows[0, 0, 4, 4] = FULL  # one head keeps its whole own scale: a long run
    return WindowPlan((1, 2, 3, 5, 9), windows, geometry, full_query_scales=2, kept_key_scales=1)


@pytest.mark.parametrize("geometry", ["raster", "2d"])
@pytest.mark.parametrize("head_dim", [16, 64])
def test_equals_masked_dense_fp32(geometry, head_dim):
    """Per-head windows, 81 queries (a short last tile of 4) and keys read from a cache slice (a strided view)."""
    plan = _plan(geometry, heads=3, seed=head_dim)
    keep = plan.keep_mask(0, 4)
    L = 1 + 4 + 9 + 25 + 81
    g = torch.Generator().manual_seed(0)
    cache = torch.randn(2, 2, 3, L + 5, head_dim, generator=g)
    k, v = cache[0, :, :, :L], cache[1, :, :, :L]
    q = torch.randn(2, 3, 81, head_dim, generator=g)
    layout = IntervalLayout.from_mask(keep)
    out = interval_attention(q, k, v, 0.3, layout)
    torch.testing.assert_close(out, _masked_reference(q, k, v, keep, 0.3), atol=2e-6, rtol=1e-5)
    assert int(keep.sum()) <= layout.kept_pairs < keep.numel()


def test_bf16_matches_within_rounding():
    plan = _plan("raster", heads=2, seed=3)
    keep = plan.keep_mask(0, 4)
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(2, 2, 81, 64, generator=g), torch.randn(2, 2, 120, 64, generator=g), \
        torch.randn(2, 2, 120, 64, generator=g)
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    out = interval_attention(qb, kb, vb, 0.125, IntervalLayout.from_mask(keep))
    assert out.dtype == torch.bfloat16
    reference = _masked_reference(qb, kb, vb, keep, 0.125)  # same bf16 inputs, fp32 math
    torch.testing.assert_close(out.float(), reference, atol=8e-3, rtol=8e-3)


def test_unkept_keys_never_weigh_even_when_they_dominate():
    """A key outside a query's window but inside its tile's union scores far above the kept ones: weight 0,
    no overflow."""
    keep = torch.zeros(1, 4, 40, dtype=torch.bool)
    keep[0, 0, :8] = True
    keep[0, 1:, 4:20] = True  # the tile's union covers keys 0..19; query 0 does not keep 8..19
    q = torch.ones(1, 1, 4, 16)
    k = torch.zeros(1, 1, 40, 16)
    k[0, 0, 12] = 50.0  # scores 800 for every query
    v = torch.randn(1, 1, 40, 16)
    v[0, 0, 12] = 1e6
    out = interval_attention(q, k, v, 1.0, IntervalLayout.from_mask(keep))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, :8].mean(0))
    torch.testing.assert_close(out, _masked_reference(q, k, v, keep, 1.0), atol=1e-4, rtol=1e-5)


def test_counts_what_it_computes():
    from litevar.flops import FlopCounter

    plan = WindowPlan((1, 2, 4, 8), torch.full((1, 2, 4, 4), 2, dtype=torch.int32), "raster",
                      full_query_scales=2, kept_key_scales=1)
    layout = IntervalLayout.from_mask(plan.keep_mask(0, 3))
    q, k, v = torch.randn(3, 2, 64, 16), torch.randn(3, 2, 85, 16), torch.randn(3, 2, 85, 16)
    with FlopCounter() as counter:
        interval_attention(q, k, v, 1.0, layout)
    assert counter.totals["attention"] == 3 * layout.flops_per_row(16)
    assert layout.flops_per_row(16) == 2 * 16 * (layout.score_lanes + layout.kept_pairs)
    assert layout.kept_pairs < 2 * 64 * 85


def test_bad_layouts_and_calls_are_refused():
    keep = torch.ones(1, 4, 10, dtype=torch.bool)
    keep[0, 2] = False
    with pytest.raises(ValueError, match="no key"):
        IntervalLayout.from_mask(keep)
    layout = IntervalLayout.from_mask(torch.ones(1, 4, 10, dtype=torch.bool))
    with pytest.raises(ValueError, match="4 queries x 10 keys"):
        interval_attention(torch.randn(1, 1, 4, 16), torch.randn(1, 1, 12, 16), torch.randn(1, 1, 12, 16), 1.0,
                           layout)


def test_dispatcher_picks_the_kernel_by_capability_and_density(monkeypatch):
    from litevar.attention import dispatch
    from litevar.attention.components import WindowSelection

    plan = WindowPlan((1, 2, 4, 8), torch.full((1, 2, 4, 4), 2, dtype=torch.int32), "raster",
                      full_query_scales=2, kept_key_scales=1)
    full = WindowPlan.full((1, 2, 4, 8), depth=1, heads=2)
    q, kv = torch.randn(1, 2, 64, 16), torch.randn(1, 2, 85, 16)

    def ran(selection, query, **kw):
        d = dispatch.KernelDispatcher(kw.pop("kernel", "auto"))
        out = d.attend(0, 3, query, kv.to(query.dtype), kv.to(query.dtype), 0.5, selection, **kw)
        assert out.shape == query.shape
        return d.trace[(0, 3)]

    windowed = WindowSelection(plan)
    assert ran(windowed, q) == "interval"
    assert ran(WindowSelection(full), q) == "sdpa"  # everything kept: no mask at all
    assert ran(windowed, q.to(torch.float16)) == "gathered"  # no fp16 interval kernel
    assert ran(windowed, q, probs_fn=lambda p: p) == "gathered"  # probabilities needed: the PyTorch kernel
    assert ran(windowed, q, kernel="masked") == "masked"
    assert ran(None, q) == "sdpa"
    with pytest.raises(ValueError, match="interval kernel cannot run"):
        ran(windowed, q.to(torch.float16), kernel="interval")
    monkeypatch.setattr(dispatch, "interval_kernel_supports", lambda q: False)  # not built here
    assert ran(windowed, q) == "gathered"



@pytest.mark.slow
def test_flex_kernel_equals_masked_and_counts_its_blocks():
    """FlexAttention (eager on CPU; compiled on CUDA) with the plan's block mask: the masked result, and FLOPs
    credited from the blocks it computes (never more than dense)."""
    from litevar.attention.components import WindowSelection
    from litevar.attention.dispatch import KernelDispatcher, flex_available
    from litevar.flops import FlopCounter

    if not flex_available():
        pytest.skip("no FlexAttention in this PyTorch")
    plan = WindowPlan((1, 2, 4, 8), torch.full((1, 2, 4, 4), 2, dtype=torch.int32), "raster",
                      full_query_scales=2, kept_key_scales=1)
    q, kv = torch.randn(2, 2, 64, 16), torch.randn(2, 2, 85, 16)
    selection = WindowSelection(plan)
    masked = KernelDispatcher("masked").attend(0, 3, q, kv, kv, 0.5, selection)
    flex = KernelDispatcher("flex")
    with FlopCounter() as counter:
        out = flex.attend(0, 3, q, kv, kv, 0.5, selection)
    torch.testing.assert_close(out, masked, atol=1e-5, rtol=1e-5)
    assert flex.trace[(0, 3)] == "flex"
    assert 0 < counter.totals["attention"] <= 4 * 2 * 2 * 64 * 85 * 16
