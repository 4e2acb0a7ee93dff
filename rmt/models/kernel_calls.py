"""What the calls of RMT's own kernels share: when a kernel may stand in for torch's operator, a
profiler label, and the GPU to launch on."""

from __future__ import annotations

import contextlib
from typing import Optional

import torch
from torch import Tensor
from torch.autograd import forward_ad as _forward_ad


def nothing_watches(x: Tensor, *parameters: Optional[Tensor]) -> bool:
    """Whether an eager call on ``x`` and ``parameters`` may run a kernel that torch does not know
    (oneDNN's linear called directly, a Triton kernel) in place of torch's operator, which
    everything below would otherwise see or need:
    - ``x`` a plain tensor, and no torch-function override or mode (tensor subclasses, FX proxies,
      ``torch.device``): they would see the operator, and a proxy cannot be tested for truth;
    - no dispatch mode (``FlopCounterMode`` counting the operator, ``FakeTensorMode``);
    - no forward-mode derivative (a dual input's tangent would be dropped) and no ``torch.func``
      transform (``vmap``, ``jvp``: no batching rule, wrapped tensors without storage);
    - not ``torch.jit.trace``, which would record what the kernel's wrapper allocates and not
      the kernel.
    Not for compiled code: dynamo cannot trace these checks."""
    return (
        type(x) is Tensor
        and not torch._C._has_torch_function((x, *parameters))
        and not torch._C._len_torch_dispatch_stack()
        and _forward_ad._current_level < 0
        and torch._C._functorch.peek_interpreter_stack() is None
        and not torch.jit.is_tracing()
    )


def profiler_label(name: str) -> contextlib.AbstractContextManager:
    """``record_function(name)`` while a profiler records (so profiles, and ``rmt bench``'s
    attention_ops, name the code it wraps), a no-op otherwise: the label costs CPU time on
    every call."""
    if torch.autograd.profiler._is_profiler_enabled:
        return torch.profiler.record_function(name)
    return contextlib.nullcontext()


def on_the_tensors_gpu(t: Tensor) -> contextlib.AbstractContextManager:
    """The context a Triton kernel on ``t`` launches in: Triton launches on the current device,
    not the tensors' (a model on cuda:1 while cuda:0 is current)."""
    on_other_gpu = t.is_cuda and t.device.index != torch.cuda.current_device()
    return torch.cuda.device(t.device) if on_other_gpu else contextlib.nullcontext()
