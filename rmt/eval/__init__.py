"""ImageNet evaluation: the loop, exact distributed sharding, and ``rmt eval`` as a function."""

from rmt.eval.distributed import DistributedContext, ShardSampler, context_from_env, process_group, resolve_device
from rmt.eval.imagenet import EvalReport, default_workers, run_imagenet_eval, top1_gate
from rmt.io import write_json_atomic
from rmt.eval.loop import AMP_DTYPES, EvalCounts, Progress, evaluate

__all__ = [
    "AMP_DTYPES",
    "DistributedContext",
    "EvalCounts",
    "EvalReport",
    "Progress",
    "ShardSampler",
    "context_from_env",
    "default_workers",
    "evaluate",
    "process_group",
    "resolve_device",
    "run_imagenet_eval",
    "top1_gate",
    "write_json_atomic",
]
