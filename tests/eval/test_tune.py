"""``litevar tune`` on the tiny model: a constructed space whose best recipe is known without measuring."""
from __future__ import annotations

import json

import pytest

from litevar.cli import main
from litevar.eval import tune as tune_mod
from litevar.eval.tune import TuneSettings, load_space, pareto_front, tune

SKIP_ALL = {"type": "guidance", "skip_uncond_from": 0}  # no unconditional rows anywhere: half the transformer work
PRUNE = {"type": "token-prune", "scales": [-1], "from_layer": 1, "keep": 0.5}
H2O = {"type": "kv-compress", "policy": "h2o", "ratio": 0.5}
SPACE = {"litevar_tune_space": 1, "dtype": "fp32",
         "slots": [[None, {"type": "guidance"}, SKIP_ALL], [None, PRUNE], [None, H2O]]}


@pytest.fixture
def settings(ref_dir):
    return TuneSettings(var_ckpt=str(ref_dir / "tiny_var.pth"), vae_ckpt=str(ref_dir / "tiny_vae.pth"),
                        config=str(ref_dir / "tiny_config.json"), classes=(0, 1), proxy_per_class=1, per_class=2,
                        finalists=12)


def _steps(report) -> list[str]:
    return [step["type"] for step in report["chosen"]["steps"]]


def test_without_a_budget_the_least_work_wins_and_refusals_are_kept(settings, tmp_path):
    report = tune(SPACE, settings, tmp_path)
    # skipping every unconditional row and pruning the last scale are the only steps that remove work
    assert _steps(report) == ["guidance", "token-prune"] and report["chosen"]["steps"][0]["skip_uncond_from"] == 0
    refused = [c for c in report["candidates"] if "refused" in c]
    # pruning with H2O (3 combinations) and dropping rows with H2O are refused by the recipe layer
    assert len(refused) == 4 and all("token-prune" in c["refused"] or "guidance" in c["refused"] for c in refused)
    assert len(report["candidates"]) == 12
    assert (tmp_path / "pareto.png").stat().st_size > 0
    assert json.loads((tmp_path / "chosen_recipe.json").read_text())["steps"] == report["chosen"]["steps"]


def test_an_exactness_budget_keeps_a_recipe_equal_to_dense(settings, tmp_path):
    report = tune(SPACE, TuneSettings(**{**settings.__dict__, "min_agreement": 1.0}), tmp_path)
    assert _steps(report) in ([], ["guidance"])  # dense, or the default schedule (dense exactly)
    chosen = next(c for c in report["candidates"] if c["name"] == report["chosen"]["name"])
    assert chosen["final"]["fidelity"]["token_agreement"] == 1.0


def test_a_rerun_resumes_from_the_saved_candidates(settings, tmp_path, monkeypatch):
    space = {**SPACE, "slots": [[None, SKIP_ALL]]}
    first = tune(space, settings, tmp_path)
    monkeypatch.setattr(tune_mod, "_evaluate", lambda *a, **k: pytest.fail("measured again"))
    monkeypatch.setattr(tune_mod, "_speed", lambda *a, **k: pytest.fail("measured again"))
    assert tune(space, settings, tmp_path)["candidates"] == first["candidates"]


def test_pareto_front_keeps_the_undominated():
    def entry(name, speed, agree):
        return {"name": name, "speed": {"speedup": speed}, "proxy": {"fidelity": {"token_agreement": agree}}}
    entries = [entry("dense", 1, 1.0), entry("fast", 2, 0.5), entry("worse", 1.5, 0.4), entry("mid", 1.5, 0.8)]
    assert pareto_front(entries) == ["dense", "fast", "mid"]


@pytest.mark.parametrize("space, message", [
    ({"slots": [[None]]}, "litevar_tune_space"),
    ({"litevar_tune_space": 1, "slots": []}, "non-empty"),
    ({"litevar_tune_space": 1, "slots": [[None, "rtn"]]}, "slot 0"),
    ({"litevar_tune_space": 1, "slots": [[None]], "steps": []}, "unknown search-space keys"),
])
def test_bad_spaces_are_refused(space, message):
    with pytest.raises(ValueError, match=message):
        load_space(space)


