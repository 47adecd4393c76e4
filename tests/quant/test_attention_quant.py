"""LiteVAR's simulated 8-bit attention: close to dense at 8 bits, worse at fewer, on the softmax grid, wired by recipe."""
from __future__ import annotations

import pytest
import torch

import litevar
from litevar.attention.components import AttentionComponents
from litevar.attention.context import AttnContext
from litevar.attention.dense import DenseAttnProcessor
from litevar.attention.processor import ComposedAttnProcessor
from litevar.quant.attention import SOFTMAX_LEVELS, AttnPrecision
from litevar.recipe import RecipeError, apply_recipe, load_recipe


def _fresh(ref_dir):
    return litevar.load_pipeline(ref_dir / "tiny_var.pth", ref_dir / "tiny_vae.pth", config=ref_dir / "tiny_config.json")


def QuantAttnProcessor(bits):
    return ComposedAttnProcessor(AttentionComponents(precision=AttnPrecision(bits)))


def _attn_error(pipe, processor) -> float:
    torch.manual_seed(0)
    attn = pipe.var.blocks[0].attn
    x = torch.randn(2, pipe.var.cfg.seq_len, pipe.var.cfg.width)
    ctx = AttnContext(attn_bias=pipe.var.attn_bias_for_masking)
    with torch.no_grad():
        dense = DenseAttnProcessor()(attn, x, ctx)
        return float((processor(attn, x, ctx) - dense).norm() / dense.norm())


def test_8bit_attention_is_close_to_dense_and_degrades_with_fewer_bits(tiny_pipe):
    err8, err4 = _attn_error(tiny_pipe, QuantAttnProcessor(8)), _attn_error(tiny_pipe, QuantAttnProcessor(4))
    assert 0 < err8 < 0.05
    assert err4 > 2 * err8


def test_probabilities_are_on_the_static_softmax_grid(tiny_pipe, monkeypatch):
    seen = []
    real_matmul = torch.Tensor.__matmul__

    def spy(a, b):
        out = real_matmul(a, b)
        seen.append(a)
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    _attn_error(tiny_pipe, QuantAttnProcessor(8))
    probs = seen[1]  # q @ k^T first, then probs @ v
    assert torch.equal(probs * SOFTMAX_LEVELS, torch.round(probs * SOFTMAX_LEVELS))
    assert probs.max() <= (SOFTMAX_LEVELS - 1) / SOFTMAX_LEVELS


def test_recipe_sets_the_processor_and_generates(ref_dir):
    pipe = apply_recipe(_fresh(ref_dir), load_recipe({"dtype": "fp32", "steps": [
        {"type": "litevar-mp", "w_bits": 8, "a_bits": 8, "attn_bits": 8}]}))
    assert isinstance(pipe.attention.precision, AttnPrecision) and pipe.attention.owners["precision"] == "litevar-mp"
    assert all(b.attn.processor.components is pipe.attention for b in pipe.var.blocks)
    dense = _fresh(ref_dir).generate([1, 2], seed=[0, 1], progress=False)
    out = pipe.generate([1, 2], seed=[0, 1], progress=False)
    assert [t.shape for t in out.tokens] == [t.shape for t in dense.tokens]
    assert torch.isfinite(out.images).all()


@pytest.mark.parametrize("step, word", [
    ({"type": "rtn", "attn_bits": 1}, "attn_bits"),
])
def test_bad_attention_bits_rejected(tiny_pipe, step, word):
    with pytest.raises((ValueError, RecipeError), match=word):
        apply_recipe(tiny_pipe, load_recipe({"dtype": "fp32", "steps": [step]}))
