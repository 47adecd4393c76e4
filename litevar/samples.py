"""``litevar sample``: class-conditional samples as PNG files plus the ``.npz`` that standard evaluators read.

Image i of the job list (classes x per_class, label-major) gets seed ``seed + i`` and its own generator, so
its seed does not depend on batching or on how many processes share the work. The unit of work is a fixed
chunk of ``batch_size`` consecutive jobs: pixel values depend very slightly on batch composition (GEMM
rounding), so a fixed composition makes the files byte-identical for any number of processes and across
resumes. Another batch size gives the same seeds and tokens, with pixels equal up to float rounding.

The ``.npz`` has the layout of OpenAI's ADM evaluator (guided-diffusion ``evaluations/evaluator.py``):
``arr_0`` uint8 [N, H, W, 3] in job order and ``arr_1`` int64 labels, written with a fixed zip timestamp
so that the same samples give the same bytes.
"""
from __future__ import annotations

import argparse
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from .cli_args import (add_model_args, add_recipe_arg, add_sampling_args, check_run, check_writable, image_name,
                       parse_classes, positive)
from .distributed import World, process_group
from .files import write_atomic
from .images import grid, save_png_atomic, to_uint8_hwc
from .pipeline import SAMPLING_DEFAULTS, Pipeline, check_sampling_args
from .recipe import build_pipeline, load_recipe

IMAGES_DIR = "images"
GRID_FILE = "grid.png"
GRID_COLUMNS = 8
# The earliest time a zip entry can carry: np.savez stamps the current time, which would change the bytes.
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class SampleExport:
    """What :func:`export_samples` wrote: the per-image PNGs (job order), the ADM ``.npz`` and the grid
    (the last two are None on ranks other than 0), and how many images this process generated."""

    images: list[Path]
    npz: Path | None
    grid: Path | None
    generated: int


def sample_jobs(classes: Sequence[int], per_class: int, seed: int = 0) -> list[tuple[int, int]]:
    """(label, seed) of every image, label-major; image i (global index) gets seed ``seed + i``.

    Example:
        >>> sample_jobs([0, 3], 2, seed=10)
        [(0, 10), (0, 11), (3, 12), (3, 13)]
    """
    labels = [c for c in classes for _ in range(per_class)]
    return [(label, seed + i) for i, label in enumerate(labels)]


def chunk_ranges(n_jobs: int, batch_size: int) -> list[range]:
    """Chunk j holds jobs [j * batch_size, (j + 1) * batch_size): the unit of work and of resuming.

    Example:
        >>> chunk_ranges(5, 2)
        [range(0, 2), range(2, 4), range(4, 5)]
    """
    return [range(start, min(start + batch_size, n_jobs)) for start in range(0, n_jobs, batch_size)]


def npz_name(n: int, height: int, width: int) -> str:
    return f"samples_{n}x{height}x{width}x3.npz"


