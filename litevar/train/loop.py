"""The training loop both trainers share: deterministic batches, AdamW with warmup + cosine, bf16 autocast,
resumable checkpoints, a progress bar, a JSON-lines log and a loss-curve PNG.

A run lives in one output folder. ``run.json`` records what the run is; restarting the same command resumes
from ``checkpoint.pt`` (written atomically every few minutes), a different command in the same folder is
refused, and a finished run is not redone.
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn
from tqdm.auto import tqdm

from ..files import reading, write_atomic

RUN_FILE = "run.json"
CHECKPOINT_FILE = "checkpoint.pt"
LOG_FILE = "log.jsonl"
DONE_FILE = "done.json"


class TrainingError(RuntimeError):
    """A training run that cannot start or continue as asked."""


@dataclass
class TrainConfig:
    """Optimisation settings shared by the trainers.

    Args:
        steps: optimizer steps in total.
        batch_size: images per step.
        lr: peak learning rate (after ``warmup_steps`` of linear warmup; cosine decay to ``lr * min_lr_ratio``).
        bf16: autocast to bfloat16 (CPU and CUDA); master weights stay float32.
        checkpoint_every_s: seconds between checkpoints (a killed run loses at most this much work).
    """

    steps: int
    batch_size: int
    lr: float
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 2.0
    seed: int = 0
    bf16: bool = True
    checkpoint_every_s: float = 180.0
    log_every: int = 10

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.warmup_steps < 0:
            raise ValueError("steps >= 1, batch_size >= 1, lr > 0 and warmup_steps >= 0 are required, got "
                             f"steps={self.steps}, batch_size={self.batch_size}, lr={self.lr}, "
                             f"warmup_steps={self.warmup_steps}")


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


class Trainer:
    """Owns the optimizer, the step counter, checkpoints and logs of one run in ``out_dir``.

    Example:
        >>> trainer = Trainer(out_dir, model, TrainConfig(steps=100, batch_size=8, lr=1e-3), run={"kind": "demo"})
        >>> for step, idx in trainer.batches(len(dataset)):
        ...     with trainer.autocast():
        ...         loss = compute_loss(model, dataset[idx])
        ...     trainer.update(loss, {"loss": loss.item()})
        >>> trainer.finish()
    """

    def __init__(self, out_dir: str | Path, model: nn.Module, cfg: TrainConfig, run: dict,
                 progress: bool = True) -> None:
        self.out = Path(out_dir)
        self.model = model
        self.cfg = cfg
        self.progress = progress
        self.run = {**run, "train": asdict(cfg)}
        decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "emb" not in n]
        no_decay = [p for n, p in model.named_parameters() if p.requires_grad and (p.ndim < 2 or "emb" in n)]
        self.optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                            {"params": no_decay, "weight_decay": 0.0}],
                                           lr=cfg.lr, betas=(cfg.beta1, cfg.beta2))
        self.step = 0
        self.elapsed_s = 0.0
        self._start_run_folder()
        self._last_ckpt = time.monotonic()
        self._t0 = time.monotonic()
        self._bar = None

    @property
    def done(self) -> bool:
        return (self.out / DONE_FILE).exists()

    def _start_run_folder(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        run_path = self.out / RUN_FILE
        if run_path.exists():
            previous = json.loads(run_path.read_text())
            if previous != json.loads(json.dumps(self.run)):
                changed = sorted(k for k in previous.keys() | self.run.keys()
                                 if json.dumps(previous.get(k), sort_keys=True) != json.dumps(self.run.get(k), sort_keys=True))
                raise TrainingError(f"{self.out} holds a different training run (differs in {', '.join(changed)}); "
                                    "use another output folder, or delete this one to start over")
        else:
            write_atomic(run_path, lambda tmp: tmp.write_text(json.dumps(self.run, indent=1)))
        ckpt = self.out / CHECKPOINT_FILE
        if ckpt.exists() and not self.done:
            with reading(ckpt, TrainingError, "training checkpoint", "delete it to train from the start"):
                state = torch.load(ckpt, map_location="cpu", weights_only=True)
                self.model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
                self.step = int(state["step"])
                self.elapsed_s = float(state["elapsed_s"])
            self._trim_log()

    def _trim_log(self) -> None:
        """Drop log lines past the checkpoint: those steps run again after a resume."""
        log = self.out / LOG_FILE
        if log.exists():
            lines = [ln for ln in log.read_text().splitlines() if ln and json.loads(ln)["step"] <= self.step]
            write_atomic(log, lambda tmp: tmp.write_text("".join(ln + "\n" for ln in lines)))

    def autocast(self):
        device = next(self.model.parameters()).device.type
        return torch.autocast(device, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def batches(self, n_items: int) -> Iterator[tuple[int, torch.Tensor]]:
        """(step, item indices) from the current step on; the order depends only on the seed and the step."""
        if n_items < self.cfg.batch_size:
            raise TrainingError(f"the dataset has {n_items} items, fewer than one batch of {self.cfg.batch_size}")
        per_epoch = n_items // self.cfg.batch_size
        self._bar = tqdm(total=self.cfg.steps, initial=self.step, disable=not self.progress, dynamic_ncols=True,
                         desc=self.run.get("kind", "train"))
        self._t0 = time.monotonic()
        while self.step < self.cfg.steps:
            epoch, pos = divmod(self.step, per_epoch)
            order = torch.randperm(n_items, generator=torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch))
            yield self.step, order[pos * self.cfg.batch_size:(pos + 1) * self.cfg.batch_size]

    def step_generator(self) -> torch.Generator:
        """A generator seeded by (seed, step): augmentation and dropout replay exactly after a resume."""
        return torch.Generator().manual_seed(self.cfg.seed * 1_000_003 + self.step)

    def update(self, loss: torch.Tensor, metrics: dict[str, float]) -> None:
        """Backward, clip, AdamW step at the scheduled learning rate, then log and checkpoint when due."""
        lr = lr_at(self.cfg, self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.optimizer.step()
        self.step += 1
        now = time.monotonic()
        self.elapsed_s += now - self._t0
        self._t0 = now
        if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
            record = {"step": self.step, "lr": lr, "grad_norm": float(grad_norm), "elapsed_s": round(self.elapsed_s, 1),
                      **{k: round(float(v), 5) for k, v in metrics.items()}}
            with open(self.out / LOG_FILE, "a") as f:
                f.write(json.dumps(record) + "\n")
            rate = self.cfg.batch_size * self.step / max(self.elapsed_s, 1e-9)
            self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()} | {"img/s": f"{rate:.1f}"})
        self._bar.update(1)
        if now - self._last_ckpt >= self.cfg.checkpoint_every_s or self.step == self.cfg.steps:
            self.save_checkpoint()

    def save_checkpoint(self) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "step": self.step, "elapsed_s": self.elapsed_s}
        write_atomic(self.out / CHECKPOINT_FILE, lambda tmp: torch.save(state, tmp))
        self._last_ckpt = time.monotonic()

    def finish(self, summary: dict | None = None) -> dict:
        """Mark the run done, draw the loss curve; returns the summary written to done.json."""
        if self._bar is not None:
            self._bar.close()
        summary = {"steps": self.step, "train_time_s": round(self.elapsed_s, 1), **(summary or {})}
        plot_log(self.out / LOG_FILE, self.out / "loss.png")
        write_atomic(self.out / DONE_FILE, lambda tmp: tmp.write_text(json.dumps(summary, indent=1)))
        return summary


def read_log(path: str | Path) -> list[dict]:
    path = Path(path)
    return [json.loads(ln) for ln in path.read_text().splitlines() if ln] if path.exists() else []


def plot_log(log_path: str | Path, png_path: str | Path) -> None:
    """Loss curves (every logged metric except lr / grad_norm / elapsed) against steps, one panel each."""
    records = read_log(log_path)
    if not records:
        return
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [k for k in records[0] if k not in ("step", "lr", "grad_norm", "elapsed_s")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3), squeeze=False)
    steps = [r["step"] for r in records]
    for ax, key in zip(axes[0], keys):
        ax.plot(steps, [r.get(key, float("nan")) for r in records], lw=1)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    write_atomic(Path(png_path), lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    plt.close(fig)
