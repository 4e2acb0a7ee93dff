"""The RMT model family: configuration, modules, checkpoints and the factory."""

from rmt.models.attention import ATTENTION_KERNELS, ManhattanSelfAttention
from rmt.models.checkpoint import export_official_state_dict, load_checkpoint, read_checkpoint
from rmt.models.config import OFFICIAL_FACTORIES, VARIANTS, RMTConfig
from rmt.models.factory import check_model_name, create_model, list_models
from rmt.models.rmt import RMT, checkpoint_filter_fn

__all__ = [
    "ATTENTION_KERNELS",
    "OFFICIAL_FACTORIES",
    "RMT",
    "RMTConfig",
    "VARIANTS",
    "ManhattanSelfAttention",
    "check_model_name",
    "checkpoint_filter_fn",
    "create_model",
    "export_official_state_dict",
    "list_models",
    "load_checkpoint",
    "read_checkpoint",
]
