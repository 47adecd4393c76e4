"""Install a trained VQ-VAE + VAR (or M-VAR) pair as a shipped model (``make default-model`` / ``make default-mvar``).

Usage: ``python -m litevar.train.ship runs/default [--model mvar] [--cfg 1.5 --top-k 0 --top-p 0]``
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ..data import FASHION_MNIST_CLASSES
from ..files import write_atomic
from ..models.default import ASSETS_DIR, CARD_FILE, DEFAULT_DIR, SHIPPED, VAE_FILE, VAR_FILE
from ..models.loading import CheckpointError
from .export import read_model
from .loop import DONE_FILE
from .vae import VAE_WEIGHTS
from .var import VAR_WEIGHTS

# the train-var run folder under run_dir -> the shipped model's name
SHIPPED_AS = {"var": "default", "mvar": "default-mvar", "var-d2": "default-d2"}


def ship(run_dir: str | Path, dest: Path = DEFAULT_DIR, sampling: dict | None = None,
         class_names: tuple[str, ...] = FASHION_MNIST_CLASSES, model: str = "var") -> Path:
    """Copy ``run_dir/vae/vae.safetensors`` and ``run_dir/<model>/var.safetensors`` (``model``: a key of
    :data:`SHIPPED_AS`, the train-var run folder) to ``dest`` with a model card."""
    if model not in SHIPPED_AS:
        raise ValueError(f"model must be one of {tuple(SHIPPED_AS)}, got {model!r}")
    arch = "mvar" if model == "mvar" else "var"
    run_dir = Path(run_dir)
    sources = {VAE_FILE: run_dir / "vae" / VAE_WEIGHTS, VAR_FILE: run_dir / model / VAR_WEIGHTS}
    for src in sources.values():
        if not (src.parent / DONE_FILE).exists():
            raise CheckpointError(f"{src.parent} has no finished training run; finish `litevar train-vae/train-var` first")
    vae_meta, var_meta = read_model(sources[VAE_FILE])[1], read_model(sources[VAR_FILE])[1]
    if arch not in var_meta:
        raise CheckpointError(f"{sources[VAR_FILE]} holds a {next(iter(var_meta), 'unknown')} model, not a {arch}")
    training = {part: json.loads((run_dir / folder / DONE_FILE).read_text()) for part, folder in (("vae", "vae"),
                                                                                                 (arch, model))}
    card = {"name": f"litevar-fashion-mnist-{'mvar-' if arch == 'mvar' else ''}d{var_meta[arch]['depth']}",
            "data": "Fashion-MNIST (Debian dataset-fashion-mnist, MIT), 60k train images, 28x28 zero-padded to 32x32",
            "config": {arch: var_meta[arch], "vae": vae_meta["vae"]},
            "sampling": {"cfg": 1.5, "top_k": 0, "top_p": 0.0, "more_smooth": False, **(sampling or {})},
            "class_names": list(class_names), "training": training,
            "command": SHIPPED[SHIPPED_AS[model]]}
    dest.mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        write_atomic(dest / name, lambda tmp, src=src: shutil.copyfile(src, tmp))
    write_atomic(dest / CARD_FILE, lambda tmp: tmp.write_text(json.dumps(card, indent=1)))
    return dest


def _row(name: str, report: dict) -> str:
    cells = [f"{report[k]:.3f}" if isinstance(report.get(k), float) else "-" for k in ("fd", "precision", "recall")]
    extra = []
    if "class_consistency" in report:
        extra.append(f"class-consistency {100 * report['class_consistency']:.1f}%")
    if "psnr_db" in report:
        extra.append(f"PSNR {report['psnr_db']:.2f} dB, codebook usage {100 * report['codebook_usage']:.1f}%")
    return f"| {name} | " + " | ".join(cells) + f" | {'; '.join(extra) or '-'} |"


def write_card(dest: Path = DEFAULT_DIR, quality_dir: str | Path = "runs/quality") -> Path:
    """Add the measured quality (``litevar quality`` JSONs) to model.json and write MODEL_CARD.md."""
    card = json.loads((dest / CARD_FILE).read_text())
    reports = {p.stem: json.loads(p.read_text()) for p in sorted(Path(quality_dir).glob("*.json"))}
    card["metrics"] = {name: {k: v for k, v in r.items() if k != "machine"} for name, r in reports.items()}
    write_atomic(dest / CARD_FILE, lambda tmp: tmp.write_text(json.dumps(card, indent=1)))
    arch = "mvar" if "mvar" in card["config"] else "var"
    var, vae, t = card["config"][arch], card["config"]["vae"], card["training"]
    label = "M-VAR" if arch == "mvar" else "VAR"
    kind = label + (f" (intra-scale attention + Mamba-2, d_state {var['d_state']}, expand {var['expand']})"
                    if arch == "mvar" else "")
    lines = [f"# {card['name']}", "", f"Data: {card['data']}. Classes: {', '.join(card['class_names'])}.", "",
             f"{kind}: depth {var['depth']}, width {64 * var['depth']}, {var['depth']} heads, token pyramid "
             f"{tuple(var['patch_nums'])} (680 tokens, the released 256px pyramid), vocabulary {var['vocab_size']}.",
             f"VQ-VAE: ch {vae['ch']}, ch_mult {tuple(vae['ch_mult'])}, z {vae['z_channels']} channels, "
             f"32x32 images -> 16x16 last scale.", "",
             f"Training: `{card['command']}`; VQ-VAE {t['vae']['steps']} steps in {t['vae']['train_time_s'] / 60:.0f} min, "
             f"{label} {t[arch]['steps']} steps in {t[arch]['train_time_s'] / 60:.0f} min (2-core CPU).", "",
             f"Recommended sampling (the pipeline's defaults): {card['sampling']}.", "",
             "Quality against the 10k test images (metric: Fréchet distance / precision / recall on EfficientNet-Lite0 "
             "ImageNet features at 128 px, FD-EffLite0; not comparable with Inception FID):", "",
             "| set | FD-EffLite0 | precision | recall | other |", "|---|---|---|---|---|"]
    lines += [_row(name, r) for name, r in reports.items()]
    reproduce = ("make quality" if arch == "var" else
                 f"litevar quality generated --var-ckpt {dest.name} --cfg {card['sampling']['cfg']}")
    lines += ["", f"Reproduce: `{reproduce}` (see the README for each command)."]
    path = dest / "MODEL_CARD.md"
    write_atomic(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--model", choices=tuple(SHIPPED_AS), default="var",
                        help="install run_dir/<model> as the shipped model: " +
                        ", ".join(f"{name} ({folder})" for folder, name in SHIPPED_AS.items()))
    parser.add_argument("--cfg", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--card-only", metavar="QUALITY_DIR", help="only add the quality JSONs of this folder to the card")
    args = parser.parse_args(argv)
    dest = ASSETS_DIR / SHIPPED_AS[args.model]
    if args.card_only:
        print(f"wrote {write_card(dest, quality_dir=args.card_only)}")
        return
    sampling = {k: v for k, v in dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p).items() if v is not None}
    print(f"model installed in {ship(args.run_dir, dest, sampling=sampling, model=args.model)}")


if __name__ == "__main__":
    main()