def _zip_entry(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3
    info.external_attr = 0o644 << 16
    return info


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def write_adm_npz(path: Path, image_paths: Sequence[Path], labels: Sequence[int]) -> None:
    """Write ``arr_0`` (uint8 NHWC, the PNGs in the given order) and ``arr_1`` (int64 labels) atomically.

    ``arr_0`` is streamed one image at a time, so 50k ImageNet-size samples never sit in memory at once;
    its bytes equal those ``np.save`` gives for the stacked array.

    Example:
        >>> write_adm_npz(Path("samples.npz"), [Path("a.png"), Path("b.png")], [0, 1])  # doctest: +SKIP
    """
    if len(image_paths) != len(labels) or not image_paths:
        raise ValueError(f"need one label per image and at least one image, got {len(image_paths)} images "
                         f"and {len(labels)} labels")
    shape_HW3 = _read_png(image_paths[0]).shape
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False,
              "shape": (len(image_paths), *shape_HW3)}

    def write(tmp: Path) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as archive:
            with archive.open(_zip_entry("arr_0.npy"), "w", force_zip64=True) as member:
                np.lib.format.write_array_header_1_0(member, header)
                for image_path in image_paths:
                    image_HW3 = _read_png(image_path)
                    if image_HW3.shape != shape_HW3:
                        raise ValueError(f"{image_path} is {image_HW3.shape}, not {shape_HW3} like the others; "
                                         "delete it and run again to regenerate it")
                    member.write(np.ascontiguousarray(image_HW3).tobytes())
            with archive.open(_zip_entry("arr_1.npy"), "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asarray(labels, dtype=np.int64), allow_pickle=False)

    write_atomic(path, write)


def _prepare(out: Path, run: dict[str, Any], overwrite: bool) -> None:
    """Rank 0, before any work: the run guard, run.json, and temp files a killed run left behind."""
    out.mkdir(parents=True, exist_ok=True)
    check_run(out, run, overwrite, pattern=f"{IMAGES_DIR}/class*_seed*.png")
    images = out / IMAGES_DIR
    images.mkdir(exist_ok=True)
    for stale in [*images.glob(".class*_seed*.png.tmp"), *out.glob(".samples_*.npz.tmp")]:
        stale.unlink()


def _generate_chunks(pipe: Pipeline, jobs: list[tuple[int, int]], paths: list[Path], batch_size: int,
                     sampling: dict[str, Any], overwrite: bool, world: World, progress: bool) -> int:
    """Generate this rank's chunks that miss a PNG, whole; write only the missing files. Returns the count."""
    mine = [chunk for j, chunk in enumerate(chunk_ranges(len(jobs), batch_size)) if world.owns(j)]
    bar = tqdm(total=sum(len(c) for c in mine), desc="images", unit="img", disable=not (progress and world.is_main))
    written = 0
    for chunk in mine:
        missing = [i for i in chunk if overwrite or not paths[i].exists()]
        if missing:
            result = pipe.generate([jobs[i][0] for i in chunk], seed=[jobs[i][1] for i in chunk], progress=False,
                                   **sampling)
            for i in missing:
                save_png_atomic(to_uint8_hwc(result.images[i - chunk.start]), paths[i])
            written += len(missing)
        bar.update(len(chunk))
    bar.close()
    return written


def _finish(out: Path, jobs: list[tuple[int, int]], paths: list[Path], classes: list[int], per_class: int,
            class_names: list[str]) -> tuple[Path, Path]:
    """Rank 0, after every rank is done: the ADM .npz and the grid (one row per class, <= 8 columns)."""
    absent = [p for p in paths if not p.exists()]
    if absent:
        raise ValueError(f"{len(absent)} images are missing (e.g. {absent[0]}); run the same command again")
    height, width = _read_png(paths[0]).shape[:2]
    npz = out / npz_name(len(jobs), height, width)
    write_adm_npz(npz, paths, [label for label, _ in jobs])
    columns = min(per_class, GRID_COLUMNS)
    tiles = [_read_png(paths[k * per_class + i]) for k in range(len(classes)) for i in range(columns)]
    names = [class_names[c] if c >= 0 else "uncond" for c in classes]
    sheet = grid(tiles, columns, names)
    write_atomic(out / GRID_FILE, lambda tmp: sheet.save(tmp, format="PNG"))
    return npz, out / GRID_FILE


def export_samples(pipe: Pipeline, out: str | Path, classes: Sequence[int] | None = None, per_class: int = 50,
                   seed: int = 0, batch_size: int = 16, sampling: dict[str, Any] | None = None,
                   run: dict[str, Any] | None = None, overwrite: bool = False, progress: bool = True,
                   world: World | None = None) -> SampleExport:
    """Sample ``per_class`` images of each class to ``out/images/*.png``, then the ADM ``.npz`` and ``grid.png``.

    Resumable: a chunk of ``batch_size`` jobs with a missing PNG is regenerated whole and only its missing
    files are written. ``out/run.json`` records the settings; a different run in ``out`` is refused unless
    ``overwrite`` (which also regenerates every image).

    Args:
        pipe: the pipeline (any recipe applied).
        out: output folder.
        classes: class ids (default: every class of the model).
        per_class: images per class.
        seed: image i of the job list uses seed ``seed + i``.
        batch_size: images per chunk; the same batch size gives byte-identical files.
        sampling: cfg / top_k / top_p / more_smooth; missing or None take ``pipe.sampling``.
        run: extra settings for run.json (model, recipe, ...).
        overwrite: replace the outputs of a different run instead of refusing.
        progress: a progress bar (rank 0 only).
        world: this process's rank and world (default: a single process).

    Example:
        >>> export_samples(load_pipeline(), "samples", classes=[0, 3], per_class=4)  # doctest: +SKIP
    """
    world = world or World(device=pipe.device)
    per_class = positive("per_class", per_class)
    batch_size = positive("batch_size", batch_size)
    classes = list(range(pipe.num_classes)) if classes is None else [int(c) for c in classes]
    pipe.check_labels(classes)
    chosen = pipe.resolve_sampling(**(sampling or {}))
    check_sampling_args(chosen["cfg"], chosen["top_k"], chosen["top_p"])
    out = Path(out)
    jobs = sample_jobs(classes, per_class, seed)
    paths = [out / IMAGES_DIR / image_name(label, s) for label, s in jobs]
    record = {**(run or {}), "classes": classes, "per_class": per_class, "seed": seed, "batch_size": batch_size,
              "sampling": chosen}
    world.run_on_main(lambda: _prepare(out, record, overwrite))
    generated = _generate_chunks(pipe, jobs, paths, batch_size, chosen, overwrite, world, progress)
    world.barrier()
    written = world.run_on_main(lambda: _finish(out, jobs, paths, classes, per_class, pipe.class_names))
    npz, sheet = written if written is not None else (None, None)
    return SampleExport(paths, npz, sheet, generated)


def cmd_sample(args: argparse.Namespace) -> None:
    classes = parse_classes(args.classes) if args.classes is not None else None
    positive("--per-class", args.per_class)
    positive("--batch-size", args.batch_size)
    given = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, more_smooth=args.more_smooth)
    check_sampling_args(*(SAMPLING_DEFAULTS[k] if given[k] is None else given[k] for k in ("cfg", "top_k", "top_p")))
    recipe = load_recipe(args.recipe)
    out = Path(args.out)
    check_writable(out)
    with process_group(args.device) as world:
        pipe = build_pipeline(recipe, args.var_ckpt, args.vae_ckpt, args.config, device=world.device)
        run = {"recipe": recipe.to_dict(), "var_ckpt": args.var_ckpt, "vae_ckpt": args.vae_ckpt,
               "config": args.config, "device": world.device.type}
        result = export_samples(pipe, out, classes, args.per_class, args.seed, args.batch_size, given, run,
                                args.overwrite, not args.no_progress, world)
        total = world.total(result.generated)
    if world.is_main:
        print(f"wrote {len(result.images)} images under {out / IMAGES_DIR} ({total} generated now, "
              f"{len(result.images) - total} already there), {result.npz} and {result.grid}")


def add_sample_command(sub: Any) -> None:
    """Register ``litevar sample`` on the subcommand parsers of ``litevar``."""
    p = sub.add_parser("sample", help="sample images for evaluators: PNGs + ADM .npz (resumable, torchrun-aware)",
                       description="Samples --per-class images of each class to OUT/images/*.png, then "
                       "OUT/samples_NxHxWx3.npz (arr_0 uint8 NHWC, arr_1 labels; OpenAI ADM evaluator layout) "
                       "and OUT/grid.png. Under torchrun the chunks are shared among the ranks; the same "
                       "--batch-size gives byte-identical files for any number of processes.")
    add_model_args(p)
    add_recipe_arg(p)
    p.add_argument("--classes", help="comma-separated class ids, e.g. 0,3 (default: every class)")
    p.add_argument("--per-class", type=int, default=50, help="images per class (default 50)")
    p.add_argument("--seed", type=int, default=0, help="image i of the job list uses seed + i")
    p.add_argument("--batch-size", type=int, default=16,
                   help="images per chunk (default 16); keep it fixed to resume with byte-identical files")
    add_sampling_args(p)
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda:LOCAL_RANK under torchrun)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--overwrite", action="store_true", help="replace a different run's outputs and regenerate all")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=cmd_sample)
