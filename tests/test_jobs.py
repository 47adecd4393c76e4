"""One job list and one uint8 conversion: the same flags give the same images in generate, sample, eval and the API."""
import numpy as np
import pytest
import torch
from PIL import Image

from litevar.cli import main
from litevar.cli_args import image_name
from litevar.eval.quality import generate_set
from litevar.images import to_uint8
from litevar.jobs import JobList

FLAGS = ["--classes", "0,3", "--per-class", "3", "--seed", "5", "--batch-size", "4", "--top-k", "16", "--no-progress"]


def test_job_list_is_class_major_with_global_seeds():
    jobs = JobList([3, 1], per_class=2, seed=5)
    assert jobs.pairs() == [(3, 5), (3, 6), (1, 7), (1, 8)]
    assert jobs.labels.dtype == np.int64 and jobs.seeds.tolist() == [5, 6, 7, 8] and len(jobs) == 4
    assert JobList(range(3), samples=4, seed=2).pairs() == [(0, 2), (1, 3), (2, 4), (0, 5)]
    assert JobList([0], per_class=5).chunks(2) == [range(0, 2), range(2, 4), range(4, 5)]
    assert JobList([4, 9], per_class=3).batch(range(2, 4)) == ([4, 9], [2, 3])


@pytest.mark.parametrize("kwargs, message", [
    ({"classes": [], "per_class": 1}, "`classes` must be a non-empty list"),
    ({"classes": [0], "per_class": 0}, "`per_class` must be a positive integer, got 0"),
    ({"classes": [0]}, "give exactly one of `per_class` and `samples`"),
    ({"classes": [0], "per_class": 1, "samples": 2}, "give exactly one of `per_class` and `samples`"),
    ({"classes": [0.5], "samples": 2}, "integer class ids"),
])
def test_bad_job_lists_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        JobList(**kwargs)


def test_to_uint8_rounds_clamps_and_keeps_the_layout():
    images = torch.tensor([-0.1, 0.0, 0.2, 0.5, 1.0, 1.2]).view(1, 1, 6, 1).expand(2, 3, 6, 1)
    out = to_uint8(images)
    assert out.dtype == np.uint8 and out.shape == (2, 6, 1, 3)
    assert out[0, :, 0, 0].tolist() == [0, 0, 51, 128, 255, 255]
    assert np.array_equal(to_uint8(images[0]), out[0])
    bf16 = images.bfloat16()
    assert np.array_equal(to_uint8(bf16), to_uint8(bf16.float()))  # computed in float32 whatever the dtype


def _png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_sample_eval_and_api_give_the_same_images(tmp_path, ref_dir, tiny_pipe):
    model = ["--var-ckpt", str(ref_dir / "tiny_var.pth"), "--vae-ckpt", str(ref_dir / "tiny_vae.pth"),
             "--config", str(ref_dir / "tiny_config.json")]
    assert main(["generate", *model, *FLAGS, "--out", str(tmp_path / "gen")]) == 0
    assert main(["sample", *model, *FLAGS, "--out", str(tmp_path / "sample")]) == 0
    jobs = JobList([0, 3], per_class=3, seed=5)
    generated = sorted(p.name for p in (tmp_path / "gen").glob("class*.png"))
    assert generated == sorted(image_name(*job) for job in jobs.pairs())
    for name in generated:
        assert (tmp_path / "gen" / name).read_bytes() == (tmp_path / "sample" / "images" / name).read_bytes(), name
    from_pngs = np.stack([_png(tmp_path / "gen" / image_name(*job)) for job in jobs.pairs()])
    with np.load(tmp_path / "sample" / "samples_6x96x96x3.npz") as npz:
        assert np.array_equal(npz["arr_0"], from_pngs) and npz["arr_1"].tolist() == jobs.labels.tolist()
    evaluated = generate_set(tiny_pipe, jobs.labels, jobs.seeds, batch_size=4, progress=False, top_k=16)
    assert np.array_equal(evaluated, from_pngs)
    chunk = jobs.chunks(4)[1]
    labels, seeds = jobs.batch(chunk)
    api = to_uint8(tiny_pipe.generate(labels, seed=seeds, top_k=16, progress=False).images)
    assert np.array_equal(api, from_pngs[chunk.start:chunk.stop])
