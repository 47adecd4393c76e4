"""Each block's attention as data: independent components set by recipe steps, run by one processor.

=============  ==========================================  ===================
component      what it decides                             set by
=============  ==========================================  ===================
``selection``  which keys each query sees (window plan)    ``mdwa``
``sharing``    CFG halves sharing outputs or probabilities ``asc``
``precision``  quantized QK^T / PV inputs and softmax      quantization ``attn_bits``
``kv``         how the KV cache stores keys and values     ``kv-cache``
``kv_policy``  which keys the KV cache keeps (budgets)     ``kv-compress``
``kernel``     which kernel computes (default ``auto``)    ``mdwa`` ``backend``
``guidance``   per-scale CFG weights, uncond rows dropped  ``guidance``
``tokens``     which tokens the late layers compute        ``token-prune``
``state``      how M-VAR's Mamba state is kept (scales)    ``mamba-state``
``refiner``    the model that generates the late scales    ``draft-refine``
=============  ==========================================  ===================

Each component is set once, by one step; setting it again (two steps claiming it) is refused with a
:class:`ComponentConflict` naming both. The processor that executes them is
:class:`~litevar.attention.processor.ComposedAttnProcessor`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .kv_cache import Int8KVCache, KVCache
from .windows import WindowPlan

COMPONENTS = ("selection", "sharing", "precision", "kv", "kv_policy", "kernel", "guidance", "tokens", "state",
              "refiner")
KV_STORAGES = {"model": KVCache, "int8": Int8KVCache}
STATE_STORAGES = ("model", "int8")  # M-VAR's Mamba state between scales (litevar.models.mamba2.Int8MambaState)


class ComponentConflict(ValueError):
    """Two steps set the same attention component, or set components that cannot run together."""


class WindowSelection:
    """MDWA key selection from a window plan, with its masks built once per (layer, scale, dtype, device).

    Args:
        plan: the window plan (checked against the model when it is installed).
    """

    def __init__(self, plan: WindowPlan) -> None:
        self.plan = plan
        self._bias: dict[tuple, torch.Tensor] = {}
        self._keep: dict[tuple, torch.Tensor] = {}

    def keep_mask(self, layer: int, k: int) -> torch.Tensor:
        """bool [heads, queries of scale k, keys of scales 0..k]."""
        if (layer, k) not in self._keep:
            self._keep[(layer, k)] = self.plan.keep_mask(layer, k)
        return self._keep[(layer, k)]

    def bias(self, layer: int, k: int | None, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """The plan's additive mask for (layer, query scale k; None = teacher-forced, block-causal included)."""
        key = (layer, k, dtype, device)
        if key not in self._bias:
            if k is None:
                self._bias[key] = self.plan.teacher_forcing_bias(layer, dtype, device)
            else:
                self._bias[key] = self.plan.attn_bias(layer, k, dtype, device)
        return self._bias[key]


@dataclass(frozen=True)
class KVCacheSpec:
    """How the KV cache stores keys and values.

    Args:
        storage: "model" (the model's dtype) or "int8" (symmetric int8 per (row, head, token), ~half the bytes).
    """

    storage: str = "model"

    def __post_init__(self) -> None:
        if self.storage not in KV_STORAGES:
            raise ValueError(f"KV storage must be one of {sorted(KV_STORAGES)}, got {self.storage!r}")

    def make(self, batch: int, heads: int, max_len: int, head_dim: int, dtype: torch.dtype,
             device: torch.device) -> KVCache:
        return KV_STORAGES[self.storage](batch, heads, max_len, head_dim, dtype, device)


