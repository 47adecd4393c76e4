"""The job list: the label and seed of every image, the same in every command and in the Python API.

Image i of the job list gets seed ``seed + i`` and a generator of its own (``pipe.generate(labels,
seed=[...])``), so its tokens depend on its label and seed only, never on the batch it shares or on how many
processes split the work; pixels may move by float rounding when the batch composition changes, so commands
generate fixed chunks of ``batch_size`` consecutive jobs (:meth:`JobList.chunks`). The list is class-major:
``per_class`` images of the first class, then of the next. Runs that ask for a number of ``samples`` instead
(calibration, benchmarks, studies on models with many classes) take the classes in turn, with the same seeds.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _count(name: str, value: int | None) -> int | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"`{name}` must be a positive integer, got {value!r}")
    return value


@dataclass(frozen=True)
class JobList:
    """Which label and seed every image gets (see the module docstring for the convention).

    Args:
        classes: class ids in order (negative = unconditional).
        per_class: images per class, class-major; or
        samples: that many images in all, the classes in turn (give exactly one of the two).
        seed: image i of the list gets seed ``seed + i``.

    Example:
        >>> JobList([0, 3], per_class=2, seed=10).pairs()
        [(0, 10), (0, 11), (3, 12), (3, 13)]
        >>> JobList([0, 3], samples=3).pairs()
        [(0, 0), (3, 1), (0, 2)]
    """

    classes: Sequence[int]
    per_class: int | None = None
    samples: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        classes = tuple(self.classes)
        if not classes or any(isinstance(c, bool) or not isinstance(c, (int, np.integer)) for c in classes):
            raise ValueError(f"`classes` must be a non-empty list of integer class ids, got {self.classes!r}")
        object.__setattr__(self, "classes", tuple(int(c) for c in classes))
        if (self.per_class is None) == (self.samples is None):
            raise ValueError(f"give exactly one of `per_class` and `samples`, got per_class={self.per_class!r} "
                             f"and samples={self.samples!r}")
        _count("per_class", self.per_class)
        _count("samples", self.samples)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)):
            raise ValueError(f"`seed` must be an integer, got {self.seed!r}")
        object.__setattr__(self, "seed", int(self.seed))

    def __len__(self) -> int:
        return self.samples if self.samples is not None else len(self.classes) * self.per_class

    @property
    def labels(self) -> np.ndarray:
        """int64 [N]: the label of every image, in job order."""
        classes = np.asarray(self.classes, dtype=np.int64)
        if self.samples is not None:
            return classes[np.arange(self.samples) % len(classes)]
        return np.repeat(classes, self.per_class)

    @property
    def seeds(self) -> np.ndarray:
        """int64 [N]: ``seed + i`` for image i."""
        return self.seed + np.arange(len(self), dtype=np.int64)

    def pairs(self) -> list[tuple[int, int]]:
        """(label, seed) of every image, in job order."""
        return list(zip(self.labels.tolist(), self.seeds.tolist()))

    def chunks(self, batch_size: int) -> list[range]:
        """Chunk j holds jobs [j * batch_size, (j + 1) * batch_size): the unit of generation and of resuming.

        Example:
            >>> JobList([0], per_class=5).chunks(2)
            [range(0, 2), range(2, 4), range(4, 5)]
        """
        _count("batch_size", batch_size)
        return [range(start, min(start + batch_size, len(self))) for start in range(0, len(self), batch_size)]

    def batch(self, chunk: range) -> tuple[list[int], list[int]]:
        """The labels and seeds of the jobs in ``chunk``, as ``pipe.generate(labels, seed=seeds)`` takes them."""
        return self.labels[chunk.start:chunk.stop].tolist(), self.seeds[chunk.start:chunk.stop].tolist()
