import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from litevar.cli import main
from litevar.eval.evaluate import EvalSettings, evaluate, write_report
from litevar.eval.fidelity import FidelityAccumulator, image_fidelity
from litevar.eval.tables import compare_markdown


@pytest.fixture(scope="module")
def tiny_args(ref_dir):
    return dict(var_ckpt=ref_dir / "tiny_var.pth", vae_ckpt=ref_dir / "tiny_vae.pth", config=ref_dir / "tiny_config.json")


def _run(recipe, tiny_args, **kw):
    settings = EvalSettings(per_class=1, classes=[0, 3, 7, 9], batch_size=2, cache_dir=None, **kw)
    return evaluate(recipe, settings, **tiny_args, progress=False)


def test_dense_against_itself_is_the_identity(tiny_args):
    fid = _run(None, tiny_args)["fidelity"]
    assert fid["token_agreement_per_scale"] == [1.0] * 5 and fid["token_agreement"] == 1.0
    assert fid["kl_per_scale"] == [0.0] * 5 and fid["kl_mean"] == 0.0
    assert fid["psnr_db"] == math.inf and fid["ssim"] == 1.0 and fid["identical_images"] == 1.0
    assert fid["fd_to_reference"] == 0.0


@pytest.mark.slow
def test_bf16_diverges_a_little(tiny_args):
    fid = _run("bf16", tiny_args)["fidelity"]
    assert 0 < fid["kl_mean"] < 1e-3
    assert all(kl >= 0 for kl in fid["kl_per_scale"])
    assert fid["token_agreement_per_scale"][0] == 1.0
    assert 25 < fid["psnr_db"] < math.inf and 0.9 < fid["ssim"] < 1.0


def test_score_tokens_replays_the_sampled_logits(tiny_pipe):
    seen, replayed = {}, {}
    out = tiny_pipe.generate([1, 2], seed=[5, 6], progress=False, on_logits=lambda si, lg: seen.setdefault(si, lg.clone()))
    tiny_pipe.score_tokens([1, 2], out.tokens, lambda si, lg: replayed.setdefault(si, lg.clone()))
    assert sorted(seen) == sorted(replayed) == list(range(5))
    for si in seen:
        assert torch.equal(seen[si], replayed[si])
    with pytest.raises(ValueError, match="one \\[B, pn\\*pn\\] tensor per scale"):
        tiny_pipe.score_tokens([1, 2], out.tokens[:-1], lambda si, lg: None)


def test_accumulator_and_image_metrics_by_hand():
    acc = FidelityAccumulator([1, 4])
    acc.add_tokens([torch.tensor([[1], [2]]), torch.zeros(2, 4)], [torch.tensor([[1], [3]]), torch.zeros(2, 4)])
    uniform = torch.zeros(1, 1, 2).log_softmax(-1)
    acc.add_kl(1, uniform, torch.tensor([[[0.0, math.log(3)]]]))
    result = acc.result()
    assert result["token_agreement_per_scale"] == [0.5, 1.0] and result["token_agreement"] == 0.9
    expected = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert result["kl_per_scale"][1] == pytest.approx(expected)
    a = np.zeros((2, 8, 8, 3), np.uint8)
    b = a.copy()
    b[1] = 10
    metrics = image_fidelity(a, b)
    assert metrics["psnr_db"] == pytest.approx(10 * math.log10(255 ** 2 / 50.0))
    assert metrics["identical_images"] == 0.5


def _image_folder(root, size):
    rng = np.random.RandomState(0)
    for c in range(10):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(2):
            Image.fromarray(rng.randint(0, 256, (size, size, 3), dtype=np.uint8)).save(root / f"c{c}" / f"{i}.png")
    return root


@pytest.mark.slow
def test_report_with_data_json_markdown_and_compare(tmp_path, tiny_args, tiny_pipe):
    data = _image_folder(tmp_path / "data", tiny_pipe.config.vae.image_size)
    report = _run("bf16", tiny_args, data=str(data))
    for key in ("fd_effl0", "precision", "recall"):
        assert key in report["quality"] and key in report["reference"]["quality"]
    assert report["inception"]["computed"] is False and "--inception-weights" in report["inception"]["note"]
    json_path, md_path = write_report(report, tmp_path / "eval_bf16.json")
    again = json.loads(json_path.read_text())
    assert again["litevar_eval"] == 1 and again["recipe"]["dtype"] == "bf16"
    assert len(again["fidelity"]["token_agreement_per_scale"]) == 5
    assert "| FD-EffLite0 vs data |" in md_path.read_text()
    identity = _run(None, tiny_args)
    write_report(identity, tmp_path / "eval_fp32.json")
    assert json.loads((tmp_path / "eval_fp32.json").read_text())["fidelity"]["psnr_db"] == "inf"
    table = compare_markdown([identity, report])
    assert "| fp32 | bf16 |" in table.splitlines()[0] and "not comparable" not in table


def test_eval_cli_writes_resumes_and_rejects_bad_input(tmp_path, ref_dir, capsys):
    model = ["--var-ckpt", str(ref_dir / "tiny_var.pth"), "--vae-ckpt", str(ref_dir / "tiny_vae.pth"),
             "--config", str(ref_dir / "tiny_config.json")]
    base = ["eval", *model, "--classes", "1,2", "--per-class", "1", "--batch-size", "2", "--no-progress",
            "--out", str(tmp_path / "ev")]
    assert main(base + ["--recipe", "fp32"]) == 0
    assert (tmp_path / "ev" / "eval_fp32.json").exists() and list((tmp_path / "ev" / "cache").glob("reference_*.npz"))
    assert main(base + ["--recipe", "fp32"]) == 2
    assert "exists" in capsys.readouterr().err
    assert main(["eval", "--compare", str(tmp_path / "ev" / "eval_fp32.json")]) == 0
    assert "(identity)" in capsys.readouterr().out
    (tmp_path / "r.json").write_text(json.dumps({"dtype": "bf16", "windows": 3}))
    for bad, message in [(["--per-class", "0"], "--per-class"), (["--batch-size", "0"], "--batch-size"),
                         (["--recipe", str(tmp_path / "r.json")], "unknown recipe keys"),
                         (["--data", str(tmp_path / "nowhere")], "does not exist"),
                         (["--classes", "12"], "out of range")]:
        assert main(base + ["--name", "bad"] + bad) == 2, bad
        assert message in capsys.readouterr().err


def test_jobs_match_the_sample_layout():
    assert EvalSettings(per_class=2, classes=[3, 5], seed=7).jobs(10).pairs() == [(3, 7), (3, 8), (5, 9), (5, 10)]
    assert EvalSettings(per_class=1).jobs(3).pairs() == [(0, 0), (1, 1), (2, 2)]
    with pytest.raises(ValueError, match="`per_class` must be a positive integer"):
        EvalSettings(per_class=0)
    with pytest.raises(ValueError, match="`data` together with `inception_weights`"):
        EvalSettings(inception_weights="pt_inception.pth")


def test_inception_needs_local_weights(tmp_path):
    from litevar.eval.inception import inception_scores

    images = np.zeros((2, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="not found; `inception_weights` must be the path"):
        inception_scores(tmp_path / "pt_inception.pth", images, images)
