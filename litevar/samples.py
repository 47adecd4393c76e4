"""Generated images as files: ``litevar generate`` (PNGs, a labelled grid, optionally the tokens) and
``litevar sample`` (PNGs plus the ``.npz`` that standard evaluators read).

Both follow the job convention of :mod:`litevar.jobs`: image i of the class-major job list gets seed ``seed + i``
and its own generator, so its seed does not depend on batching or on how many processes share the work. The
unit of work is a fixed chunk of ``batch_size`` consecutive jobs: pixel values depend very slightly on batch
composition (GEMM rounding), so a fixed composition makes the files byte-identical for any number of processes,
across resumes, and between the two commands given the same flags. Another batch size gives the same seeds and
tokens, with pixels equal up to float rounding.

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
import torch
from PIL import Image
from tqdm.auto import tqdm

from .cli_args import (add_model_args, add_recipe_arg, add_sampling_args, check_run, check_writable, image_name,
                       parse_classes, positive)
from .distributed import World, process_group
from .files import write_atomic
from .images import grid, save_png_atomic, to_uint8
from .jobs import JobList
from .pipeline import SAMPLING_DEFAULTS, GenerationOutput, Pipeline, check_sampling_args
from .recipe import build_pipeline, load_recipe

IMAGES_DIR = "images"
TOKENS_DIR = ".tokens"
GRID_FILE = "grid.png"
GRID_COLUMNS = 8
# The earliest time a zip entry can carry: np.savez stamps the current time, which would change the bytes.
ZIP_DATE = (1980, 1, 1, 0, 0, 0)


@dataclass(frozen=True)
class SampleExport:
    """What :func:`export_samples` or :func:`generate_images` wrote: the per-image PNGs (job order), the grid,
    the ADM ``.npz`` (``export_samples``) or the tokens file (``generate_images`` with ``save_tokens``), and how
    many images this process generated. On ranks other than 0 the grid and the ``.npz`` are None."""

    images: list[Path]
    npz: Path | None
    grid: Path | None
    generated: int
    tokens: Path | None = None


@dataclass(frozen=True)
class RunOptions:
    """How a run treats its output folder.

    Args:
        run: extra settings recorded in ``run.json`` (model, recipe, ...): a folder holding another run is refused.
        overwrite: replace the outputs of a different run instead of refusing, and regenerate every image.
        progress: a progress bar (rank 0 only).

    Example:
        >>> RunOptions(run={"model": "default"}, overwrite=True).overwrite
        True
    """

    run: dict[str, Any] | None = None
    overwrite: bool = False
    progress: bool = True


@dataclass(frozen=True)
class _Targets:
    """The files of every job: a PNG each, and its tokens (a list per scale) when they are kept."""

    images: list[Path]
    tokens: list[Path] | None
    overwrite: bool

    def missing(self, i: int) -> bool:
        if self.overwrite or not self.images[i].exists():
            return True
        return self.tokens is not None and not self.tokens[i].exists()

    def write(self, i: int, result: GenerationOutput, row: int) -> None:
        save_png_atomic(to_uint8(result.images[row]), self.images[i])
        if self.tokens is not None:
            row_tokens = [t[row].clone() for t in result.tokens]
            write_atomic(self.tokens[i], lambda tmp: torch.save(row_tokens, tmp))


def _check_jobs(pipe: Pipeline, jobs: JobList | None, default_per_class: int) -> JobList:
    jobs = JobList(range(pipe.num_classes), per_class=default_per_class) if jobs is None else jobs
    if jobs.per_class is None:
        raise ValueError("`jobs` must be class-major (per_class) here: the grid has one row per class")
    pipe.check_labels(jobs.classes)
    return jobs


def _sampling(pipe: Pipeline, sampling: dict[str, Any] | None) -> dict[str, Any]:
    chosen = pipe.resolve_sampling(**(sampling or {}))
    check_sampling_args(chosen["cfg"], chosen["top_k"], chosen["top_p"])
    return chosen


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


def _prepare(out: Path, subdir: str, record: dict[str, Any], overwrite: bool) -> None:
    """Before any work (rank 0): the run guard, run.json, and temp files a killed run left behind."""
    out.mkdir(parents=True, exist_ok=True)
    check_run(out, record, overwrite, pattern=(Path(subdir) / "class*_seed*.png").as_posix())
    images = out / subdir
    images.mkdir(exist_ok=True)
    for stale in [*images.glob(".class*_seed*.png.tmp"), *out.glob(".samples_*.npz.tmp")]:
        stale.unlink()


def _generate_chunks(pipe: Pipeline, jobs: JobList, chunks: list[range], sampling: dict[str, Any],
                     targets: _Targets, world: World, progress: bool) -> int:
    """Generate this rank's chunks that miss a file, whole; write only the missing files. Returns the count."""
    mine = [chunk for j, chunk in enumerate(chunks) if world.owns(j)]
    bar = tqdm(total=sum(len(c) for c in mine), desc="images", unit="img", disable=not (progress and world.is_main))
    written = 0
    for chunk in mine:
        missing = [i for i in chunk if targets.missing(i)]
        if missing:
            labels, seeds = jobs.batch(chunk)
            result = pipe.generate(labels, seed=seeds, progress=False, **sampling)
            for i in missing:
                targets.write(i, result, i - chunk.start)
            written += len(missing)
        bar.update(len(chunk))
    bar.close()
    return written


