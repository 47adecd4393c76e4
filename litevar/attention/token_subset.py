"""Which scale the tokens of the current calls belong to when token pruning runs a subset of them.

Set by the ``token-prune`` step around its pruned layers and read by the quantizers' per-scale token groups
(:mod:`litevar.quant.groups`), which otherwise infer the scale from a call's length.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_SUBSET_OF_SCALE: contextvars.ContextVar[int | None] = contextvars.ContextVar("litevar_subset_of_scale", default=None)


@contextlib.contextmanager
def tokens_of_scale(scale_index: int) -> Iterator[None]:
    """Calls inside run over some of the tokens of scale ``scale_index`` (token pruning keeps a subset): token
    groups give every token of such a call that scale's group, whatever the call's length.

    Example:
        >>> with tokens_of_scale(2):
        ...     subset_scale()
        2
    """
    token = _SUBSET_OF_SCALE.set(scale_index)
    try:
        yield
    finally:
        _SUBSET_OF_SCALE.reset(token)


def subset_scale() -> int | None:
    """The scale set by the innermost :func:`tokens_of_scale`, or None outside one."""
    return _SUBSET_OF_SCALE.get()
