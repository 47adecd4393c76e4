"""Run calibration generations with a temporary attention processor (restored afterwards, even on error)."""
from __future__ import annotations

from tqdm.auto import tqdm


def generate_with_processor(pipe, processor, samples: int, batch_size: int, seed: int = 0, desc: str = "generate",
                            progress: bool = True, **sampling) -> None:
    """Generate ``samples`` images (classes in turn, image i with seed ``seed + i``) with ``processor`` in every
    block; the previous processors are put back afterwards."""
    if samples < 1 or batch_size < 1:
        raise ValueError(f"samples and batch_size must be >= 1, got {samples} and {batch_size}")
    previous = [block.attn.processor for block in pipe.var.blocks]
    pipe.var.set_attn_processor(processor)
    try:
        for start in tqdm(range(0, samples, batch_size), desc=desc, disable=not progress):
            n = min(batch_size, samples - start)
            labels = [(start + i) % pipe.num_classes for i in range(n)]
            pipe.generate(labels, seed=[seed + start + i for i in range(n)], progress=False, **sampling)
    finally:
        pipe.var.set_attn_processor(dict(enumerate(previous)))
