"""Install a trained VQ-VAE + VAR pair as the package's default model (``make default-model`` runs this).

Usage: ``python -m litevar.train.ship runs/default [--cfg 1.5 --top-k 0 --top-p 0]``
"""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ..files import write_atomic
from ..models.default import CARD_FILE, DEFAULT_DIR, VAE_FILE, VAR_FILE
from ..models.loading import CheckpointError
from .data import FASHION_MNIST_CLASSES
from .export import read_model
from .loop import DONE_FILE
from .vae import VAE_WEIGHTS
from .var import VAR_WEIGHTS


def ship(run_dir: str | Path, dest: Path = DEFAULT_DIR, sampling: dict | None = None,
         class_names: tuple[str, ...] = FASHION_MNIST_CLASSES) -> Path:
    """Copy ``run_dir/vae/vae.safetensors`` and ``run_dir/var/var.safetensors`` to ``dest`` with a model card."""
    run_dir = Path(run_dir)
    sources = {VAE_FILE: run_dir / "vae" / VAE_WEIGHTS, VAR_FILE: run_dir / "var" / VAR_WEIGHTS}
    for src in sources.values():
        if not (src.parent / DONE_FILE).exists():
            raise CheckpointError(f"{src.parent} has no finished training run; finish `litevar train-vae/train-var` first")
    vae_meta, var_meta = read_model(sources[VAE_FILE])[1], read_model(sources[VAR_FILE])[1]
    training = {part: json.loads((run_dir / part / DONE_FILE).read_text()) for part in ("vae", "var")}
    card = {"name": "litevar-fashion-mnist-d4",
            "data": "Fashion-MNIST (Debian dataset-fashion-mnist, MIT), 60k train images, 28x28 zero-padded to 32x32",
            "config": {"var": var_meta["var"], "vae": vae_meta["vae"]},
            "sampling": {"cfg": 1.5, "top_k": 0, "top_p": 0.0, "more_smooth": False, **(sampling or {})},
            "class_names": list(class_names), "training": training, "command": "make default-model"}
    dest.mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        write_atomic(dest / name, lambda tmp, src=src: shutil.copyfile(src, tmp))
    write_atomic(dest / CARD_FILE, lambda tmp: tmp.write_text(json.dumps(card, indent=1)))
    return dest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--cfg", type=float)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    args = parser.parse_args(argv)
    sampling = {k: v for k, v in dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p).items() if v is not None}
    print(f"default model installed in {ship(args.run_dir, sampling=sampling)}")


if __name__ == "__main__":
    main()
