"""M-VAR computes what the upstream implementation computed on the tiny reference M-VAR (float32, CPU), with the
stateful sampler and with upstream's re-scanning one; the chunked Mamba-2 scan equals the sequential recurrence."""
import pytest
import torch

from litevar.models.mamba2 import Mamba2, ssd_scan
from litevar.models.mvar import MVAR


def test_inferred_config_equals_the_upstream_config_file(ref_dir, mvar_pipe, fresh_mvar_pipe):
    assert isinstance(mvar_pipe.var, MVAR)
    assert fresh_mvar_pipe.config == mvar_pipe.config
    cfg = mvar_pipe.config.var
    shape = (cfg.depth, cfg.width, cfg.heads, cfg.d_state, cfg.d_conv, cfg.expand, cfg.headdim)
    assert shape == (2, 128, 2, 64, 4, 2, 64)
    assert mvar_pipe.var.blocks[0].mamba.nheads == 4


def test_teacher_forced_logits_match_upstream(mvar_pipe, mvar_reference):
    ref = mvar_reference
    with torch.no_grad():
        cond = mvar_pipe.var(ref["mvar.teacher_labels"], ref["mvar.teacher_input"])
        null = mvar_pipe.var(torch.full((3,), 10), ref["mvar.teacher_input"])
    assert cond.shape == ref["mvar.teacher_logits"].shape == (3, 66, 64)
    assert (cond - ref["mvar.teacher_logits"]).abs().max() <= 1e-4
    assert (null - ref["mvar.teacher_logits_uncond"]).abs().max() <= 1e-4


def test_teacher_forcing_input_is_vaes(mvar_pipe, mvar_reference):
    x = mvar_pipe.vae.quantize.idx_to_var_input(mvar_reference["mvar.teacher_idx_Bl"])
    torch.testing.assert_close(x, mvar_reference["mvar.teacher_input"], rtol=0, atol=1e-6)


def test_mamba2_layer_alone_matches_upstream(mvar_pipe, mvar_reference):
    mamba = mvar_pipe.var.blocks[0].mamba
    u, expected = mvar_reference["mamba2.block0_in"], mvar_reference["mamba2.block0_out"]
    with torch.no_grad():
        for chunks in ([1, 4, 9, 16, 36], 256, 7):
            assert (mamba(u, chunks) - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("rescan", [False, True], ids=["stateful", "rescan"])
@pytest.mark.parametrize("case_index", [0, 1, 2])
def test_sampling_matches_upstream(fresh_mvar_pipe, mvar_reference, case_index, rescan):
    case = mvar_reference["sample.cases"][case_index]
    a = case["args"]
    fresh_mvar_pipe.var.rescan = rescan
    seen = []
    out = fresh_mvar_pipe.generate(a["label_B"], seed=a["g_seed"], cfg=a["cfg"], top_k=a["top_k"], top_p=a["top_p"],
                                   more_smooth=a["more_smooth"], batch_size=a["B"], progress=False,
                                   on_logits=lambda si, logits: seen.append(logits.clone()))
    for si, (ours, theirs) in enumerate(zip(out.tokens, case["idx_Bl"], strict=True)):
        assert torch.equal(ours, theirs), f"scale {si} tokens differ"
    # With more_smooth the next inputs are Gumbel-softmax features at a temperature down to 0.0135: they amplify
    # float32 rounding differences of the conv and scan order (logits 5e-6 -> 1.4e-4 over 5 scales, images 2e-4 measured at 1 thread).
    logit_bound, image_bound = (2e-4, 2e-3) if a["more_smooth"] else (1e-4, 1e-4)
    for ours, theirs in zip(seen, case["logits_BlV"], strict=True):
        assert (ours - theirs).abs().max() <= logit_bound
    assert (out.images - case["img"]).abs().max() <= image_bound


def test_stateful_and_rescan_samplers_give_identical_tokens(fresh_mvar_pipe):
    var = fresh_mvar_pipe.var
    runs = {}
    for rescan in (False, True):
        var.rescan = rescan
        runs[rescan] = fresh_mvar_pipe.generate([1, 4, 8, -1, 6, 2], seed=[3, 4, 5, 6, 7, 8], cfg=3.0, top_k=0,
                                                top_p=0.0, progress=False, timings=True)
    for ours, theirs in zip(runs[False].tokens, runs[True].tokens, strict=True):
        assert torch.equal(ours, theirs)
    assert (runs[False].images - runs[True].images).abs().max() <= 1e-5
    # the carried state is fixed-size: per block conv rows [2B, 3, 384] + SSM state [2B, 4, 64, 64], float32
    rows = 12
    assert runs[False].timings["mamba_state_bytes"] == 2 * rows * (3 * 384 + 4 * 64 * 64) * 4
    assert runs[True].timings["mamba_state_bytes"] == 2 * rows * 66 * 128 * 4  # the re-scanned prefix: all tokens


def _sequential(x, dt, A, B, C, state):
    """S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T, y_t = S_t C_t: one step after another."""
    ys = []
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A)[:, :, None, None]
        state = decay * state + dt[:, t, :, None, None] * x[:, t, :, :, None] * B[:, t, None, None, :]
        ys.append((state * C[:, t, None, None, :]).sum(-1))
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("chunks", [[1, 4, 9, 16, 7], 5, 37, 1], ids=["scales", "by5", "one", "by1"])
def test_chunked_scan_equals_sequential_recurrence_fp64(chunks):
    gen = torch.Generator().manual_seed(0)
    b, L, H, P, N = 2, 37, 3, 5, 4
    x = torch.randn(b, L, H, P, generator=gen, dtype=torch.float64)
    dt = torch.nn.functional.softplus(torch.randn(b, L, H, generator=gen, dtype=torch.float64))
    A = -torch.rand(H, generator=gen, dtype=torch.float64) * 4 - 0.1
    B, C = (torch.randn(b, L, N, generator=gen, dtype=torch.float64) for _ in range(2))
    initial = torch.randn(b, H, P, N, generator=gen, dtype=torch.float64)
    expected_y, expected_state = _sequential(x, dt, A, B, C, initial)
    y, state = ssd_scan(x, dt, A, B, C, chunks, initial)
    torch.testing.assert_close(y, expected_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, expected_state, rtol=1e-12, atol=1e-12)
    y0, _ = ssd_scan(x, dt, A, B, C, chunks)
    torch.testing.assert_close(y0, _sequential(x, dt, A, B, C, torch.zeros_like(initial))[0], rtol=1e-12, atol=1e-12)


