"""The per-CPU probe of decoder-int8: choices from (fake) timings, the gate, the cache, the recipe step, save/load.

Timings come from an injected fake timer (the functions it is given are never run), so no result depends on the
machine's speed; the gate is forced open or shut where a test needs it.
"""
from __future__ import annotations

import json
import platform

import pytest
import torch
import torch.nn as nn

import litevar
from litevar.quant import probe
from litevar.quant.conv import Int8Conv2d, Int8Upsample2x
from litevar.quant.decoder import DecoderInt8Config, quantize_decoder_
from litevar.quant.io import load_quantized, save_quantized
from litevar.quant.conv import ACT_SPEC
from litevar.quant.probe import ConvCall, decoder_calls, describe, int8_gate, probe_decoder
from litevar.quant.runtime import int8_dot_exact
from litevar.recipe import RecipeError, apply_recipe, load_recipe

PROBE = {"type": "decoder-int8", "select": "probe", "calib_samples": 1}


def fresh(ref_dir):
    return litevar.load_pipeline(ref_dir / "tiny_var.pth", ref_dir / "tiny_vae.pth",
                                 config=ref_dir / "tiny_config.json", dtype="bf16")


def fake_int8_ms(call: ConvCall) -> float:
    """The fake machine: int8 pays on long 3x3 reductions, is 3% faster (inside the 5% margin) on 1x1
    convolutions, and slower elsewhere; float always takes 1 ms."""
    if call.weight[2] == 1:
        return 0.97
    return 0.6 if call.reduction() >= 64 * 9 and not call.upsample else 1.4


class FakeTimer:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, variant, call, fn) -> float:
        self.calls += 1
        return 1e-3 * (fake_int8_ms(call) if variant == "int8" else 1.0)


def expected(vae, skip=()) -> list[str]:
    return [n for n, c in decoder_calls(vae).items() if n not in skip and fake_int8_ms(c) <= 0.95]


@pytest.fixture(scope="module")
def shared(ref_dir):
    """A bf16 tiny model that the tests here only read (loading one costs ~2 s)."""
    return fresh(ref_dir)


@pytest.fixture
def open_gate(monkeypatch):
    monkeypatch.setattr(probe, "int8_gate", lambda device="cpu": None)


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LITEVAR_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / probe.CACHE_SUBDIR


def test_fake_timer_chooses_int8_exactly_where_faster(shared, open_gate, cache):
    pipe = shared
    timer = FakeTimer()
    result = probe_decoder(pipe.vae, batch=2, repeats=3, timer=timer)
    calls = decoder_calls(pipe.vae)
    assert result.gate is None and result.cache == "miss"
    assert result.chosen == expected(pipe.vae)
    assert 0 < len(result.chosen) < len(calls)  # both outcomes occur on the tiny decoder
    assert timer.calls == len({c.label() for c in calls.values()}) * 2 * (1 + 3)  # warm-up + 3 alternating
    one_by_one = next(n for n, c in calls.items() if c.weight[2] == 1)
    assert not result.convs[one_by_one]["int8"] and result.convs[one_by_one]["ratio"] == 0.97  # within margin
    assert result.to_dict()["convs"][result.chosen[0]]["float_ms"] == 1.0
    assert probe_decoder(pipe.vae, batch=2, margin=0.0, timer=timer, use_cache=False).chosen == [
        n for n, c in calls.items() if fake_int8_ms(c) < 1]  # margin 0: every faster one


def test_cache_round_trip_and_keys(shared, open_gate, cache, monkeypatch):
    pipe = shared
    calls = decoder_calls(pipe.vae)
    monkeypatch.setattr(probe, "decoder_calls", lambda vae: calls)  # one decode (~0.5 s) for the 7 probes here
    timer = FakeTimer()
    first = probe_decoder(pipe.vae, batch=1, timer=timer)
    assert first.cache == "miss" and [p.parent for p in cache.glob("*.json")] == [cache]
    stored = json.loads(next(cache.glob("*.json")).read_text())
    assert stored["key"]["cpu"] == probe.cpu_identity() and stored["key"]["batch"] == 1
    assert stored["key"]["torch"] == torch.__version__ and stored["key"]["dtype"] == "bfloat16"
    spent = timer.calls
    second = probe_decoder(pipe.vae, batch=1, timer=timer)
    assert second.cache == "hit" and timer.calls == spent and second.chosen == first.chosen
    assert second.convs == first.convs
    assert probe_decoder(pipe.vae, batch=4, timer=timer).cache == "miss"  # another batch: measured again
    other = {**probe.cpu_identity(), "model": "Some Other CPU", "flags": ["avx2", "avx512_vnni"]}
    monkeypatch.setattr(probe, "cpu_identity", lambda: other)
    spent = timer.calls
    assert probe_decoder(pipe.vae, batch=1, timer=timer).cache == "miss" and timer.calls > spent
    assert len(list(cache.glob("*.json"))) == 3
    path = probe_decoder(pipe.vae, batch=1, timer=timer).cache_file
    with open(path, "w") as f:
        f.write("{truncated")
    with pytest.warns(UserWarning, match="unreadable"):
        assert probe_decoder(pipe.vae, batch=1, timer=timer).cache == "miss"
    stored = json.loads(open(path).read())
    stored["timings"][next(iter(stored["timings"]))]["int8_ms"] = []
    with open(path, "w") as f:
        json.dump(stored, f)
    assert probe_decoder(pipe.vae, batch=1, timer=timer).cache == "miss"  # a damaged entry: measured again
    with open(path, "w") as f:
        f.write("[1, 2]")
    assert probe_decoder(pipe.vae, batch=1, timer=timer).cache == "miss"
    assert probe_decoder(pipe.vae, batch=1, timer=timer).cache == "hit"


