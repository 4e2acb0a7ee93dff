"""How many operators one forward pass runs: the measure of work that bounds eager CUDA inference
at small batches, where the CPU cannot launch kernels as fast as the GPU finishes them.

Counts every ATen operator dispatched below autograd and autocast, so autocast's casts are included.
Views, and calls that return their input unchanged (a ``to`` to the dtype a tensor already has),
launch nothing and are left out. Runs on the CPU: the default attention kernel is SDPA, one
operator as on CUDA. Read the counts as operators, not as CUDA's exact kernel counts:
- a CUDA conv with a bias adds a second kernel;
- CUDA autocast runs layer norm in float32, with copies in and out that CPU autocast does not make;
- eval-mode CPU inference splits batches into chunks of images (batch 1, the default, has none).

    python scripts/op_counts.py                                  # fp32, batch 1
    python scripts/op_counts.py --dtype bf16 --reparam --json ops.json
    python scripts/op_counts.py --dtype bf16 --no-weight-cache   # weights cast on every pass
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from rmt.bench.runner import build_model, precision
from rmt.zoo import fold_for_inference
from rmt.io import write_json_atomic


class OperatorCounter(TorchDispatchMode):
    """Counts the operators that produce or write tensor data, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        returns = func._schema.returns
        in_place = bool(returns) and returns[0].alias_info is not None and returns[0].alias_info.is_write
        if in_place or not _shares_storage(out, (args, kwargs)):
            self.counts[func.overloadpacket.__name__] += 1
        return out


def _shares_storage(out, args) -> bool:
    """Whether an op returned its input or a view of it (a view op, or dropout in eval mode)."""
    inputs = {t.untyped_storage().data_ptr() for t in tree_leaves(args) if isinstance(t, torch.Tensor)}
    outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
    return bool(outputs) and all(t.untyped_storage().data_ptr() in inputs for t in outputs)


def count_operators(model: torch.nn.Module, x: torch.Tensor, dtype: str, weight_cache: bool = True) -> collections.Counter[str]:
    with torch.inference_mode(), precision(torch.device("cpu"), dtype, autocast_cache=weight_cache):
        model(x)  # first call: position tables and other caches are built outside the count
        with OperatorCounter() as counter:
            model(x)
    return counter.counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["swin_t", "rmt_t", "rmt_s", "rmt_b"])
    parser.add_argument("--kernel", default="sdpa", help="attention kernel of the RMT models (sdpa: one operator, as on CUDA)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="bf16: CPU autocast, casts counted")
    parser.add_argument("--reparam", action="store_true", help="also count each model folded for inference")
    parser.add_argument("--no-weight-cache", action="store_true",
                        help="autocast(cache_enabled=False): RMT casts its weights on every pass, as timm models do")
    parser.add_argument("--json", help="write the counts here")
    args = parser.parse_args()

    size = (args.img_size, args.img_size)
    x = torch.randn(args.batch, 3, *size)
    results = []
    for name in args.models:
        for folded in (False, True) if args.reparam else (False,):
            model = build_model(name, size, args.kernel if name.startswith("rmt") else None).eval()
            if folded and not fold_for_inference(model, name):
                continue
            counts = count_operators(model, x, args.dtype, weight_cache=not args.no_weight_cache)
            label = f"{name}[reparam]" if folded else name
            total = sum(counts.values())
            results.append({"model": label, "operators": total, "by_name": dict(counts.most_common())})
            top = ", ".join(f"{op} {n}" for op, n in counts.most_common(8))
            print(f"{label:18s} {total:6d}   {top}")
    if args.json:
        write_json_atomic(args.json, {"batch": args.batch, "img_size": args.img_size, "dtype": args.dtype, "kernel": args.kernel,
                                      "weight_cache": not args.no_weight_cache, "torch": torch.__version__, "results": results})


if __name__ == "__main__":
    main()
