"""Labels and seeds -> tokens -> images: the KV-cached next-scale sampler with classifier-free guidance."""
from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .attention.context import AttnContext
from .attention.components import AttentionComponents
from .attention.processor import ComposedAttnProcessor
from .attention.token_prune import PruneState
from .models.kernels import install_inference_fusions
from .models.configs import PipelineConfig, load_config
from .models.loading import CheckpointError, infer_config, load_strict, read_state_dict, resolve_hub
from .models.default import default_model, is_shipped
from .models.mvar import MVAR, build_transformer
from .models.var import VAR
from .models.vqvae import VQVAE
from .sampling import sample_tokens

SAMPLING_DEFAULTS = {"cfg": 1.5, "top_k": 900, "top_p": 0.96, "more_smooth": False}
DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    raise ValueError(f"unsupported dtype {dtype!r}; use one of fp32, bf16, fp16")


def check_sampling_args(cfg: float, top_k: int, top_p: float) -> None:
    """Raise ValueError for guidance/filter settings that have no meaning."""
    if not cfg >= 0:
        raise ValueError(f"cfg must be >= 0, got {cfg}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"top_k must be an integer >= 0 (0 disables it), got {top_k!r}")
    if not 0 <= top_p <= 1:
        raise ValueError(f"top_p must be in [0, 1] (0 disables it), got {top_p}")


@dataclass
class GenerationOutput:
    """Images [B, 3, H, W] in [0, 1], sampled tokens per scale ([B, pn*pn] each), labels [B]
    (``num_classes`` = unconditional), and stage timings in seconds when they were asked for."""

    images: torch.Tensor
    tokens: list[torch.Tensor]
    labels: torch.Tensor
    timings: dict[str, Any] = field(default_factory=dict)


class _StageClock:
    """Accumulates wall time per stage; synchronises CUDA only when timing was asked for."""

    def __init__(self, enabled: bool, device: torch.device) -> None:
        self.enabled = enabled
        self.cuda = device.type == "cuda"
        self.totals: dict[str, Any] = {"transformer": 0.0, "sampling": 0.0, "decoder": 0.0, "per_scale": []}
        self._last = 0.0

    def start(self) -> None:
        if self.enabled:
            self._sync()
            self._last = time.perf_counter()

    def lap(self, stage: str) -> float:
        if not self.enabled:
            return 0.0
        self._sync()
        now = time.perf_counter()
        spent, self._last = now - self._last, now
        self.totals[stage] += spent
        return spent

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()


class Pipeline:
    """A VAR transformer and its VQ-VAE, ready to sample.

    Build it with :func:`load_pipeline`. ``pipe.var(labels, x_BLCv)`` gives teacher-forced logits,
    ``pipe.vae.img_to_idx`` / ``pipe.vae.idx_to_img`` tokenize and decode (images in [-1, 1] there).
    ``pipe.attention`` holds the attention components that compression steps set (window plan, CFG sharing,
    attention precision, KV storage; see :mod:`litevar.attention.components`): set them with
    :meth:`set_attention`, which installs the processor that runs them in every block. ``pipe.head_order`` is
    None, or long [depth, heads] once the heads were reordered (:func:`litevar.kvcompress.reorder.reorder_heads_`):
    the original head at each position of each layer.
    """

    def __init__(self, var: VAR, vae: VQVAE, config: PipelineConfig, sampling: dict | None = None,
                 class_names: Sequence[str] | None = None) -> None:
        install_inference_fusions(var)
        self.var = var
        self.vae = vae
        self.config = config
        self.sampling = {**SAMPLING_DEFAULTS, **(sampling or {})}
        self.class_names = list(class_names) if class_names else [str(c) for c in range(config.var.num_classes)]
        self.attention = AttentionComponents()
        self.head_order: torch.Tensor | None = None
        self._identity: dict | None = None

    def set_attention(self, component: str, value: Any, by: str) -> None:
        """Set one attention component on behalf of recipe step ``by`` (refused if another step set it) and run
        every block's attention through :class:`~litevar.attention.processor.ComposedAttnProcessor`."""
        self.attention.set(component, value, by)
        processor = self.var.blocks[0].attn.processor
        if not (isinstance(processor, ComposedAttnProcessor) and processor.components is self.attention):
            self.var.set_attn_processor(ComposedAttnProcessor(self.attention))

    def identity(self) -> dict[str, Any]:
        """The model's shape and weights digest as loaded (taken before the first step that changes weights, so
        files calibrated on this model, such as window plans, match it whatever the recipe does later)."""
        if self._identity is None:
            from .attention.calibrate import model_identity

            self._identity = model_identity(self.var)
        return self._identity

    @property
    def device(self) -> torch.device:
        return self.var.class_emb.weight.device  # never quantized

    @property
    def dtype(self) -> torch.dtype:
        return self.var.dtype

    @property
    def num_classes(self) -> int:
        return self.config.var.num_classes

    def resolve_sampling(self, **given: Any) -> dict[str, Any]:
        """cfg / top_k / top_p / more_smooth: the given values, ``self.sampling`` for those missing or None."""
        unknown = sorted(set(given) - set(self.sampling))
        if unknown:
            raise TypeError(f"unknown sampling settings {unknown}; the settings are {', '.join(self.sampling)}")
        return {k: default if given.get(k) is None else given[k] for k, default in self.sampling.items()}

    def _labels(self, labels: Any, batch_size: int | None, rng) -> torch.Tensor:
        n = self.num_classes
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if labels is None:
            if batch_size is None:
                raise ValueError("give labels, or batch_size to draw that many random labels")
            uniform = torch.full((1, n), 1.0 / n, device=self.device)
            if isinstance(rng, list):
                return torch.cat([torch.multinomial(uniform, 1, replacement=True, generator=g).view(1) for g in rng])
            return torch.multinomial(uniform, batch_size, replacement=True, generator=rng).reshape(batch_size)
        if isinstance(labels, int) and not isinstance(labels, bool):
            labels_B = torch.full((batch_size or 1,), labels, dtype=torch.long, device=self.device)
        else:
            labels_B = torch.as_tensor(labels, device=self.device).flatten()
            if labels_B.numel() == 0 or labels_B.dtype.is_floating_point or labels_B.dtype == torch.bool:
                raise ValueError("labels must be a non-empty list of integer class ids")
            if batch_size is not None and batch_size != labels_B.numel():
                raise ValueError(f"batch_size {batch_size} differs from the {labels_B.numel()} labels given")
        self.check_labels([int(labels_B.max())])
        return torch.where(labels_B < 0, n, labels_B.long())

    def check_labels(self, labels: Sequence[int]) -> None:
        """Raise ValueError for a class id this model does not have (negative ids mean unconditional)."""
        bad = [c for c in labels if c >= self.num_classes]
        if bad:
            raise ValueError(f"class id {bad[0]} out of range: this model has classes 0..{self.num_classes - 1} "
                             "(negative = unconditional)")

    def _generators(self, seed: int | Sequence[int] | None) -> torch.Generator | list[torch.Generator] | None:
        if seed is None:
            return None
        if isinstance(seed, int) and not isinstance(seed, bool):
            return torch.Generator(device=self.device).manual_seed(seed)
        return [torch.Generator(device=self.device).manual_seed(int(s)) for s in seed]

    @torch.inference_mode()
    def generate(self, labels: Any = None, seed: int | Sequence[int] | None = None, *, batch_size: int | None = None,
                 progress: bool = True, timings: bool = False,
                 on_logits: Callable[[int, torch.Tensor], None] | None = None, **sampling: Any) -> GenerationOutput:
        """Sample images class-conditionally with classifier-free guidance.

        Args:
            labels: class ids (list/tensor), one int for every row (negative = unconditional), or None to draw
                ``batch_size`` labels from the seeded generator (as upstream does).
            seed: one int (one generator for the batch: upstream's tokens) or one int per image (each image
                its own generator: results independent of how images are batched, up to float rounding; the
                commands' convention, see :class:`~litevar.jobs.JobList`).
            batch_size: rows when ``labels`` is an int or None.
            progress: show a progress bar over scales.
            timings: also measure transformer / sampling / decoder seconds (and per-scale transformer time).
            on_logits: called as ``on_logits(scale_index, guided_logits_BlV)`` (float32, before top-k/top-p)
                at every scale; it must not modify the tensor.
            **sampling: ``cfg`` (guidance strength; scale k uses ``cfg * k / (K-1)`` unless a ``guidance`` step
                set another schedule), ``top_k`` (keep the k
                largest logits, 0: off), ``top_p`` (nucleus mass, 0: off), ``more_smooth`` (upstream's
                Gumbel-softmax token features, smoother images). Missing or None take ``pipe.sampling`` (the
                model card's recommendation for the shipped model, upstream's 1.5/900/0.96 otherwise).

        Example:
            >>> out = pipe.generate([207, 360], seed=0)  # doctest: +SKIP
            >>> out.images.shape, [t.shape[1] for t in out.tokens][:3]  # doctest: +SKIP
            (torch.Size([2, 3, 256, 256]), [1, 4, 9])
        """
        chosen = self.resolve_sampling(**sampling)
        check_sampling_args(chosen["cfg"], chosen["top_k"], chosen["top_p"])
        rng = self._generators(seed)
        rows = len(rng) if isinstance(rng, list) else None
        if rows is not None and batch_size is None and (labels is None or isinstance(labels, int)):
            batch_size = rows
        labels_B = self._labels(labels, batch_size, rng)
        if rows is not None and rows != labels_B.numel():
            raise ValueError(f"got {rows} seeds for {labels_B.numel()} images")
        return self._sample(labels_B, rng, chosen, progress, timings, on_logits)

    @torch.inference_mode()
    def score_tokens(self, labels: Any, tokens: Sequence[torch.Tensor], on_logits: Callable[[int, torch.Tensor], None],
                     cfg: float | None = None) -> None:
        """Run the KV-cached sampler on given tokens instead of drawing them (teacher forcing on the cached path),
        calling ``on_logits(scale_index, guided_logits_BlV)`` at every scale; nothing is decoded.

        On a model's own sampled tokens this reproduces the logits it saw while sampling; on another model's tokens
        it gives this model's distributions along that trajectory (how the fidelity KL is measured).

        Args:
            labels: class ids [B] (negative = unconditional).
            tokens: one index tensor [B, pn*pn] per scale.
            on_logits: see :meth:`generate`.
            cfg: guidance strength (None: ``pipe.sampling``).
        """
        labels_B = self._labels(labels, None, None)
        patch_nums = self.config.var.patch_nums
        shapes = [tuple(t.shape) for t in tokens]
        if shapes != [(labels_B.numel(), pn * pn) for pn in patch_nums]:
            raise ValueError(f"tokens must be one [B, pn*pn] tensor per scale for B={labels_B.numel()} and pyramid "
                             f"{patch_nums}, got shapes {shapes}")
        cfg = self.resolve_sampling(cfg=cfg)["cfg"]
        check_sampling_args(cfg, 0, 0.0)
        greedy = {"cfg": cfg, "top_k": 0, "top_p": 0.0, "more_smooth": False}
        self._sample(labels_B, None, greedy, False, False, on_logits, forced=[t.to(self.device) for t in tokens])

    def _sample(self, labels_B, rng, sampling: dict[str, Any], progress: bool, timings: bool, on_logits=None,
                forced=None) -> GenerationOutput | None:
        cfg, top_k, top_p, more_smooth = (sampling[k] for k in ("cfg", "top_k", "top_p", "more_smooth"))
        var, quant, vcfg = self.var, self.vae.quantize, self.config.var
        B = labels_B.shape[0]
        n_scales = len(vcfg.patch_nums)
        clock = _StageClock(timings, self.device)
        clock.start()
        cond_BD, block_mods, head_mod = var.conditioning(torch.cat((labels_B, torch.full_like(labels_B, vcfg.num_classes))))
        level_pos = var.level_pos()
        x_BLC = var.first_tokens(cond_BD, level_pos)
        if isinstance(var, MVAR):  # attention within each scale (no KV cache); Mamba state carried across scales
            caches, ctx = [], var.sampling_context(2 * B, B, self.attention.state)
        else:
            caches = self.attention.make_caches(2 * B, vcfg, self.dtype, self.device)
            ctx = AttnContext(kv_caches=caches, cfg_batch=B)
        side = vcfg.patch_nums[-1]
        f_hat = torch.zeros(B, vcfg.z_channels, side, side, device=self.device)
        codebook = quant.embedding.weight
        tokens = []
        guidance = self.attention.guidance
        uncond_until = n_scales if guidance is None else guidance.uncond_until
        pruning = self.attention.tokens
        prune_state = PruneState()
        refiner = self.attention.refiner
        feats = [None]  # each scale's VQ-VAE input features, for a refiner to read the drafted scales
        for si, pn in enumerate(tqdm(vcfg.patch_nums, desc="scales", disable=not progress, leave=False)):
            ratio = si / max(n_scales - 1, 1)
            if refiner is not None and si == refiner.from_scale:  # the refiner generates the rest (draft-refine)
                clock.totals["drafter_kv_cache_bytes"] = sum(c.nbytes() for c in caches)
                var, pruning = refiner.var, None
                caches, ctx, block_mods, head_mod, level_pos, x_BLC = refiner.take_over(labels_B, feats, uncond_until)
            ctx.scale_index = si
            if si == uncond_until:  # from here on the unconditional rows are not computed (guidance schedule)
                x_BLC, block_mods, head_mod = x_BLC[:B], [m[:B] for m in block_mods], head_mod[:B]
                ctx.cfg_batch = None
            if pruning is None:
                logits_2BlV = var.forward_scale(x_BLC, block_mods, head_mod, ctx)
            else:  # the late layers of pruned scales run on their pivotal tokens only (token-prune step)
                logits_2BlV = pruning.forward_scale(var, x_BLC, block_mods, head_mod, ctx, prune_state)
            clock.totals["per_scale"].append(clock.lap("transformer"))
            t = cfg * ratio if guidance is None else guidance.weight(cfg, si)
            if si < uncond_until:
                logits_BlV = (1 + t) * logits_2BlV[:B] - t * logits_2BlV[B:]
            else:
                logits_BlV = logits_2BlV
            if on_logits is not None:
                on_logits(si, logits_BlV)
            if forced is None:
                idx_Bl, smooth_BlC = sample_tokens(logits_BlV, top_k, top_p, rng, ratio if more_smooth else None, codebook)
            else:
                idx_Bl, smooth_BlC = forced[si], None
            tokens.append(idx_Bl)
            h_BlC = smooth_BlC if more_smooth else quant.embedding(idx_Bl)
            feats_BlC = quant.add_scale(si, f_hat, h_BlC.transpose(1, 2).reshape(B, vcfg.z_channels, pn, pn))
            if feats_BlC is not None:
                if refiner is not None and si < refiner.from_scale:
                    feats.append(feats_BlC)
                x_BLC = var.next_tokens(si + 1, feats_BlC, level_pos)
                x_BLC = x_BLC.repeat(2, 1, 1) if si + 1 < uncond_until else x_BLC
            clock.lap("sampling")
        if forced is not None:
            return None
        images = self.vae.fhat_to_img(f_hat).add_(1).mul_(0.5)
        clock.lap("decoder")
        clock.totals["kv_cache_bytes"] = sum(c.nbytes() for c in caches)
        clock.totals["kv_reserved_bytes"] = sum(c.reserved_bytes() for c in caches)
        if isinstance(var, MVAR):
            clock.totals["mamba_state_bytes"] = ctx.state_bytes()
        return GenerationOutput(images, tokens, labels_B, clock.totals if timings else {})


def _build(config: PipelineConfig, var_state, vae_state, var_name: str, vae_name: str) -> tuple[VAR, VQVAE]:
    with torch.device("meta"):
        var = build_transformer(config.var)
        vae = VQVAE(config.vae)
    load_strict(var, var_state, f"{'M-VAR' if isinstance(var, MVAR) else 'VAR'} checkpoint {var_name}")
    load_strict(vae, vae_state, f"VQ-VAE checkpoint {vae_name}")
    return var, vae


def load_pipeline(var_ckpt: str | Path | None = None, vae_ckpt: str | Path | None = None,
                  config: str | Path | dict | PipelineConfig | None = None, device: str | torch.device = "cpu",
                  dtype: str | torch.dtype = torch.float32) -> Pipeline:
    """Load a VAR transformer and its VQ-VAE strictly (every key and shape must match).

    Args:
        var_ckpt: ``.pth``/``.safetensors`` path (a VAR or an M-VAR: the architecture is read from the keys), or
            a released model name ``"var-d16"`` ... ``"var-d36"``, ``"mvar-d16"`` ... ``"mvar-d32"`` (resolved
            through the Hugging Face cache; then ``vae_ckpt`` defaults to the released VQ-VAE).
            None (and no ``vae_ckpt``): the shipped default model (Fashion-MNIST, see its model card),
            with its recommended sampling settings as ``pipe.sampling``; ``"default-mvar"``: the shipped M-VAR.
        vae_ckpt: the VQ-VAE checkpoint path.
        config: None (inferred from the files), a dict or JSON path in the litevar or upstream keyword
            format (``{"var": {...}, "vae": {...}}``), or a preset name.
        device: where to run.
        dtype: ``torch.float32`` / ``bfloat16`` / ``float16`` (or "fp32", "bf16", "fp16"): weights are cast
            once; the quantizer and logits stay float32.

    Example:
        >>> pipe = load_pipeline("var_d16.pth", "vae_ch160v4096z32.pth", dtype="bf16")  # doctest: +SKIP
        >>> images = pipe.generate([207, 360], seed=0).images  # doctest: +SKIP
    """
    dtype = parse_dtype(dtype)
    device = torch.device(device)
    sampling = class_names = None
    if is_shipped(var_ckpt):
        if vae_ckpt is not None:
            raise CheckpointError("vae_ckpt was given without var_ckpt; pass both, or neither for the default model"
                                  if var_ckpt is None else f"vae_ckpt was given with the shipped {var_ckpt}, which "
                                  "brings its own VQ-VAE; pass both checkpoint files, or the name alone")
        var_ckpt, vae_ckpt, card = default_model(var_ckpt or "default")
        config = card["config"] if config is None else config
        sampling, class_names = card["sampling"], card.get("class_names")
    if not Path(var_ckpt).exists() and re.fullmatch(r"m?var[-_]d\d+", str(var_ckpt)):
        hub_var, hub_vae = resolve_hub(str(var_ckpt))
        var_ckpt, vae_ckpt = hub_var, vae_ckpt or hub_vae
    if vae_ckpt is None:
        raise CheckpointError("vae_ckpt is missing: pass the VQ-VAE checkpoint that belongs to this VAR")
    var_state, vae_state = read_state_dict(var_ckpt), read_state_dict(vae_ckpt)
    cfg = infer_config(var_state, vae_state) if config is None else load_config(config)
    var, vae = _build(cfg, var_state, vae_state, str(var_ckpt), str(vae_ckpt))
    var.to(device=device, dtype=dtype).eval().requires_grad_(False)
    vae.to(device=device).eval().requires_grad_(False)
    vae.cast_(dtype)
    return Pipeline(var, vae, cfg, sampling, class_names)


def random_pipeline(config: str | dict | PipelineConfig, seed: int = 0, device: str | torch.device = "cpu",
                    dtype: str | torch.dtype = torch.float32) -> Pipeline:
    """A pipeline with seeded random weights of a given shape (benchmarks, tests, training from scratch).

    Example:
        >>> pipe = random_pipeline("var-d16", dtype="bf16")  # doctest: +SKIP
    """
    cfg = load_config(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        var, vae = build_transformer(cfg.var), VQVAE(cfg.vae)
    var.to(device=device, dtype=parse_dtype(dtype)).eval().requires_grad_(False)
    vae.to(device=device).eval().requires_grad_(False)
    vae.cast_(parse_dtype(dtype))
    return Pipeline(var, vae, cfg)
