"""The FLOP counter against closed forms on the tiny reference model, and its registry."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import litevar
from litevar import flops as fl
from litevar.eval.generation_flops import count_generation_flops


@pytest.fixture(scope="module")
def tiny(ref_dir):
    return {dtype: litevar.load_pipeline(ref_dir / "tiny_var.pth", ref_dir / "tiny_vae.pth",
                                         config=ref_dir / "tiny_config.json", dtype=dtype) for dtype in ("fp32", "bf16")}


@torch.library.custom_op("litevar_test::toy_gathered_attention", mutates_args=())
def toy_gathered_attention(q: torch.Tensor, k: torch.Tensor, keep: int) -> torch.Tensor:
    return q @ k[..., :keep, :].transpose(-1, -2)


@torch.library.custom_op("litevar_test::toy_matmul", mutates_args=())
def toy_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b


def linear_calls(module: nn.Module) -> tuple[list, list]:
    """Hooks that record 2 * tokens * in * out for every nn.Linear call."""
    calls: list[int] = []
    handles = [m.register_forward_hook(lambda m, a, o: calls.append(2 * a[0].numel() // m.in_features * m.in_features
                                                                    * m.out_features))
               for m in module.modules() if isinstance(m, nn.Linear)]
    return calls, handles


def test_teacher_forced_linear_and_attention_closed_form(tiny):
    pipe = tiny["fp32"]
    cfg = pipe.config.var
    B, L, C, H, d, V, Cv = 2, cfg.seq_len, cfg.width, cfg.heads, cfg.head_dim, cfg.vocab_size, cfg.z_channels
    labels = torch.tensor([1, 3])
    x = torch.randn(B, L - 1, Cv)
    calls, handles = linear_calls(pipe.var)
    try:
        with torch.inference_mode(), fl.FlopCounter() as counter:
            pipe.var(labels, x)
    finally:
        for h in handles:
            h.remove()
    closed = (2 * B * (cfg.depth * 6 * C * C + 2 * C * C) + 2 * B * (L - 1) * Cv * C
              + 2 * B * L * (cfg.depth * (3 * C * C + C * C + 2 * C * cfg.hidden) + C * V))
    assert counter.totals["linear"] == sum(calls) == closed
    assert counter.totals["attention"] == cfg.depth * 4 * B * H * L * L * d  # masked: every pair counted
    assert counter.totals["decoder"] == counter.totals["other"] == 0
    assert not counter.uncounted


def test_sampling_closed_forms(tiny):
    pipe = tiny["fp32"]
    cfg, vae = pipe.config.var, pipe.config.vae
    B, C, H, d, V, Cv, depth = 2, cfg.width, cfg.heads, cfg.head_dim, cfg.vocab_size, cfg.z_channels, cfg.depth
    report = count_generation_flops(pipe, [1, 2], [0, 1])
    lengths = [pn * pn for pn in cfg.patch_nums]
    seen = [sum(lengths[:s + 1]) for s in range(len(lengths))]
    attention = sum(4 * 2 * B * H * l * Ls * d for l, Ls in zip(lengths, seen)) * depth
    linear = (2 * 2 * B * (depth * 6 * C * C + 2 * C * C)
              + sum(2 * 2 * B * l * (depth * (4 * C * C + 2 * C * cfg.hidden) + C * V) for l in lengths)
              + sum(2 * B * l * Cv * C for l in lengths[1:]))
    side = cfg.patch_nums[-1]
    phi = len(lengths) * 2 * B * Cv * side * side * Cv * 9
    assert report["images"] == B
    assert report["attention"] * B == attention
    assert report["linear"] * B == linear
    assert report["other"] * B == phi
    assert report["decoder"] > 0 and not report["uncounted"]
    assert report["total"] == sum(report[b] for b in fl.BUCKETS)
    per_scale = report["per_scale"]
    assert len(per_scale) == len(lengths)
    assert sum(s["attention"] for s in per_scale) == report["attention"]
    assert per_scale[-1]["attention"] * B == 4 * 2 * B * H * lengths[-1] * seen[-1] * d * depth
    assert vae.z_channels == Cv


def test_decoder_bucket_matches_its_convolutions_and_attention(tiny):
    pipe = tiny["fp32"]
    convs: list[int] = []
    attn: list[int] = []
    modules = list(pipe.vae.decoder.modules()) + [pipe.vae.post_quant_conv]
    handles = [m.register_forward_hook(lambda m, a, o: convs.append(2 * o.numel() * m.weight[0].numel()))
               for m in modules if isinstance(m, nn.Conv2d)]
    handles += [m.register_forward_hook(lambda m, a, o: attn.append(4 * o.shape[0] * (o.shape[2] * o.shape[3]) ** 2 * m.channels))
                for m in modules if type(m).__name__ == "AttnBlock"]
    try:
        report = count_generation_flops(pipe, [4], [7])
    finally:
        for h in handles:
            h.remove()
    assert attn and report["decoder"] == sum(convs) + sum(attn)


def test_bf16_counts_the_same_as_fp32(tiny):
    fp32 = count_generation_flops(tiny["fp32"], [1, 2], [0, 1])
    bf16 = count_generation_flops(tiny["bf16"], [1, 2], [0, 1])
    for key in (*fl.BUCKETS, "total", "per_scale"):
        assert fp32[key] == bf16[key], key
    assert not bf16["uncounted"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_sdpa_runs_the_cpu_flash_kernel_and_is_counted(dtype, mask):
    q, k, v = (torch.randn(2, 3, n, 16, dtype=dtype) for n in (5, 7, 7))
    attn_mask = {None: None, "bool": torch.ones(5, 7, dtype=torch.bool), "float": torch.zeros(5, 7, dtype=dtype)}[mask]
    for inference in (True, False):
        with torch.inference_mode(inference), fl.FlopCounter() as counter:
            F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        assert list(counter.by_op) == ["aten._scaled_dot_product_flash_attention_for_cpu.default"]
        assert counter.totals["attention"] == 4 * 2 * 3 * 5 * 7 * 16


def test_causal_kernel_counts_the_pairs_it_computes():
    q = torch.randn(1, 1, 4, 8)
    with fl.FlopCounter() as counter:
        F.scaled_dot_product_attention(q, q, q, is_causal=True)
    assert counter.totals["attention"] == 4 * (1 + 2 + 3 + 4) * 8


def test_int_mm_conv_and_quantized_kernels():
    a = torch.randint(-8, 8, (32, 64), dtype=torch.int8)
    b = torch.randint(-8, 8, (64, 16), dtype=torch.int8)
    with fl.FlopCounter() as counter:
        torch._int_mm(a, b)
        F.conv_transpose2d(torch.randn(1, 4, 5, 5), torch.randn(4, 6, 3, 3))
    assert counter.by_op["aten._int_mm.default"]["flops"] == 2 * 32 * 16 * 64
    assert counter.by_op["aten.convolution.default"]["flops"] == 2 * 4 * 25 * 6 * 9
    assert counter.totals == {"attention": 0, "linear": 2 * 32 * 16 * 64, "decoder": 0, "other": 2 * 4 * 25 * 6 * 9}
    x, w = torch.randn(5, 64), torch.randint(-8, 8, (32, 64), dtype=torch.int8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dynamic = torch.ao.quantization.quantize_dynamic(nn.Sequential(nn.Linear(64, 32)), {nn.Linear}, dtype=torch.qint8)
    with torch.inference_mode(), fl.FlopCounter() as counter:
        torch.ops.aten._weight_int8pack_mm(x.bfloat16(), w, torch.rand(32).bfloat16())
        dynamic(x)
    assert counter.totals["linear"] == 2 * (2 * 5 * 32 * 64) and not counter.uncounted


def test_count_as_and_registered_formula():
    q, k = torch.randn(2, 6, 8), torch.randn(2, 10, 8)
    op = torch.ops.litevar_test.toy_gathered_attention.default
    fl.register_flop_formula(op, lambda args, kwargs, out: 2 * out.numel() * args[0].shape[-1], "attention")
    try:
        with fl.FlopCounter() as counter:
            toy_gathered_attention(q, k, 4)
            with fl.count_as("attention"):
                torch.bmm(q, k.transpose(1, 2))
    finally:
        del fl.FORMULAS[op]
    assert counter.by_op[str(op)] == {"calls": 1, "flops": 2 * 2 * 6 * 4 * 8}
    assert counter.totals["attention"] == 2 * 2 * 6 * 4 * 8 + 2 * 2 * 6 * 10 * 8
    assert counter.totals["linear"] == 0 and not counter.uncounted
    with pytest.raises(ValueError, match="bucket"):
        fl.register_flop_formula(op, lambda *a: 0, "nowhere")


def test_unknown_matmul_like_op_is_reported():
    with fl.FlopCounter() as counter:
        toy_matmul(torch.randn(3, 4), torch.randn(4, 5))
        F.interpolate(torch.randn(1, 2, 4, 4), scale_factor=2, mode="bilinear")
    assert dict(counter.uncounted) == {"litevar_test.toy_matmul.default": 1}
    assert counter.total == 0


def test_names_that_look_like_compute():
    aten = torch.ops.aten
    assert fl.looks_like_compute(aten._weight_int4pack_mm_for_cpu.default)
    assert fl.looks_like_compute(aten.mkldnn_convolution.default)
    assert not fl.looks_like_compute(aten.upsample_bilinear2d.default)
    assert not fl.looks_like_compute(torch.ops.prims.convert_element_type.default)
