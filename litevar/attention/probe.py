"""Run calibration generations with a temporary attention processor (restored afterwards, even on error)."""
from __future__ import annotations

from tqdm.auto import tqdm

from ..jobs import JobList


def generate_with_processor(pipe, processor, samples: int, batch_size: int, seed: int = 0, desc: str = "generate",
                            progress: bool = True, **sampling) -> None:
    """Generate ``samples`` images (classes in turn, image i with seed ``seed + i``) with ``processor`` in every
    block; the previous processors are put back afterwards."""
    jobs = JobList(range(pipe.num_classes), samples=samples, seed=seed)
    chunks = jobs.chunks(batch_size)
    previous = [block.attn.processor for block in pipe.var.blocks]
    pipe.var.set_attn_processor(processor)
    try:
        for chunk in tqdm(chunks, desc=desc, disable=not progress):
            labels, seeds = jobs.batch(chunk)
            pipe.generate(labels, seed=seeds, progress=False, **sampling)
    finally:
        pipe.var.set_attn_processor(dict(enumerate(previous)))