@dataclass
class AttentionComponents:
    """The attention configuration of one model (every block reads it; per-layer parts are indexed inside).

    Args:
        selection: a :class:`WindowSelection`, or None for every key.
        sharing: a :class:`~litevar.attention.cfg_shared.SharingSchedule`, or None for no CFG sharing.
        precision: an object with ``quantize_qkv(q, k, v)`` and ``quantize_probs(p)``, or None for float attention.
        kv: the KV cache storage.
        kv_policy: an object with ``groups(layer) -> [(head indices, budget), ...]``, ``select``,
            ``observation`` and ``shared_rows`` (see :class:`~litevar.attention.kv_compressed.CompressedKVCache`),
            or None to keep every key.
        kernel: the dispatcher's kernel choice (see :mod:`litevar.attention.dispatch`).
        guidance: a :class:`~litevar.attention.guidance.GuidanceSchedule`, or None for upstream's linear ramp with
            both CFG halves at every scale.
        tokens: a :class:`~litevar.attention.token_prune.TokenPrunePlan` (which layers compute only some tokens
            of which scales), or None for every token everywhere.
        state: how an M-VAR keeps its Mamba state between scales: "model" (float32) or "int8".
        refiner: a :class:`~litevar.draft_refine.Refiner` (a second model generates the scales from its
            ``from_scale`` on), or None.

    Example:
        >>> parts = AttentionComponents()
        >>> parts.set("kv", KVCacheSpec("int8"), by="kv-cache")
        >>> parts.kv.storage, parts.owners
        ('int8', {'kv': 'kv-cache'})
    """

    selection: WindowSelection | None = None
    sharing: Any = None
    precision: Any = None
    kv: KVCacheSpec = field(default_factory=KVCacheSpec)
    kv_policy: Any = None
    kernel: str = "auto"
    guidance: Any = None
    tokens: Any = None
    state: str = "model"
    refiner: Any = None
    owners: dict[str, str] = field(default_factory=dict)

    def set(self, component: str, value: Any, by: str) -> None:
        """Set ``component`` on behalf of step ``by``; refused when another step already set it."""
        if component not in COMPONENTS:
            raise ValueError(f"unknown attention component {component!r}; use one of {COMPONENTS}")
        if component in self.owners:
            raise ComponentConflict(f"steps {self.owners[component]!r} and {by!r} both set the attention "
                                    f"{component}; keep one of them")
        setattr(self, component, value)
        self.owners[component] = by
        self._check()

    def permute_heads(self, order: torch.Tensor) -> None:
        """Follow a permutation of every layer's heads (head ``p`` of layer ``l`` is now the previous head
        ``order[l, p]``): the window plan's head axis is permuted; the other components are per (layer, scale) or
        act on each head alike. Refused once a KV policy is set (its head groups name the previous heads)."""
        if self.kv_policy is not None:
            raise ComponentConflict(f"the KV policy set by {self.owners['kv_policy']!r} names heads by their current "
                                    "positions: reorder the heads before it is built")
        if self.selection is not None:
            self.selection = WindowSelection(self.selection.plan.permute_heads(order))

    def _check(self) -> None:
        policy, sharing = self.kv_policy, self.sharing
        if policy is not None and sharing is not None and sharing.mode == "map" and not policy.shared_rows:
            raise ComponentConflict(f"steps {self.owners['sharing']!r} (map sharing) and {self.owners['kv_policy']!r} "
                                    "(per-row KV selection) cannot run together: the conditional probabilities "
                                    "would be applied to other keys; use the KV policy's cfg: shared")
        if policy is not None and self.guidance is not None and self.guidance.drops_rows:
            raise ComponentConflict(f"steps {self.owners['guidance']!r} (unconditional rows dropped from scale "
                                    f"{self.guidance.uncond_until}) and {self.owners['kv_policy']!r} cannot run "
                                    "together: the compressed KV cache cannot change its batch between scales")
        if self.tokens is not None and self.refiner is not None:
            late = sorted(k for k in self.tokens.kept if k >= self.refiner.from_scale)
            if late:
                raise ComponentConflict(f"steps {self.owners['tokens']!r} and {self.owners['refiner']!r} cannot run "
                                        f"together: scales {late} are pruned in the drafter but generated by the "
                                        f"refiner (from scale {self.refiner.from_scale}); prune earlier scales only")
        if self.tokens is not None:
            for component, why in (("selection", "its window plan selects keys by their position in the pyramid"),
                                   ("kv_policy", "its budgets and kept positions index every token of a scale")):
                if getattr(self, component) is not None:
                    raise ComponentConflict(f"steps {self.owners['tokens']!r} and {self.owners[component]!r} cannot "
                                            f"run together: {why}, and token pruning leaves the pruned tokens out "
                                            "of the late layers and their KV cache; keep one of them")

    def make_caches(self, rows: int, cfg, dtype: torch.dtype, device) -> list:
        """One KV cache per block for sampling ``rows`` rows of a model of config ``cfg`` (a layer that token pruning
        runs on fewer tokens reserves only what it stores)."""
        if self.kv_policy is None:
            lengths = [cfg.seq_len if self.tokens is None else self.tokens.reserved_len(layer)
                       for layer in range(cfg.depth)]
            return [self.kv.make(rows, cfg.heads, length, cfg.head_dim, dtype, device) for length in lengths]
        from .kv_compressed import CompressedKVCache

        return [CompressedKVCache(rows, cfg.heads, cfg.head_dim, dtype, device, self.kv_policy.groups(layer),
                                  self.kv_policy, layer, cfg.patch_nums, self.kv.storage)
                for layer in range(cfg.depth)]

    def describe(self) -> dict[str, Any]:
        """What is configured, for reports (``litevar bench`` JSON)."""
        return {"selection": None if self.selection is None else round(self.selection.plan.kept_fraction(), 6),
                "sharing": None if self.sharing is None else self.sharing.mode,
                "precision": None if self.precision is None else getattr(self.precision, "bits", True),
                "kv_storage": self.kv.storage, "state_storage": self.state, "kernel": self.kernel,
                "set_by": dict(self.owners),
                "guidance": None if self.guidance is None else self.guidance.describe(),
                "tokens": None if self.tokens is None else self.tokens.describe(),
                "kv_policy": None if self.kv_policy is None else self.kv_policy.describe(),
                "refiner": None if self.refiner is None else self.refiner.describe()}
