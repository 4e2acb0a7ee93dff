"""The evaluation loop on a CUDA device: exact counts, autocast, a real out-of-memory retry."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn
from torch.utils.data import Dataset

from rmt.data import EvalImageDataset, build_eval_transform, scan_imagenet_val
from rmt.eval import evaluate

from conftest import colour_code_state_dict, cuda_available, tiny_val_expected

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not cuda_available(), reason="needs a CUDA device")]
CUDA = torch.device("cuda", 0)


def colour_dataset(folder) -> tuple[nn.Module, EvalImageDataset]:
    model = timm.create_model("test_resnet")
    model.load_state_dict(colour_code_state_dict())
    cfg = model.pretrained_cfg
    val = scan_imagenet_val(folder)
    preprocessing = {k: cfg[k] for k in ("input_size", "interpolation", "crop_pct", "mean", "std")}
    return model, EvalImageDataset(val.paths, val.targets, build_eval_transform(preprocessing), tuple(cfg["input_size"]))


def test_known_predictions_on_cuda_with_workers_and_pinned_memory(tiny_val):
    model, dataset = colour_dataset(tiny_val["imagefolder"])
    counts = evaluate(model, dataset, batch_size=4, workers=2, device=CUDA, channels_last=True)
    assert (counts.images, counts.top1_correct, counts.top5_correct) == (13, *tiny_val_expected())


@pytest.mark.parametrize("amp, dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_reaches_the_model_on_cuda(tiny_val, amp, dtype):
    _, dataset = colour_dataset(tiny_val["flat-kaggle"])
    seen = []

    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(3, 1000)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x.mean((2, 3)))
            seen.append((y.dtype, y.device.type))
            return y

    assert evaluate(Probe(), dataset, batch_size=13, workers=0, device=CUDA, amp=amp).images == 13
    assert seen == [(dtype, "cuda")]


class _Blank(Dataset):
    def __len__(self) -> int:
        return 24

    def __getitem__(self, index: int):
        return torch.zeros(3, 8, 8), index % 1000, index, ""


class _HungryModel(nn.Module):
    """Needs 16 GiB of GPU memory per image: a batch of 16 cannot fit on any current GPU, 4 can."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scratch = torch.empty(len(x), 4 << 30, dtype=torch.float32, device=x.device)  # 16 GiB each
        del scratch
        return torch.zeros(len(x), 1000, device=x.device)


def test_a_real_cuda_out_of_memory_halves_the_batch():
    messages = []
    counts = evaluate(_HungryModel(), _Blank(), batch_size=16, workers=0, device=CUDA, on_message=messages.append)
    assert messages[0] == "out of memory at batch size 16; retrying with batch size 8"
    assert counts.images == 24
    torch.cuda.empty_cache()