def test_scan_refuses_chunks_that_do_not_cover_the_sequence():
    x, dt, B = torch.zeros(1, 5, 1, 2), torch.ones(1, 5, 1), torch.zeros(1, 5, 3)
    with pytest.raises(ValueError, match="sum to the sequence length 5"):
        ssd_scan(x, dt, -torch.ones(1), B, B, [2, 2])


def test_mamba2_continued_in_pieces_equals_one_call():
    """The conv reads rows carried across calls (pieces shorter than the conv too) and the SSM continues."""
    torch.manual_seed(0)
    layer = Mamba2(64, d_state=8, headdim=16).double()
    with torch.no_grad():
        for p in (layer.dt_bias, layer.conv1d.bias, layer.norm.weight):
            p.normal_(0, 0.3)
        u = torch.randn(2, 23, 64, dtype=torch.float64)
        whole = layer(u, 256)
        state = layer.empty_state(2, torch.float64, "cpu")
        pieces = [layer(u[:, a:b], [b - a], state) for a, b in ((0, 1), (1, 2), (2, 6), (6, 15), (15, 23))]
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=1e-10, atol=1e-10)
    assert state.conv_BKD.shape == (2, 3, layer.conv_dim) and state.ssm_BHPN.shape == (2, 8, 16, 8)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_half_precision_sampling_runs_close_to_fp32(ref_dir, mvar_pipe, mvar_reference, dtype):
    import litevar

    pipe = litevar.load_pipeline(ref_dir / "mvar_tiny_var.pth", ref_dir / "tiny_vae.pth", dtype=dtype)
    ref = mvar_reference
    with torch.no_grad():
        logits = pipe.var(ref["mvar.teacher_labels"], ref["mvar.teacher_input"])
    assert logits.dtype == torch.float32
    assert (logits - ref["mvar.teacher_logits"]).abs().max() <= 0.15  # bf16 has 8 mantissa bits; logits up to ~4
    out = pipe.generate([0, 3], seed=0, progress=False)
    assert out.images.shape == (2, 3, 96, 96) and torch.isfinite(out.images).all()