def test_shut_gate_keeps_float_and_says_why(shared, cache, monkeypatch):
    pipe = shared
    monkeypatch.setattr(probe, "int8_gate", lambda device="cpu": "no exact int8 here")
    timer = FakeTimer()
    result = probe_decoder(pipe.vae, timer=timer)
    assert result.chosen == [] and result.gate == "no exact int8 here" and timer.calls == 0
    assert all(v["why"] == "gate: no exact int8 here" for v in result.convs.values())
    assert not cache.exists()  # nothing measured, nothing cached
    assert "float everywhere: no exact int8 here" in describe(result.to_dict())
    assert "cuda" in int8_gate("cuda")


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="the flag rule is x86's")
def test_the_kernel_is_exact_on_this_cpus_input_grid():
    """8-bit inputs where the CPU has an exact 8-bit dot product, else 7-bit: oneDNN's kernel is exact on both."""
    ops = torch.ops.onednn
    if not (torch.backends.mkldnn.is_available() and hasattr(ops, "qconv2d_pointwise")):
        pytest.skip("no oneDNN int8 convolution in this build")
    assert ACT_SPEC.bits == (8 if int8_dot_exact() else 7) and ACT_SPEC.qmax == 2 ** ACT_SPEC.bits - 1
    assert probe.int8_conv_kernel_exact() and int8_gate("cpu") is None


def test_select_probe_converts_exactly_the_probe_choice(ref_dir, shared, open_gate, cache, monkeypatch):
    monkeypatch.setattr(probe, "wall_clock", FakeTimer())  # the default timer of the recipe step
    pipe = fresh(ref_dir)
    want = expected(pipe.vae, skip={"mid.block_1.conv1"})
    apply_recipe(pipe, load_recipe({"dtype": "bf16", "steps": [{**PROBE, "skip": ["mid.block_1.conv1"]}]}))
    decoder = pipe.vae.decoder
    got = [n for n, m in decoder.named_modules() if isinstance(m, Int8Conv2d)]
    assert got == want and isinstance(decoder.mid.block_1.conv1, nn.Conv2d)
    report = pipe.decoder_int8_report
    assert report["select"] == "probe" and report["chosen"] == want and report["cache"] == "miss"
    assert report["convs"]["mid.block_1.conv1"]["why"] == "skip"
    assert len(report["convs"]) == len(decoder_calls(shared.vae))
    assert all(("ratio" in v) == (n != "mid.block_1.conv1") for n, v in report["convs"].items())
    assert f"{len(want)}/{len(report['convs'])} convolutions on int8" in describe(report)


def test_saved_probe_choice_loads_on_another_machine(ref_dir, shared, open_gate, cache, monkeypatch, tmp_path):
    monkeypatch.setattr(probe, "wall_clock", FakeTimer())
    recipe = load_recipe({"dtype": "bf16", "steps": [PROBE]})
    pipe = apply_recipe(fresh(ref_dir), recipe)
    chosen = pipe.decoder_int8_report["chosen"]
    assert chosen and not any(name.endswith("upsample.conv") for name in chosen)  # the fake keeps them float
    save_quantized(pipe, recipe, tmp_path / "q")
    monkeypatch.setattr(probe, "int8_gate", lambda device="cpu": "another machine")  # would choose nothing
    loaded, _ = load_quantized(tmp_path / "q")
    assert [n for n, m in loaded.vae.decoder.named_modules() if isinstance(m, Int8Conv2d)] == chosen
    assert not any(isinstance(m, Int8Upsample2x) for m in loaded.vae.decoder.modules())
    tokens = pipe.generate([1], seed=[0], progress=False).tokens
    assert torch.equal(pipe.vae.idx_to_img(tokens), loaded.vae.idx_to_img(tokens))
    with pytest.raises(ValueError, match="skeleton needs the names"):
        quantize_decoder_(shared, DecoderInt8Config(select="probe"), skeleton=True)  # refused before any change


def test_rule_is_still_the_default(ref_dir):
    pipe = fresh(ref_dir)
    with pytest.warns(UserWarning, match="stays in float"):
        apply_recipe(pipe, load_recipe({"dtype": "bf16", "steps": [{"type": "decoder-int8"}]}))
    report = pipe.decoder_int8_report
    assert report["select"] == "rule" and report["chosen"] == []
    assert report["convs"]["conv_in"]["why"] == "reduction 72 < 2048"


@pytest.mark.parametrize("fields, key", [({"select": "fast"}, "select"), ({"select": "probe", "probe_batch": 0},
                                          "probe_batch"), ({"select": "probe", "probe_batch": True}, "probe_batch"),
                                         ({"select": "probe", "probe_margin": 1.0}, "probe_margin"),
                                         ({"select": "probe", "probe_margin": -0.1}, "probe_margin"),
                                         ({"probe_batch": 8}, "probe_batch"), ({"probe_margin": 0.1}, "probe_margin"),
                                         ({"select": "probe", "min_reduction": 0}, "min_reduction")])
def test_bad_probe_fields_are_refused(fields, key):
    with pytest.raises(RecipeError, match=key):
        load_recipe({"dtype": "bf16", "steps": [{"type": "decoder-int8", **fields}]})
