"""Calibration statistics: exact ranges, and a reservoir that is a uniform sample whatever the call sizes."""
import pytest
import torch

from litevar.quant.calibrate import _Recorder, collect_input_stats
from litevar.quant.groups import TokenGroups
from litevar.quant.primitives import QuantSpec, fake_quant
from litevar.quant.transform import PERCENTILES, choose_range

CALL_SIZES = [1] * 50 + [100] * 3 + [50] * 2  # 450 rows per half, from calls of very different sizes
CAP = 45


def feed(recorder, sizes, K=1):
    """Calls of [2 halves, L, K]: half 0 holds row numbers 0.., half 1 their negatives minus one."""
    start = 0
    for L in sizes:
        ids = torch.arange(start, start + L, dtype=torch.float32)
        x = torch.stack((ids, -ids - 1)).unsqueeze(-1).expand(2, L, K).contiguous()
        recorder(None, (x,))
        start += L
    return start


def test_reservoir_keeps_everything_up_to_its_capacity_and_exact_ranges():
    groups = TokenGroups((1,), "tensor")
    recorder = _Recorder(3, groups, 1000, torch.Generator().manual_seed(0))
    total = feed(recorder, CALL_SIZES, K=3)
    stats = recorder.stats()
    assert sorted(stats.rows[0][0][:, 0].tolist()) == list(range(total))
    assert torch.equal(stats.lo[0, 0], torch.zeros(3)) and torch.equal(stats.hi[0, 0], torch.full((3,), total - 1.0))
    assert torch.equal(stats.lo[1, 0], torch.full((3,), -float(total))) and torch.equal(stats.hi[1, 0], -torch.ones(3))
    assert (stats.rows[1][0] < 0).all()  # the halves stay apart


def test_reservoir_is_a_uniform_sample_whatever_the_call_sizes():
    groups = TokenGroups((1,), "tensor")
    trials, total = 100, sum(CALL_SIZES)
    counts = torch.zeros(total)
    for trial in range(trials):
        recorder = _Recorder(1, groups, CAP, torch.Generator().manual_seed(trial))
        feed(recorder, CALL_SIZES)
        rows, keys = recorder.rows[0][0][:, 0], recorder.keys[0][0]
        assert len(rows) == CAP and len(rows.unique()) == CAP and torch.equal(keys, keys.sort().values)
        counts[rows.long()] += 1
    rate = counts / trials  # expected CAP / total = 0.1 for every row
    singles, large = rate[:50].mean(), rate[50:350].mean()
    assert abs(singles - 0.1) < 0.02 and abs(large - 0.1) < 0.01 and abs(rate[350:].mean() - 0.1) < 0.01
    assert abs(rate[:225].mean() - rate[225:].mean()) < 0.01  # early rows are not favoured over late ones


def test_collect_input_stats_records_every_scale_and_cfg_half(tiny_pipe):
    seen = []
    fc1 = tiny_pipe.var.blocks[1].ffn.fc1
    handle = fc1.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        stats = collect_input_stats(tiny_pipe, ["fc1", "ada_lin"], samples=3, batch_size=2, rows_per_group=8,
                                    progress=False)
    finally:
        handle.remove()
    assert sorted(stats) == ["blocks.0.ada_lin.1", "blocks.0.ffn.fc1", "blocks.1.ada_lin.1", "blocks.1.ffn.fc1",
                             "head_nm.ada_lin.1"]
    assert all(not m._forward_pre_hooks for m in tiny_pipe.var.modules())  # no hook left behind
    s = stats["blocks.1.ffn.fc1"]
    n_scales = len(tiny_pipe.var.cfg.patch_nums)
    assert s.lo.shape == (2, n_scales, 128) and len(seen) == 2 * n_scales
    for g, pn in enumerate(tiny_pipe.var.cfg.patch_nums):
        calls = [x for x in seen if x.shape[1] == pn * pn]
        for half in (0, 1):
            x = torch.cat([c[:len(c) // 2] if half == 0 else c[len(c) // 2:] for c in calls]).reshape(-1, 128)
            assert torch.equal(s.lo[half, g], x.amin(0)) and torch.equal(s.hi[half, g], x.amax(0))
            assert len(s.rows[half][g]) == min(8, len(x))
            assert (s.rows[half][g][:, None] == x[None]).all(-1).any(-1).all()  # sampled rows are real input rows
    ada = stats["head_nm.ada_lin.1"]  # the class conditioning is one row per image, counted with the first scale
    assert len(ada.rows[0][0]) == 3 and all(len(r) == 0 for r in ada.rows[0][1:])
    assert s.sample(cond_share=1.0).shape == s.sample(cond_share=0.0).shape == (3 + 4 * 8, 128)


def test_nothing_to_record_generates_nothing(tiny_pipe, monkeypatch):
    monkeypatch.setattr(tiny_pipe, "generate", lambda *a, **k: pytest.fail("no layer to record, yet it generated"))
    assert collect_input_stats(tiny_pipe, [], samples=4, progress=False) == {}


def reference_range(rows, spec):
    """The percentile-MSE observer written with torch.quantile (the definition choose_range must keep)."""
    values = rows.flatten().float()
    best, best_err = None, float("inf")
    for p in PERCENTILES:
        lo = float(torch.quantile(values, 1 - p)) if p < 1 else float(values.min())
        hi = float(torch.quantile(values, p)) if p < 1 else float(values.max())
        err = float((fake_quant(rows, spec, torch.tensor(lo), torch.tensor(hi)) - rows).pow(2).mean())
        if err < best_err:
            best, best_err = (lo, hi), err
    return best


def observer_cases():
    g = torch.Generator().manual_seed(0)
    heavy = torch.randn(512, 96, generator=g) * torch.rand(512, 96, generator=g).pow(6) * 20
    gelu = torch.nn.functional.gelu(torch.randn(300, 64, generator=g) * 3)  # one-sided, many near-ties
    spiky = torch.randn(1000, 32, generator=g)
    spiky[:10, 3] = 30.0  # 10 outliers in 32000 values: clipping them pays off at 4 bits, not at 6 or 8
    return {"gaussian": torch.randn(333, 17, generator=g), "heavy": heavy, "gelu": gelu, "spiky": spiky,
            "ties": torch.randint(-3, 4, (200, 8), generator=g).float(), "one": torch.tensor([[0.7]]),
            "two": torch.tensor([[-1.0, 2.0]]), "five": torch.tensor([[0.1, -0.3, 5.0, 2.0, -7.0]])}


@pytest.mark.parametrize("case", list(observer_cases()))
@pytest.mark.parametrize("bits, symmetric", [(8, False), (4, True), (6, False)])
def test_choose_range_is_the_percentile_mse_observer(case, bits, symmetric):
    rows = observer_cases()[case]
    spec = QuantSpec(bits, symmetric, "tensor")
    assert choose_range(rows, spec) == reference_range(rows, spec)
    if case == "spiky":
        assert (choose_range(rows, spec)[1] < 10) == (bits == 4)