def test_cli_writes_the_front_and_refuses_bad_values(ref_dir, tmp_path, capsys):
    space = tmp_path / "space.json"
    space.write_text(json.dumps({**SPACE, "slots": [[None, SKIP_ALL]]}))
    model = ["--var-ckpt", str(ref_dir / "tiny_var.pth"), "--vae-ckpt", str(ref_dir / "tiny_vae.pth"),
             "--config", str(ref_dir / "tiny_config.json")]
    assert main(["tune", "--space", str(space), *model, "--classes", "0,1", "--proxy-per-class", "1", "--per-class", "1",
                 "--data", "none", "--out", str(tmp_path / "t")]) == 0
    assert "chosen: fp32+guidance(skip_uncond_from=0)" in capsys.readouterr().out
    assert main(["tune", "--space", str(space), *model, "--min-agreement", "2", "--out", str(tmp_path / "u")]) != 0
    assert "min_agreement must be in [0, 1]" in capsys.readouterr().err
    assert main(["tune", "--space", str(space), *model, "--classes", "0", "--proxy-per-class", "1"]) != 0
    assert "at least 2 images" in capsys.readouterr().err


def test_finalists_are_evaluated_fastest_first_until_one_is_within_the_budget(settings, tmp_path, monkeypatch):
    """The fastest candidate misses the FD budget, the second meets it: the search stops there."""
    space = {**SPACE, "slots": [[None, {"type": "guidance"}, SKIP_ALL], [None, PRUNE]]}
    finals = []

    def fake_evaluate(recipe, _settings, per_class, data, _cache):
        steps = [s["type"] for s in recipe.to_dict()["steps"]]
        if per_class == settings.per_class:
            finals.append(steps)
        fd = 130.0 if steps == ["guidance", "token-prune"] else 101.0  # the least work costs the most quality
        return {"fidelity": {"token_agreement": 0.9, "kl_mean": 0.1, "psnr_db": 20.0},
                "quality": {"fd_effl0": fd, "class_consistency": 0.9},
                "reference_quality": {"fd_effl0": 100.0, "class_consistency": 0.9}, "images": 2}
    monkeypatch.setattr(tune_mod, "_evaluate", fake_evaluate)
    report = tune(space, TuneSettings(**{**settings.__dict__, "data": "fake"}), tmp_path)
    assert finals == [["guidance", "token-prune"], ["guidance"]]  # skip-all+prune fails, skip-all passes: stop
    assert _steps(report) == ["guidance"] and report["chosen"]["steps"][0]["skip_uncond_from"] == 0
    assert sorted(report["finalists"]) == sorted(c["name"] for c in report["candidates"] if "final" in c)


def test_noise_check_measures_dense_on_a_disjoint_seed_set_and_flags_a_budget_within_it(settings, tmp_path,
                                                                                       monkeypatch):
    calls = []

    def fake_evaluate(recipe, _settings, per_class, data, _cache, seed=0):
        calls.append((recipe.to_dict()["steps"], per_class, seed))
        dense_fd = 100.0 if seed == 0 else 103.0  # the seeds alone move dense's FD by 3%
        return {"fidelity": {"token_agreement": 0.9, "kl_mean": 0.1, "psnr_db": 20.0},
                "quality": {"fd_effl0": 110.0, "class_consistency": 0.9},
                "reference_quality": {"fd_effl0": dense_fd, "class_consistency": 0.9}, "images": 4}
    monkeypatch.setattr(tune_mod, "_evaluate", fake_evaluate)
    space = {**SPACE, "slots": [[None, SKIP_ALL]]}
    with pytest.raises(ValueError, match="needs data"):
        TuneSettings(**{**settings.__dict__, "noise_check": True})
    noisy = TuneSettings(**{**settings.__dict__, "data": "fake", "noise_check": True})
    report = tune(space, noisy, tmp_path)
    assert calls[-1] == ([], settings.per_class, 4)  # dense, the finalists' size, seeds after theirs
    noise = report["noise"]
    assert noise["seeds"] == [0, 4] and noise["fd_change"] == pytest.approx(0.03) and noise["cc_change_points"] == 0
    assert noise["budget_within_noise"]  # the 2% FD budget is below the 3% the seeds alone move
    calls.clear()
    assert tune(space, noisy, tmp_path)["noise"] == noise and calls == []  # resumed, nothing measured again
    wide = TuneSettings(**{**noisy.__dict__, "max_fd_increase": 0.05})
    assert not tune(space, wide, tmp_path)["noise"]["budget_within_noise"]  # the saved noise, the new budget
    assert tune(space, settings, tmp_path / "off")["noise"] is None
