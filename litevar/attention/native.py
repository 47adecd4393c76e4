"""The compiled CPU kernel of windowed attention (csrc/interval_attention.cpp), built on first use.

Built with PyTorch's C++ extension builder for this machine's instruction set (``-march=native``) into a cache
directory named after the source and the CPU, so a cache shared between machines never runs foreign code.
Where it cannot be built (no C++ compiler, a build error) :func:`interval_kernel_available` says False once,
with a warning, and callers use the pure-PyTorch gathered kernel. ``LITEVAR_NATIVE=0`` turns it off.
"""
from __future__ import annotations

import functools
import hashlib
import os
import platform
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("csrc") / "interval_attention.cpp"
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.bfloat16)


def _cpu_signature() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = platform.processor()
    return flags


def _build_dir() -> Path:
    root = os.environ.get("LITEVAR_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "litevar")
    key = hashlib.sha256(SOURCE.read_bytes() + _cpu_signature().encode() + torch.__version__.encode()).hexdigest()
    return Path(root) / "extensions" / f"interval_attention_{key[:16]}"


@functools.cache
def interval_kernel_available() -> bool:
    """True once the kernel is built and loaded (``torch.ops.litevar.interval_attention``)."""
    if os.environ.get("LITEVAR_NATIVE", "1") == "0" or platform.system() != "Linux":
        return False
    from torch.utils import cpp_extension

    build = _build_dir()
    try:
        build.mkdir(parents=True, exist_ok=True)
        cpp_extension.load(name="litevar_interval_attention", sources=[str(SOURCE)], build_directory=str(build),
                           extra_cflags=["-O3", "-march=native", "-std=c++17"], is_python_module=False,
                           verbose=False)
    except Exception as error:  # any build failure: the pure-PyTorch kernel is correct, only slower
        warnings.warn(f"the compiled windowed-attention kernel could not be built ({type(error).__name__}: "
                      f"{str(error).splitlines()[0] if str(error) else ''}); using the PyTorch gathered kernel",
                      stacklevel=2)
        return False
    if not hasattr(torch.ops.litevar, "interval_attention"):
        return False
    from ..flops import register_flop_formula

    # FLOPs of what the kernel computes: its flops_per_row argument (from the layout) x batch rows.
    register_flop_formula(torch.ops.litevar.interval_attention.default,
                          lambda args, kwargs, out: args[0].shape[0] * args[9], bucket="attention")
    return True


def interval_kernel_supports(q: torch.Tensor) -> bool:
    return (q.device.type == "cpu" and q.dtype in DTYPES and q.shape[-1] in HEAD_DIMS
            and interval_kernel_available())
