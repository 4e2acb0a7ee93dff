"""The configuration of an RMT network and the seven published variants.

The official code (GitHub qhfan/RMT, ``VisRetNet``) takes its configuration as constructor
arguments with names from the RetNet language-model code it grew out of. :class:`RMTConfig`
names the same things for what they are; :meth:`RMTConfig.from_official` and
:meth:`RMTConfig.to_official` translate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rmt.errors import ConfigError

# official argument name -> RMTConfig field
OFFICIAL_ARGUMENT_NAMES: dict[str, str] = {
    "embed_dims": "embed_dims",
    "depths": "depths",
    "num_heads": "num_heads",
    "mlp_ratios": "mlp_ratios",
    "chunkwise_recurrents": "decomposed_stages",
    "init_values": "decay_init",
    "heads_ranges": "decay_heads_range",
    "layerscales": "layer_scale_stages",
    "layer_init_values": "layer_scale_init",
    "projection": "head_hidden_size",
    "token_label": "token_label",
    "num_classes": "num_classes",
    "in_chans": "in_chans",
    "drop_path_rate": "drop_path_rate",
}
# official arguments that do not change the network computed at inference
_OFFICIAL_IGNORED = {"norm_layer", "patch_norm", "use_checkpoints", "args"}

_PER_STAGE = (
    "embed_dims",
    "depths",
    "num_heads",
    "mlp_ratios",
    "decomposed_stages",
    "decay_init",
    "decay_heads_range",
    "layer_scale_stages",
)


@dataclass(frozen=True)
class RMTConfig:
    """Architecture of an RMT network (four stages; every per-stage field has one entry a stage).

    Attributes:
        embed_dims: channels of each stage.
        depths: blocks in each stage.
        num_heads: attention heads in each stage.
        mlp_ratios: hidden width of the feed-forward network as a multiple of the stage width.
        decomposed_stages: stages whose Manhattan self-attention is decomposed into attention
            along each row then along each column (1-D distances); the others attend over the
            whole feature map with the 2-D Manhattan distance.
        decay_init, decay_heads_range: the per-head spatial decay of a stage is
            ``log(1 - 2 ** (-decay_init - decay_heads_range * head / num_heads))``.
        layer_scale_stages: stages whose residual branches are scaled by learned per-channel
            factors initialised to ``layer_scale_init``.
        head_hidden_size: width of the projection (Linear + BatchNorm + Swish) before pooling.
        token_label: adds the token-labelling auxiliary head (a Linear on every stage-4 token);
            evaluation logits are ``class logits + 0.5 * max over tokens of the aux logits``.
        num_classes: classifier outputs (0: no classifier).
        in_chans: image channels.
        drop_path_rate: stochastic depth, rising linearly from 0 over all blocks.
    """

    embed_dims: tuple[int, ...]
    depths: tuple[int, ...]
    num_heads: tuple[int, ...]
    mlp_ratios: tuple[float, ...]
    decomposed_stages: tuple[bool, ...]
    decay_init: tuple[float, ...] = (2.0, 2.0, 2.0, 2.0)
    decay_heads_range: tuple[float, ...] = (4.0, 4.0, 6.0, 6.0)
    layer_scale_stages: tuple[bool, ...] = (False, False, False, False)
    layer_scale_init: float = 1e-6
    head_hidden_size: int = 1024
    token_label: bool = False
    num_classes: int = 1000
    in_chans: int = 3
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        for name in _PER_STAGE:
            value = getattr(self, name)
            if isinstance(value, (str, bytes)) or not hasattr(value, "__len__"):
                raise ConfigError(f"RMTConfig.{name} must be a sequence with one entry per stage, got {value!r}")
            object.__setattr__(self, name, tuple(value))
        stages = len(self.embed_dims)
        if stages == 0:
            raise ConfigError("RMTConfig.embed_dims is empty: an RMT network needs at least one stage")
        for name in _PER_STAGE:
            if len(getattr(self, name)) != stages:
                raise ConfigError(
                    f"RMTConfig.{name} has {len(getattr(self, name))} entries but embed_dims has {stages}: "
                    "every per-stage field needs one entry per stage"
                )
        for i, (dim, heads) in enumerate(zip(self.embed_dims, self.num_heads)):
            if dim <= 0 or heads <= 0 or dim % heads:
                raise ConfigError(f"stage {i}: embed_dim {dim} is not a positive multiple of num_heads {heads}")
            if (dim // heads) % 2:
                raise ConfigError(
                    f"stage {i}: head dimension {dim // heads} is odd; the rotary position code needs pairs"
                )
        if self.embed_dims[0] % 2:
            raise ConfigError(f"embed_dims[0] = {self.embed_dims[0]} must be even (the stem halves it)")
        if any(d <= 0 for d in self.depths):
            raise ConfigError(f"RMTConfig.depths must be positive, got {self.depths}")
        for name, least in (("num_classes", 0), ("in_chans", 1), ("head_hidden_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise ConfigError(f"RMTConfig.{name} must be a whole number >= {least}, got {value!r}")
        rate = self.drop_path_rate
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 <= rate < 1:
            raise ConfigError(f"RMTConfig.drop_path_rate must be a number from 0 to below 1, got {rate!r}")

    @property
    def num_stages(self) -> int:
        return len(self.embed_dims)

    def replace(self, **changes: Any) -> "RMTConfig":
        """A copy with some fields changed (unknown field names raise ConfigError)."""
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown RMTConfig field(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_official(cls, **kwargs: Any) -> "RMTConfig":
        """Build from the official ``VisRetNet`` constructor's argument names."""
        unknown = set(kwargs) - set(OFFICIAL_ARGUMENT_NAMES) - _OFFICIAL_IGNORED
        if unknown:
            raise ConfigError(f"unknown official RMT argument(s): {', '.join(sorted(unknown))}")
        values = {OFFICIAL_ARGUMENT_NAMES[k]: v for k, v in kwargs.items() if k in OFFICIAL_ARGUMENT_NAMES}
        return cls(**values)

    def to_official(self) -> dict[str, Any]:
        """The official ``VisRetNet`` constructor arguments describing this network."""
        out: dict[str, Any] = {}
        for official, ours in OFFICIAL_ARGUMENT_NAMES.items():
            value = getattr(self, ours)
            out[official] = list(value) if isinstance(value, tuple) else value
        return out