def _grid(paths: list[Path], jobs: JobList, class_names: list[str], columns: int) -> Image.Image:
    """The first ``columns`` images of each class, one row per class, labelled with the class name."""
    tiles = [_read_png(paths[k * jobs.per_class + i]) for k in range(len(jobs.classes)) for i in range(columns)]
    return grid(tiles, columns, [class_names[c] if c >= 0 else "uncond" for c in jobs.classes])


def _finish(out: Path, jobs: JobList, paths: list[Path], class_names: list[str]) -> tuple[Path, Path]:
    """Rank 0, after every rank is done: the ADM .npz and the grid (one row per class, <= 8 columns)."""
    absent = [p for p in paths if not p.exists()]
    if absent:
        raise ValueError(f"{len(absent)} images are missing (e.g. {absent[0]}); run the same command again")
    height, width = _read_png(paths[0]).shape[:2]
    npz = out / npz_name(len(jobs), height, width)
    write_adm_npz(npz, paths, jobs.labels.tolist())
    sheet = _grid(paths, jobs, class_names, min(jobs.per_class, GRID_COLUMNS))
    write_atomic(out / GRID_FILE, lambda tmp: sheet.save(tmp, format="PNG"))
    return npz, out / GRID_FILE


def _record(options: RunOptions, jobs: JobList, batch_size: int) -> dict[str, Any]:
    """What run.json holds: the caller's settings and everything that decides the bytes of the images."""
    return {**(options.run or {}), "classes": list(jobs.classes), "per_class": jobs.per_class, "seed": jobs.seed,
            "batch_size": batch_size}


def export_samples(pipe: Pipeline, out: str | Path, jobs: JobList | None = None, batch_size: int = 16,
                   sampling: dict[str, Any] | None = None, options: RunOptions | None = None,
                   world: World | None = None) -> SampleExport:
    """Sample the job list to ``out/images/*.png``, then the ADM ``.npz`` and ``grid.png``.

    Resumable: a chunk of ``batch_size`` jobs with a missing PNG is regenerated whole and only its missing
    files are written. ``out/run.json`` records the settings; a different run in ``out`` is refused unless
    ``options.overwrite`` (which also regenerates every image).

    Args:
        pipe: the pipeline (any recipe applied).
        out: output folder.
        jobs: a class-major :class:`~litevar.jobs.JobList` (default: 50 images of every class, seeds from 0).
        batch_size: images per chunk; the same batch size gives byte-identical files.
        sampling: cfg / top_k / top_p / more_smooth; missing or None take ``pipe.sampling``.
        options: run.json settings, overwrite and progress bar (see :class:`RunOptions`).
        world: this process's rank and world (default: a single process).

    Example:
        >>> export_samples(load_pipeline(), "samples", JobList([0, 3], per_class=4))  # doctest: +SKIP
    """
    world = world or World(device=pipe.device)
    options = options or RunOptions()
    jobs = _check_jobs(pipe, jobs, 50)
    chunks = jobs.chunks(batch_size)
    chosen = _sampling(pipe, sampling)
    out = Path(out)
    paths = [out / IMAGES_DIR / image_name(label, s) for label, s in jobs.pairs()]
    record = {**_record(options, jobs, batch_size), "sampling": chosen}
    world.run_on_main(lambda: _prepare(out, IMAGES_DIR, record, options.overwrite))
    targets = _Targets(paths, None, options.overwrite)
    generated = _generate_chunks(pipe, jobs, chunks, chosen, targets, world, options.progress)
    world.barrier()
    written = world.run_on_main(lambda: _finish(out, jobs, paths, pipe.class_names))
    npz, sheet = written if written is not None else (None, None)
    return SampleExport(paths, npz, sheet, generated)


