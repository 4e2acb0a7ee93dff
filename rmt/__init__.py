"""rmt: the RMT vision backbone (Fan et al., CVPR 2024), its model zoo and benchmarks.

``import rmt`` registers the seven RMT variants with timm, so ``timm.create_model("rmt_s")``
works as well as ``rmt.create_model("rmt_s", checkpoint=...)``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rmt")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from rmt.errors import CheckpointError, ConfigError, RMTError, UnknownModelError
from rmt.models import (
    RMT,
    RMTConfig,
    create_model,
    export_official_state_dict,
    list_models,
    load_checkpoint,
)

__all__ = [
    "RMT",
    "CheckpointError",
    "ConfigError",
    "RMTConfig",
    "RMTError",
    "UnknownModelError",
    "__version__",
    "create_model",
    "export_official_state_dict",
    "list_models",
    "load_checkpoint",
]