# The published variants. Drop-path rates are the official training values.
VARIANTS: dict[str, RMTConfig] = {
    "rmt_t": RMTConfig(
        embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16),
        mlp_ratios=(3, 3, 3, 3), decomposed_stages=(True, True, False, False),
        decay_heads_range=(4, 4, 6, 6), drop_path_rate=0.1,
    ),
    "rmt_s": RMTConfig(
        embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 4), num_heads=(4, 4, 8, 16),
        mlp_ratios=(4, 4, 3, 3), decomposed_stages=(True, True, True, False),
        decay_heads_range=(4, 4, 6, 6), drop_path_rate=0.15,
    ),
    "rmt_b": RMTConfig(
        embed_dims=(80, 160, 320, 512), depths=(4, 8, 25, 8), num_heads=(5, 5, 10, 16),
        mlp_ratios=(4, 4, 3, 3), decomposed_stages=(True, True, True, False),
        decay_heads_range=(5, 5, 6, 6), layer_scale_stages=(False, False, True, True), drop_path_rate=0.4,
    ),
    "rmt_l": RMTConfig(
        embed_dims=(112, 224, 448, 640), depths=(4, 8, 25, 8), num_heads=(7, 7, 14, 20),
        mlp_ratios=(4, 4, 3, 3), decomposed_stages=(True, True, True, False),
        decay_heads_range=(6, 6, 6, 6), layer_scale_stages=(False, False, True, True), drop_path_rate=0.5,
    ),
}
for _name in ("rmt_s", "rmt_b", "rmt_l"):
    VARIANTS[f"{_name}_tl"] = VARIANTS[_name].replace(token_label=True)

OFFICIAL_FACTORIES: dict[str, str] = {
    "rmt_t": "classfication_release/RMT.py:RMT_T3",
    "rmt_s": "classfication_release/RMT.py:RMT_S",
    "rmt_b": "classfication_release/RMT.py:RMT_M2",
    "rmt_l": "classfication_release/RMT.py:RMT_L6",
    "rmt_s_tl": "classification_token_label_release/RMT.py:RMT_S",
    "rmt_b_tl": "classification_token_label_release/RMT.py:RMT_M2",
    "rmt_l_tl": "classification_token_label_release/RMT.py:RMT_L6",
}
