"""RMT: Retentive Networks Meet Vision Transformers.

Fan, Huang, Zhou, Wang, Ran, He. CVPR 2024. https://arxiv.org/abs/2309.11523

A four-stage hierarchical backbone. Each block adds a conditional position encoding
(3x3 depthwise conv), then pre-norm Manhattan self-attention (see :mod:`rmt.models.attention`),
then a pre-norm feed-forward network with a 3x3 depthwise conv inside. Tokens stay in
(B, H, W, C) layout throughout, so the depthwise convs run on channels-last views without copies.

This implementation computes the official model's numbers (GitHub qhfan/RMT, June 2024) and
loads its checkpoints through :func:`checkpoint_filter_fn`; the module layout follows timm.
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Tuple, Union

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import DropPath, LayerScale, trunc_normal_
from timm.layers._fx import register_notrace_function, register_notrace_module
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import FeatureDictNet, FeatureGetterNet, FeatureHookNet, FeatureListNet, feature_take_indices
from timm.models._features_fx import FeatureGraphNet
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from rmt.errors import ConfigError
from rmt.models.attention import ManhattanPosition, ManhattanSelfAttention, resolve_attention_kernel
from rmt.models.config import VARIANTS, RMTConfig
from rmt.models.layers import (
    AffineFreeLayerNorm,
    ResidualDepthwiseConvNHWC,
    call_linear,
    exporting,
    fold_batch_norm,
    fold_bias_into_linear,
    fold_layer_norm_affine,
    fold_output_scale,
    identity_like,
    keep_autocast_weights,
)


# CPU inference with every submodule in eval mode runs the stem and each stage on a few images
# at a time, at most this many tokens (at least one image): their ops are then all per image
# (batch norm uses its running statistics), so the numbers are the same, and a chunk's
# activations stay in cache instead of streaming 30 MB tensors through memory and fresh pages
# (docs/performance.md).
CPU_TOKENS_PER_CHUNK = 1568  # at 224 px: 1 image per chunk at 56x56, 2 at 28x28, 8 at 14x14


def in_cpu_chunks(module: nn.Module, fn: Callable[[Tensor], Tensor], x: Tensor, tokens_per_image: int) -> Tensor:
    """``fn(x)``, or the concatenation of ``fn`` over batch chunks in eval-mode CPU inference.

    Any submodule in training mode (say batch norms re-estimating their statistics in an
    otherwise frozen model) keeps the whole batch together.
    """
    images = max(1, CPU_TOKENS_PER_CHUNK // max(1, tokens_per_image))
    if (
        # a trace or an exported program would freeze the chunk count, and with it the batch size
        # (asked first: comparing the batch size would itself be recorded)
        torch.jit.is_tracing() or exporting()
        or x.device.type != "cpu" or x.shape[0] <= images or torch.is_grad_enabled()
        or any(m.training for m in module.modules())
    ):
        return fn(x)
    return torch.cat([fn(chunk) for chunk in x.split(images)])


@register_notrace_module  # FX feature extraction: its CPU chunking branches on the batch size
class ConvStem(nn.Sequential):
    """Four 3x3 convs with batch norm (GELU between), stride 4 overall; NCHW in, (B, H, W, C) out."""

    def __init__(self, in_chans: int, dim: int):
        half = dim // 2
        super().__init__(
            nn.Conv2d(in_chans, half, 3, 2, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, half, 3, 1, 1), nn.BatchNorm2d(half), nn.GELU(),
            nn.Conv2d(half, dim, 3, 2, 1), nn.BatchNorm2d(dim), nn.GELU(),
            nn.Conv2d(dim, dim, 3, 1, 1), nn.BatchNorm2d(dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return in_cpu_chunks(self, self._forward, x, tokens_per_image=(x.shape[2] // 4) * (x.shape[3] // 4))

    def _forward(self, x: Tensor) -> Tensor:
        # channels-last convs make the final permute to (B, H, W, C) free
        return super().forward(x.contiguous(memory_format=torch.channels_last)).permute(0, 2, 3, 1)

    def reparameterize(self) -> None:
        """Fold each batch norm into the conv before it (inference; see :func:`RMT.reparameterize`)."""
        for i in range(len(self) - 1):
            if isinstance(self[i], nn.Conv2d) and isinstance(self[i + 1], nn.BatchNorm2d):
                self[i + 1] = fold_batch_norm(self[i], self[i + 1])
        keep_autocast_weights(self)


class Downsample(nn.Module):
    """3x3 stride-2 conv + batch norm between stages, on (B, H, W, C) tokens."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.conv = nn.Conv2d(in_dim, out_dim, 3, 2, 1)
        self.norm = nn.BatchNorm2d(out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(self.conv(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)

    def reparameterize(self) -> None:
        """Fold the batch norm into the conv (inference; see :func:`RMT.reparameterize`)."""
        if isinstance(self.norm, nn.BatchNorm2d):
            self.norm = fold_batch_norm(self.conv, self.norm)
        keep_autocast_weights(self)


class ConvFFN(nn.Module):
    """fc1, GELU, a 3x3 depthwise conv added residually, fc2."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.dwconv = ResidualDepthwiseConvNHWC(hidden_dim, 3)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        x = call_linear(self.fc1, x)
        # in place when no backward pass needs GELU's input: on the CPU every fresh allocation
        # of this, the largest activation, can cost page faults
        x = self.act(x) if torch.is_grad_enabled() else torch.ops.aten.gelu_(x, approximate=self.act.approximate)
        return call_linear(self.fc2, self.dwconv(x))


class RMTBlock(nn.Module):
    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        decomposed: bool,
        drop_path: float = 0.0,
        layer_scale_init: Optional[float] = None,
        attn_kernel: str = "auto",
    ):
        super().__init__()
        self.cpe = ResidualDepthwiseConvNHWC(dim, 3)  # conditional position encoding, x + conv(x)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ManhattanSelfAttention(dim, num_heads, decomposed, attn_kernel)
        self.ls1 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ConvFFN(dim, int(mlp_ratio * dim))
        self.ls2 = LayerScale(dim, layer_scale_init) if layer_scale_init is not None else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: Tensor, position: ManhattanPosition) -> Tensor:
        x = self.cpe(x)
        # in-place adds on fresh outputs save an allocation (autograd-safe)
        x = self.drop_path1(self.ls1(self.attn(self.norm1(x), position))).add_(x)
        x = self.drop_path2(self.ls2(self.mlp(self.norm2(x)))).add_(x)
        return x

    def reparameterize(self) -> None:
        """Fold for inference (see :func:`RMT.reparameterize`): the norms' affines into the
        projections they feed, the LCE and FFN conv biases into the linears after them, and the
        layer scales into those linears. The CPE conv keeps its bias: it feeds the residual stream.
        (The CPE and FFN convs fold their own residual adds.)
        """
        attn, mlp = self.attn, self.mlp
        if isinstance(self.norm1, nn.LayerNorm):
            self.norm1 = fold_layer_norm_affine(self.norm1, attn.qk, attn.v)
        if isinstance(self.norm2, nn.LayerNorm):
            self.norm2 = fold_layer_norm_affine(self.norm2, mlp.fc1)
        # proj reads lce(v) + attention, fc2 reads dwconv(x) + x: the conv biases pass straight in
        fold_bias_into_linear(attn.lce, attn.proj)
        fold_bias_into_linear(mlp.dwconv, mlp.fc2)
        if isinstance(self.ls1, LayerScale):
            fold_output_scale(attn.proj, self.ls1.gamma)
            self.ls1 = identity_like(self.ls1)
        if isinstance(self.ls2, LayerScale):
            fold_output_scale(mlp.fc2, self.ls2.gamma)
            self.ls2 = identity_like(self.ls2)
        keep_autocast_weights(self)


@register_notrace_module  # FX feature extraction: stages are the features, traced as calls
class RMTStage(nn.Module):
    """Optional downsampling from the previous stage, then blocks sharing one position module."""

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        num_heads: int,
        mlp_ratio: float,
        decomposed: bool,
        decay_init: float,
        decay_heads_range: float,
        drop_path: List[float],
        layer_scale_init: Optional[float],
        downsample: bool,
        attn_kernel: str,
    ):
        super().__init__()
        self.downsample = Downsample(in_dim, dim) if downsample else nn.Identity()
        self.position = ManhattanPosition(dim, num_heads, decay_init, decay_heads_range, decomposed)
        self.blocks = nn.ModuleList(
            RMTBlock(dim, num_heads, mlp_ratio, decomposed, drop_path[i], layer_scale_init, attn_kernel)
            for i in range(depth)
        )
        self.grad_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        x = self.downsample(x)
        return in_cpu_chunks(self, self._blocks, x, tokens_per_image=x.shape[1] * x.shape[2])

    def _blocks(self, x: Tensor) -> Tensor:
        for block in self.blocks:
            if self.grad_checkpointing and not torch.jit.is_scripting():
                x = checkpoint(block, x, self.position, use_reentrant=False)
            else:
                x = block(x, self.position)
        return x


class ClassifierHead(nn.Module):
    """Linear (C -> hidden) + BatchNorm + Swish on every token, global average pool, Linear."""

    def __init__(self, in_dim: int, hidden_size: int, num_classes: int, drop_rate: float = 0.0):
        super().__init__()
        self.proj = nn.Linear(in_dim, hidden_size)
        self.norm = nn.BatchNorm2d(hidden_size)
        self.act = nn.SiLU()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(hidden_size, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.norm(call_linear(self.proj, x).permute(0, 3, 1, 2))  # (B, hidden, H, W), channels-last view
        x = self.act(x).mean((2, 3))
        x = self.drop(x)
        return x if pre_logits else call_linear(self.fc, x)

    def reparameterize(self) -> None:
        """Fold the batch norm into ``proj`` (inference; see :func:`RMT.reparameterize`)."""
        if isinstance(self.norm, nn.BatchNorm2d):
            self.norm = fold_batch_norm(self.proj, self.norm)
        keep_autocast_weights(self)


class RMT(nn.Module):
    """RMT backbone and classifier (timm conventions: forward_features returns (B, H, W, C)).

    ``RMT.from_official(**kwargs)`` builds from the official constructor's argument names.
    """

    @classmethod
    def from_official(cls, attn_kernel: str = "auto", **official_kwargs: Any) -> "RMT":
        return cls(RMTConfig.from_official(**official_kwargs), attn_kernel=attn_kernel)

    def __init__(
        self,
        cfg: Optional[RMTConfig] = None,
        attn_kernel: str = "auto",
        drop_rate: float = 0.0,
        global_pool: str = "avg",
        device: Optional[Union[str, torch.device]] = None,
        dtype: Optional[torch.dtype] = None,
        **config_changes: Any,
    ):
        """Build from ``cfg`` with ``config_changes`` applied (or from RMTConfig fields alone).

        ``attn_kernel``: ``auto``, ``sdpa``, ``reference``, ``flex`` or ``triton`` (see rmt.models.attention).
        ``global_pool``, ``device`` and ``dtype`` are timm's model arguments: the head pools by its
        mean (``avg``), or with ``""`` and ``num_classes=0`` there is no head and ``forward`` returns
        the last stage's (B, H, W, C) features; the model is built, then moved to ``device`` and ``dtype``.
        """
        super().__init__()
        cfg = cfg.replace(**config_changes) if cfg is not None else RMTConfig(**config_changes)
        check_global_pool(global_pool, cfg.num_classes)
        self.cfg = cfg
        self.num_classes = cfg.num_classes
        self.in_chans = cfg.in_chans
        self.num_features = cfg.embed_dims[-1]
        self.head_hidden_size = cfg.head_hidden_size
        self.drop_rate = drop_rate
        kernel = resolve_attention_kernel(attn_kernel)

        self.stem = ConvStem(cfg.in_chans, cfg.embed_dims[0])
        total = sum(cfg.depths)
        dpr = [cfg.drop_path_rate * i / max(total - 1, 1) for i in range(total)]  # linear stochastic depth
        stages, self.feature_info = [], []
        in_dim, first_block = cfg.embed_dims[0], 0
        for i in range(cfg.num_stages):
            dim, depth = cfg.embed_dims[i], cfg.depths[i]
            stages.append(
                RMTStage(
                    in_dim, dim, depth, cfg.num_heads[i], cfg.mlp_ratios[i], cfg.decomposed_stages[i],
                    cfg.decay_init[i], cfg.decay_heads_range[i], dpr[first_block:first_block + depth],
                    cfg.layer_scale_init if cfg.layer_scale_stages[i] else None,
                    downsample=i > 0, attn_kernel=kernel,
                )
            )
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2**i, module=f"stages.{i}"))
            in_dim, first_block = dim, first_block + depth
        self.stages = nn.Sequential(*stages)
        self.head = ClassifierHead(self.num_features, cfg.head_hidden_size, cfg.num_classes, drop_rate)
        # token labelling: a classifier on every stage-4 token
        self.aux_head = (
            (nn.Linear(self.num_features, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity())
            if cfg.token_label else None
        )
        self.apply(self._init_weights)
        # every conv runs on channels-last activations; matching weights skip a reorder per call
        self.to(memory_format=torch.channels_last)
        if global_pool == "":
            self.head, self.aux_head = _NoHead(), None
        if device is not None or dtype is not None:
            self.to(device=device, dtype=dtype)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        # the official initialisation: its model-wide trunc_normal overrides the per-module xavier
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @property
    def attn_kernel(self) -> str:
        return self.stages[0].blocks[0].attn.kernel

    def set_attn_kernel(self, kernel: str) -> None:
        """Switch every block between the ``auto``, ``sdpa``, ``reference``, ``flex`` and ``triton`` attention kernels."""
        kernel = resolve_attention_kernel(kernel)
        for m in self.modules():
            if isinstance(m, ManhattanSelfAttention):
                m.kernel = kernel

    def reparameterize(self) -> "RMT":
        """Fold the model for inference, in place: the same function with fewer kernels per block.

        Batch norms (stem, downsampling, head) go into the conv or linear before them; each
        block's layer-norm scale and shift into the projections the norm feeds; the LCE and FFN
        depthwise-conv biases and the layer scales into the linears after them; the residual
        ``x + conv(x)`` of the CPE and FFN depthwise convs into the conv's centre tap. In fp32 the
        logits stay within about 1e-6 relative (1e-5 absolute) of the unfolded model's; under
        autocast the norms then run in the autocast dtype, with no float32 copies
        (:class:`~rmt.models.layers.AffineFreeLayerNorm`), and in inference the linears and convs
        keep their autocast-dtype weights from one pass to the next instead of casting them on
        every pass (:class:`~rmt.models.layers.AutocastWeightCache`; change a folded model's
        weights through its parameters, not in place through ``.data``). Batch norms fold with
        their running statistics (eval-mode semantics), and the state dict changes layout, so
        load checkpoints first. ``timm.utils.reparameterize_model(model)`` does the same on a
        copy. Returns the model.
        """
        for module in [m for m in self.modules() if m is not self and hasattr(m, "reparameterize")]:
            module.reparameterize()
        keep_autocast_weights(self)  # the layers outside the parts above (a token-label aux head)
        return self

    @property
    def is_reparameterized(self) -> bool:
        return any(isinstance(m, AffineFreeLayerNorm) for m in self.modules())

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return set()

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [(r"^stages\.(\d+).downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return getattr(self.head, "fc", nn.Identity())  # none left after global_pool='' or pruning

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        cfg = self.cfg.replace(num_classes=num_classes)  # checks it; the model changes only once all checks pass
        if global_pool is not None:
            check_global_pool(global_pool, num_classes)
        headless = isinstance(self.head, _NoHead)
        if headless and num_classes:
            raise ConfigError("this model's head was removed (global_pool='' or pruned): it takes no classifier")
        self.cfg, self.num_classes = cfg, num_classes
        if global_pool == "" or headless:
            self.head, self.aux_head = _NoHead(), None
            return
        self.head.fc = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        if self.aux_head is not None:
            self.aux_head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if self.is_reparameterized:  # a folded model's new classifier keeps its weights under autocast too
            for head in (self.head, self.aux_head):
                if head is not None:
                    keep_autocast_weights(head)

    def forward_intermediates(
        self,
        x: Tensor,
        indices: Optional[Union[int, List[int]]] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> Union[List[Tensor], Tuple[Tensor, List[Tensor]]]:
        """Stage outputs (strides 4, 8, 16, 32; before the next stage's downsampling).

        ``output_fmt`` is ``"NCHW"`` (contiguous) or ``"NHWC"``; ``norm`` is accepted for timm's
        API and does nothing (RMT has no norm on its stage outputs).
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ConfigError(f"output_fmt must be NCHW or NHWC, got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        intermediates = []
        check_image_batch(x, self.in_chans)
        x = self.stem(x)
        stages = self.stages[: max_index + 1] if stop_early else self.stages
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                intermediates.append(x.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else x)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(
        self, indices: Union[int, List[int]] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> List[int]:
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[: max_index + 1]
        if prune_head:
            self.head = _NoHead()
            self.aux_head = None
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        check_image_batch(x, self.in_chans)
        return self.stages(self.stem(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        logits = self.head(x, pre_logits=pre_logits)
        if pre_logits or self.aux_head is None or not self.num_classes:  # no classes: the head's pooled features
            return logits
        aux = call_linear(self.aux_head, x.flatten(1, 2))  # (B, H*W, classes)
        if self.training:  # token-labelling training needs the dense predictions
            return logits, aux
        return logits + 0.5 * aux.amax(dim=1)

    def forward(self, x: Tensor) -> Union[Tensor, Tuple[Tensor, Tensor]]:
        return self.forward_head(self.forward_features(x))


@register_notrace_function  # FX feature extraction: a call in the graph, not traced into
def check_image_batch(x: Tensor, in_chans: int) -> None:
    """Raise a one-line ConfigError unless ``x`` is a (batch, in_chans, height, width) tensor."""
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ConfigError(f"RMT takes images as a (batch, {in_chans}, height, width) tensor, got shape {tuple(x.shape)}")


def check_global_pool(global_pool: str, num_classes: int) -> None:
    """Raise a one-line ConfigError unless ``global_pool`` is one RMT has, with a fitting ``num_classes``."""
    if global_pool not in ("avg", ""):  # the head pools its projected tokens by their mean
        raise ConfigError(f"RMT's global_pool is 'avg' (the head's mean) or '' (no head), got {global_pool!r}")
    if global_pool == "" and num_classes:
        raise ConfigError(f"global_pool='' leaves no head to classify with: use it with num_classes=0, not {num_classes}")


class _NoHead(nn.Module):
    """The head after ``global_pool=''`` or ``prune_intermediate_layers``: ``forward`` returns the last stage's features."""

    def forward(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        return x


def checkpoint_filter_fn(state_dict: dict, model: RMT) -> dict:
    """Convert a checkpoint in any official layout to this model's state dict (timm's hook).

    When the model has another ``num_classes`` than its pretrained config's, all but the
    classifiers (head and aux_head): timm then drops the head's and loads non-strictly, and the
    new classifiers keep their initialisation, as :func:`rmt.create_model` leaves them."""
    from rmt.models.checkpoint import convert_checkpoint

    pretrained_classes = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes", model.num_classes)
    return convert_checkpoint(state_dict, model, without_classifier=model.num_classes != pretrained_classes)


def _cfg(crop_pct: float, **kwargs: Any) -> dict:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": crop_pct,
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0",
        "classifier": "head.fc",
        "paper_ids": "arXiv:2309.11523",
        "paper_name": "RMT: Retentive Networks Meet Vision Transformers",
        "origin_url": "https://github.com/qhfan/RMT",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        f"{name}.in1k": _cfg(crop_pct=0.96 if cfg.token_label else 0.875)
        for name, cfg in VARIANTS.items()
    }
)


_WEIGHT_SOURCES = ("file", "state_dict", "url", "hf_hub_id")  # where timm's pretrained_cfg can point


def _create_rmt(variant: str, pretrained: bool = False, **kwargs: Any) -> RMT:
    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    if pretrained and (overlay.get("file") or not any(overlay.get(source) for source in _WEIGHT_SOURCES)):
        # the official weights have no URL timm could fetch (Baidu pan only): they come from rmt's
        # verified cache, as with rmt.create_model(variant, pretrained=True), which builds through
        # here unpretrained. A file named in pretrained_cfg_overlay is loaded by the same code:
        # timm's loader would take a training file's EMA weights, which are not rmt_t's published
        # ones, and refuse another classifier under features_only. Weights given as a state dict,
        # a URL or a hub id go through timm's own loader.
        from rmt.models.factory import create_model

        if overlay.get("file"):
            return create_model(variant, checkpoint=overlay["file"], **kwargs)
        return create_model(variant, pretrained=True, **kwargs)
    if kwargs.get("features_only") and feature_kind(kwargs.get("feature_cls")) in ("dict", "list"):
        # they run the network's top-level children in turn, and RMT's stages are not among them (they
        # sit in one Sequential, which timm could only flatten with the stem's, skipping its forward)
        raise ConfigError(
            f"feature_cls={getattr(kwargs['feature_cls'], '__name__', kwargs['feature_cls'])!r} is not supported by RMT: "
            "use 'getter' (the default; (B, C, H, W) stage outputs), 'hook' or 'fx' (the stages' own (B, H, W, C))"
        )
    cfg = VARIANTS[variant]
    out_indices = kwargs.pop("out_indices", tuple(range(cfg.num_stages)))
    return build_model_with_cfg(
        RMT,
        variant,
        pretrained,
        cfg=cfg,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs,
    )


_FEATURE_CLASSES = (  # subclasses first
    (FeatureListNet, "list"), (FeatureDictNet, "dict"), (FeatureGetterNet, "getter"),
    (FeatureHookNet, "hook"), (FeatureGraphNet, "fx"),
)


def feature_kind(feature_cls: Any) -> Optional[str]:
    """The kind of timm feature model ``feature_cls`` asks for, read as timm reads it (a name in
    any case, any name holding "hook", or a class): "getter" (also for None: RMT's default),
    "hook", "fx", "dict" or "list"; None for any other class (a wrapper of the caller's own, or no
    feature model at all: ``feature_kind(type(model))`` tells timm's wrappers). A name timm does not know
    is a one-line ConfigError (timm would fail on an assertion)."""
    if feature_cls is None:
        return "getter"
    if isinstance(feature_cls, str):
        kind = "hook" if "hook" in feature_cls.lower() else feature_cls.lower()
        if kind not in ("getter", "hook", "fx", "dict", "list"):
            raise ConfigError(f"unknown feature_cls {feature_cls!r}: choose getter (the default), hook or fx")
        return kind
    return next((kind for cls, kind in _FEATURE_CLASSES if isinstance(feature_cls, type) and issubclass(feature_cls, cls)), None)


@register_model
def rmt_t(pretrained: bool = False, **kwargs: Any) -> RMT:
    """RMT-T (official ``RMT_T3``): 14.3 M parameters, 2.65 GMACs at 224."""
    return _create_rmt("rmt_t", pretrained, **kwargs)


@register_model
def rmt_s(pretrained: bool = False, **kwargs: Any) -> RMT:
    """RMT-S (official ``RMT_S``): 27.0 M parameters, 4.80 GMACs at 224."""
    return _create_rmt("rmt_s", pretrained, **kwargs)


@register_model
def rmt_b(pretrained: bool = False, **kwargs: Any) -> RMT:
    """RMT-B (official ``RMT_M2``): 54.2 M parameters, 10.41 GMACs at 224."""
    return _create_rmt("rmt_b", pretrained, **kwargs)


@register_model
def rmt_l(pretrained: bool = False, **kwargs: Any) -> RMT:
    """RMT-L (official ``RMT_L6``): 95.5 M parameters, 19.55 GMACs at 224."""
    return _create_rmt("rmt_l", pretrained, **kwargs)


@register_model
def rmt_s_tl(pretrained: bool = False, **kwargs: Any) -> RMT:
    """RMT-S* trained with token labelling (aux head on the stage-4 tokens)."""
    return _create_rmt("rmt_s_tl", pretrained, **kwargs)


@register_model
def rmt_b_tl(pretrained: bool = False, **kwargs: Any) -> RMT:
    """RMT-B* trained with token labelling (aux head on the stage-4 tokens)."""
    return _create_rmt("rmt_b_tl", pretrained, **kwargs)


@register_model
def rmt_l_tl(pretrained: bool = False, **kwargs: Any) -> RMT:
    """RMT-L* trained with token labelling (aux head on the stage-4 tokens)."""
    return _create_rmt("rmt_l_tl", pretrained, **kwargs)