def _write_tokens(path: Path, token_paths: list[Path], jobs: JobList) -> None:
    per_image = [torch.load(p, weights_only=True) for p in token_paths]
    tokens = [torch.stack([img[si] for img in per_image]) for si in range(len(per_image[0]))]
    payload = {"labels": torch.from_numpy(jobs.labels), "seeds": torch.from_numpy(jobs.seeds),
               **{f"tokens.{si}": t for si, t in enumerate(tokens)}}
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda tmp: torch.save(payload, tmp))


def generate_images(pipe: Pipeline, out: str | Path, jobs: JobList | None = None, batch_size: int = 16,
                    sampling: dict[str, Any] | None = None, options: RunOptions | None = None,
                    save_tokens: str | Path | None = None) -> SampleExport:
    """Generate the job list to ``out/class*_seed*.png`` and a labelled ``out/grid.png`` (one row per class).

    The same jobs, batch size and sampling give the same bytes as :func:`export_samples`. Resumable like it:
    chunks with a missing file are regenerated whole and only the missing files are written.

    Args:
        pipe: the pipeline (any recipe applied).
        out: output folder.
        jobs: a class-major :class:`~litevar.jobs.JobList` (default: one image of every class, seeds from 0).
        batch_size: images per chunk.
        sampling: cfg / top_k / top_p / more_smooth; missing or None take ``pipe.sampling``.
        options: run.json settings, overwrite and progress bar (see :class:`RunOptions`).
        save_tokens: also write the sampled tokens of every image (``labels``, ``seeds``, ``tokens.<scale>``) to
            this ``.pt`` file.

    Example:
        >>> generate_images(load_pipeline(), "demo", JobList(range(10), per_class=8))  # doctest: +SKIP
    """
    options = options or RunOptions()
    jobs = _check_jobs(pipe, jobs, 1)
    chunks = jobs.chunks(batch_size)
    chosen = _sampling(pipe, sampling)
    out = Path(out)
    names = [image_name(label, s) for label, s in jobs.pairs()]
    paths = [out / name for name in names]
    tokens = [out / TOKENS_DIR / f"{name}.pt" for name in names] if save_tokens else None
    _prepare(out, "", {**_record(options, jobs, batch_size), **chosen}, options.overwrite)
    if tokens is not None:
        (out / TOKENS_DIR).mkdir(exist_ok=True)
    targets = _Targets(paths, tokens, options.overwrite)
    generated = _generate_chunks(pipe, jobs, chunks, chosen, targets, World(device=pipe.device), options.progress)
    sheet = _grid(paths, jobs, pipe.class_names, jobs.per_class)
    write_atomic(out / GRID_FILE, lambda tmp: sheet.save(tmp, format="PNG"))
    if tokens is not None:
        _write_tokens(Path(save_tokens), tokens, jobs)
    return SampleExport(paths, None, out / GRID_FILE, generated, Path(save_tokens) if save_tokens else None)


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
        jobs = JobList(range(pipe.num_classes) if classes is None else classes, args.per_class, seed=args.seed)
        run = {"recipe": recipe.to_dict(), "var_ckpt": args.var_ckpt, "vae_ckpt": args.vae_ckpt,
               "config": args.config, "device": world.device.type}
        options = RunOptions(run, args.overwrite, not args.no_progress)
        result = export_samples(pipe, out, jobs, args.batch_size, given, options, world)
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
