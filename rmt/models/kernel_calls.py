"""What the calls of RMT's own kernels share: a profiler label, and the GPU to launch on."""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


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
