"""Reading official RMT checkpoints safely and converting them to and from our layout.

The official training code writes three layouts: a DeiT-style training dict (``model``,
``model_ema``, ``optimizer``, ..., ``args`` as a pickled ``argparse.Namespace``), a timm
checkpoint-saver dict (``state_dict``, ``state_dict_ema``, ``arch``, ...) and a bare state dict,
possibly with DDP's ``module.`` prefix. Files are opened with ``weights_only=True``: nothing in a
checkpoint can run code, only ``argparse.Namespace`` is allowed besides tensors and containers.

Our layout differs from the official one in names (timm style) and in one fused ``qk``
projection; :func:`convert_checkpoint` maps official keys to ours and
:func:`export_official_state_dict` maps back, so weights travel both ways.
"""

from __future__ import annotations

import argparse
import functools
import os
import pickle
import pickletools
import re
import struct
import warnings
import zipfile
from collections import OrderedDict
from typing import Any, Mapping, Optional, Union

import torch
from torch import Tensor, nn

from rmt.errors import CheckpointError, first_line
from rmt.io import atomic_write, check_writable, same_file

PathLike = Union[str, os.PathLike]

_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
_RELPOS = re.compile(r"^layers\.(\d+)\.Relpos\.(angle|decay)$")
_MAX_LISTED = 3

# official key pattern -> our key pattern; applied after stage/block indices are extracted
_BLOCK_RENAMES = {
    "pos.conv": "cpe",
    "retention_layer_norm": "norm1",
    "retention.lepe.conv": "attn.lce",
    "retention.out_proj": "attn.proj",
    "retention.v_proj": "attn.v",
    "final_layer_norm": "norm2",
    "ffn.fc1": "mlp.fc1",
    "ffn.fc2": "mlp.fc2",
    "ffn.dwconv.conv": "mlp.dwconv",
}
_QK = ("q_proj", "k_proj")
_REPARAMETERIZED = "the model is reparameterized for inference; load checkpoints before calling reparameterize()"


# ----------------------------------------------------------------------------- reading files


def read_checkpoint(path: PathLike) -> Any:
    """Load a checkpoint file without running any code it may contain.

    A ``torch.save`` file or a safetensors file (a dict of tensors), told apart by their content:
    the name may say otherwise (a download saved under another name, a file renamed by hand).
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint path is a directory, not a file: {path}")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint not found: {path}" if not os.path.lexists(path) else f"{path} {not_a_file(path)}")
    size = os.path.getsize(path)
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy did not complete")
    try:
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror or e}") from None
    if looks_like_html(head):
        raise CheckpointError(
            f"{path} is an HTML page, not a checkpoint: a web page (a share or login page) was saved "
            "instead of the file; download the file itself"
        )
    if _safetensors_head(head):
        return _read_safetensors(path, size)
    try:
        # a file object, not the path: torch.load takes any path ending in .safetensors for a
        # safetensors file, whatever it holds
        with open(path, "rb") as f, torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "pickle protocol N" notes on old files
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        code = _code_globals(path)
        if code:
            raise CheckpointError(
                f"refused to open {path}: it holds Python objects ({', '.join(code[:3])}) that would run code "
                "when loaded; only tensors, containers and argparse.Namespace are accepted"
            ) from None
        raise CheckpointError(
            f"refused to open {path}: the safe loader cannot read it ({_unpickling_reason(e)}); "
            "only torch.save files of tensors, containers and argparse.Namespace are accepted"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError, AttributeError, IndexError, KeyError) as e:
        # the first sentence: torch appends a paragraph of advice to some of these
        reason = re.split(r"(?<=\.)\s", first_line(e), maxsplit=1)[0]
        raise CheckpointError(f"{path} is not a readable checkpoint ({size:,} bytes; truncated or corrupt): {reason}") from None


def not_a_file(path: PathLike) -> str:
    """What a path that exists (or is a link) but is no regular file is, for messages: ``is a ...``."""
    if os.path.islink(path) and not os.path.exists(path):
        return f"is a broken symbolic link (to {os.readlink(path)})"
    if os.path.isdir(path):
        return "is a directory, not a file"
    return "is a device or other special file, not a regular file"


def is_safetensors(path: PathLike) -> bool:
    """True for a safetensors file: an 8-byte header length, then a JSON header (``{``)."""
    try:
        with open(path, "rb") as f:
            return _safetensors_head(f.read(9))
    except OSError:
        return False


def _safetensors_head(head: bytes) -> bool:
    """Whether a file's first bytes (at least 9 of them) are a safetensors header's start."""
    return len(head) >= 9 and head[8:9] == b"{" and struct.unpack("<Q", head[:8])[0] < 100 << 20


def _read_safetensors(path: str, size: int) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise CheckpointError(
            f"{path} is not a readable safetensors file ({size:,} bytes; truncated or corrupt): {first_line(e)}"
        ) from None


_SAFE_GLOBALS = {"argparse.Namespace", "collections.OrderedDict", "torch._utils._rebuild_tensor_v2",
                 "torch._utils._rebuild_parameter", "torch.FloatStorage", "torch.HalfStorage",
                 "torch.BFloat16Storage", "torch.LongStorage", "torch.IntStorage", "torch.DoubleStorage",
                 "torch.ByteStorage", "torch.BoolStorage", "torch.CharStorage", "torch.ShortStorage"}


def _code_globals(path: str) -> list[str]:
    """Names of the Python callables a pickle would import (read with pickletools, nothing run)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                data = z.read(name) if name else b""
        else:
            with open(path, "rb") as f:
                data = f.read()
    except (OSError, zipfile.BadZipFile):
        return []
    found: list[str] = []
    strings: list[str] = []
    try:
        for opcode, arg, _ in pickletools.genops(data):
            if isinstance(arg, str) and "UNICODE" in opcode.name:
                strings.append(arg)
            elif opcode.name == "GLOBAL":
                found.append(arg.replace(" ", "."))
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # a corrupt stream: report what was found up to there
        pass
    unsafe = [g for g in dict.fromkeys(found) if g not in _SAFE_GLOBALS and not g.startswith("torch.")]
    return unsafe


def _unpickling_reason(error: BaseException) -> str:
    match = re.search(r"(Unsupported [^.\n]*)", str(error))
    return match.group(1).strip() if match else first_line(error)


def looks_like_html(head: bytes) -> bool:
    """Whether the first bytes of a file are a web page (a share, login or error page)."""
    return head.lstrip()[:16].lower().startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body"))


def select_state_dict(
    checkpoint: Any, ema: Optional[bool] = None, prefer_ema: bool = True
) -> tuple[dict[str, Tensor], str]:
    """The state dict inside a checkpoint and where it came from.

    ``ema=True`` requires the EMA weights and ``False`` the plain model's. ``None`` takes, of a file
    holding both, the EMA weights if ``prefer_ema`` else the plain ones, and of a file holding one,
    that one. Returns the state dict (``module.`` prefixes removed) and the key it was found under
    (``""`` for a bare state dict).
    """
    if not isinstance(checkpoint, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(checkpoint).__name__}, not a dict of tensors")
    candidates = [("model_ema", "model"), ("state_dict_ema", "state_dict")]
    for ema_key, plain_key in candidates:
        if plain_key in checkpoint or ema_key in checkpoint:
            has_ema = isinstance(checkpoint.get(ema_key), Mapping) and len(checkpoint[ema_key]) > 0
            if ema is True and not has_ema:
                raise CheckpointError(
                    f"checkpoint has no EMA weights ('{ema_key}' missing or empty; it has: {', '.join(map(str, checkpoint))})"
                )
            if ema is None:
                key = ema_key if has_ema and (prefer_ema or plain_key not in checkpoint) else plain_key
            else:
                key = ema_key if ema else plain_key
            if key not in checkpoint:
                raise CheckpointError(f"checkpoint has no '{key}' entry (it has: {', '.join(map(str, checkpoint))})")
            return _strip_prefix(checkpoint[key], key), key
    if ema:
        raise CheckpointError("checkpoint is a bare state dict: it has no EMA weights")
    return _strip_prefix(checkpoint, ""), ""


def _strip_prefix(state_dict: Any, where: str) -> dict[str, Tensor]:
    if not isinstance(state_dict, Mapping):
        raise CheckpointError(f"checkpoint entry '{where}' is a {type(state_dict).__name__}, not a state dict")
    out = {}
    for key, value in state_dict.items():
        entry = f"checkpoint entry {(where + ': ') if where else ''}{key!r}"
        if not isinstance(key, str):
            raise CheckpointError(f"{entry} has a key of type {type(key).__name__}, not a parameter name: not a state dict")
        if not isinstance(value, Tensor):
            raise CheckpointError(f"{entry} is a {type(value).__name__}, not a tensor: not a state dict")
        if value.is_meta:
            raise CheckpointError(f"{entry} is a tensor without data (saved from the meta device): not trained weights")
        if value.is_complex() or not (value.is_floating_point() or value.dtype in _INTEGER_DTYPES):
            raise CheckpointError(f"{entry} holds {str(value.dtype).removeprefix('torch.')} numbers: not model weights")
        out[key[len("module."):] if key.startswith("module.") else key] = value
    return out


# counters (batch norms' num_batches_tracked) and masks that state dicts may hold besides floats
_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)


# ----------------------------------------------------------------------------- layouts


def _is_official_layout(state_dict: Mapping[str, Tensor]) -> bool:
    return any(k.startswith(("layers.", "patch_embed.")) for k in state_dict)


def export_official_state_dict(model: nn.Module) -> "OrderedDict[str, Tensor]":
    """Our model's weights in the official state-dict layout (``Relpos`` buffers included).

    ``torch.save({"model": export_official_state_dict(model)}, path)`` writes a file the official
    code's ``load_state_dict`` takes strictly. The tensors are contiguous, as the official model's
    are (ours keeps its conv weights channels-last), so safetensors can save them too.
    """
    _refuse_feature_model(model, "export the full model's weights (before features_only wraps it)")
    _refuse_reparameterized(model)
    ours = model.state_dict()
    out: "OrderedDict[str, Tensor]" = OrderedDict()
    for key, value in ours.items():
        for official, tensor in _to_official(key, value):
            out[official] = tensor.contiguous()
    stages = list(getattr(model, "stages", []))
    for i, stage in enumerate(stages):
        out[f"layers.{i}.Relpos.angle"] = stage.position.angle.detach().clone()
        out[f"layers.{i}.Relpos.decay"] = stage.position.decay.detach().clone()
    return out


def _refuse_feature_model(model: nn.Module, instead: str) -> None:
    # timm's feature wrappers hold the network (as .model, .body or .graph_module), its head
    # pruned: neither layout's keys
    from rmt.models.rmt import feature_kind  # (rmt.models.rmt loads checkpoints through this module)

    if feature_kind(type(model)) is not None:
        raise CheckpointError(f"a feature model (features_only=True) has no checkpoint layout of its own: {instead}")


def _refuse_reparameterized(model: nn.Module) -> None:
    # the official layout has norms, batch norms and biases that a folded model no longer has
    if getattr(model, "is_reparameterized", False):
        raise CheckpointError("a reparameterized model has no official layout: export it before calling reparameterize()")


def _to_official(key: str, value: Tensor) -> list[tuple[str, Tensor]]:
    if key.startswith("stem."):
        return [("patch_embed.proj." + key[len("stem."):], value)]
    if key.startswith("head."):
        rest = key[len("head."):]
        if rest.startswith("fc."):
            return [("head." + rest[len("fc."):], value)]
        return [(rest, value)]  # head.proj -> proj, head.norm -> norm
    if key.startswith("aux_head."):
        return [(key, value)]
    m = re.match(r"^stages\.(\d+)\.downsample\.(conv|norm)\.(.+)$", key)
    if m:
        stage, part, rest = int(m.group(1)), m.group(2), m.group(3)
        return [(f"layers.{stage - 1}.downsample.{'reduction' if part == 'conv' else 'norm'}.{rest}", value)]
    m = re.match(r"^stages\.(\d+)\.blocks\.(\d+)\.(.+)$", key)
    if m:
        prefix, rest = f"layers.{m.group(1)}.blocks.{m.group(2)}.", m.group(3)
        if rest.startswith("attn.qk."):
            param = rest[len("attn.qk."):]
            return [(f"{prefix}retention.{name}.{param}", part.clone()) for name, part in zip(_QK, value.chunk(2, 0))]
        if rest.startswith("attn.v."):
            return [(f"{prefix}retention.v_proj.{rest[len('attn.v.'):]}", value)]
        if rest in ("ls1.gamma", "ls2.gamma"):
            return [(f"{prefix}gamma_{rest[2]}", value.reshape(1, 1, 1, -1))]
        for official, ours in _BLOCK_RENAMES.items():
            if rest.startswith(ours + "."):
                return [(prefix + official + rest[len(ours):], value)]
    raise CheckpointError(f"no official name for our key '{key}'")


def _from_official(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename official keys to ours; q and k projections are concatenated into qk."""
    out: dict[str, Tensor] = {}
    qk_parts: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        if _RELPOS.match(key):
            continue
        if key.startswith("patch_embed.proj."):
            out["stem." + key[len("patch_embed.proj."):]] = value
            continue
        if key.startswith(("proj.", "norm.")):
            out["head." + key] = value
            continue
        if key.startswith("head."):
            out["head.fc." + key[len("head."):]] = value
            continue
        m = re.match(r"^layers\.(\d+)\.downsample\.(reduction|norm)\.(.+)$", key)
        if m:
            part = "conv" if m.group(2) == "reduction" else "norm"
            out[f"stages.{int(m.group(1)) + 1}.downsample.{part}.{m.group(3)}"] = value
            continue
        m = re.match(r"^layers\.(\d+)\.blocks\.(\d+)\.(.+)$", key)
        if m:
            prefix, rest = f"stages.{m.group(1)}.blocks.{m.group(2)}.", m.group(3)
            q = re.match(r"^retention\.(q_proj|k_proj)\.(weight|bias)$", rest)
            if q:
                qk_parts.setdefault(f"{prefix}attn.qk.{q.group(2)}", {})[q.group(1)] = value
                continue
            if rest in ("gamma_1", "gamma_2"):
                out[f"{prefix}ls{rest[-1]}.gamma"] = value.reshape(-1)
                continue
            for official, ours in _BLOCK_RENAMES.items():
                if rest.startswith(official + "."):
                    out[prefix + ours + rest[len(official):]] = value
                    break
            else:
                out[key] = value  # unknown: reported as unexpected under its own name
            continue
        out[key] = value
    for key, parts in qk_parts.items():
        out[key] = torch.cat([parts[name] for name in _QK])  # completeness checked before
    return out


# ----------------------------------------------------------------------------- validation


def _shape(shape: Any) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _listed(items: list[str]) -> str:
    shown = ", ".join(items[:_MAX_LISTED])
    return shown + (f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else "")


def _param_count(shapes: Mapping[str, Any]) -> int:
    total = 0
    for key, shape in shapes.items():
        if key.endswith(_BUFFER_SUFFIXES) or _RELPOS.match(key):
            continue
        n = 1
        for s in shape:
            n *= int(s)
        total += n
    return total


def check_fits(
    state_dict: Mapping[str, Tensor], expected: Mapping[str, torch.Size], model_name: str, optional: tuple = ()
) -> None:
    """Raise a one-line CheckpointError unless keys and shapes match ``expected`` exactly."""
    got = {k: tuple(v.shape) for k, v in state_dict.items() if k not in optional}
    want = {k: tuple(v) for k, v in expected.items() if k not in optional}
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    mismatched = [k for k in want if k in got and got[k] != want[k]]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if mismatched:
        problems.append(
            f"{len(mismatched)} shape mismatch(es): "
            + _listed([f"{k} {_shape(got[k])} in file vs {_shape(want[k])} in model" for k in mismatched])
        )
    if missing:
        problems.append(f"{len(missing)} missing key(s): " + _listed([f"{k} {_shape(want[k])}" for k in missing]))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s): " + _listed([f"{k} {_shape(got[k])}" for k in unexpected]))
    have, need = _param_count(got), _param_count(want)
    count = f"it holds {have:,} parameters, {model_name} has {need:,}"
    if have != need:
        count += f" ({abs(have - need):,} {'more' if have > need else 'fewer'})"
    guess = _guess_variant(got, model_name)
    if guess:
        count += f"; it looks like a {guess} checkpoint"
    raise CheckpointError(f"checkpoint does not fit {model_name}: {count}; " + "; ".join(problems))


def _guess_variant(shapes: Mapping[str, tuple], model_name: str) -> Optional[str]:
    """The published variant whose state dict, in the official layout or ours, has exactly these
    keys and shapes."""
    from rmt.models.config import VARIANTS

    keys = {k for k in shapes if not _RELPOS.match(k)}
    for name in VARIANTS:
        for ref in (official_shapes(name), _rmt_shapes(name)):
            if name != model_name and keys == {k for k in ref if not _RELPOS.match(k)}:
                if all(ref[k] == tuple(shapes[k]) for k in keys):
                    return name
    return None


@functools.lru_cache(maxsize=None)
def _variant_on_meta(name: str) -> nn.Module:
    """A published variant without storage: its layout and shapes, for checks that load nothing."""
    from rmt.models.config import VARIANTS
    from rmt.models.rmt import RMT

    with torch.device("meta"):
        return RMT(VARIANTS[name])


def official_shapes(name: str) -> dict[str, tuple]:
    """Keys and shapes of a published variant's official state dict."""
    return {k: tuple(v.shape) for k, v in export_official_state_dict(_variant_on_meta(name)).items()}


def _rmt_shapes(name: str) -> dict[str, tuple]:
    """Keys and shapes of a published variant's state dict in our layout."""
    return {k: tuple(v.shape) for k, v in _variant_on_meta(name).state_dict().items()}


def _is_classifier_key(key: str) -> bool:
    """The classifier's tensors, in either layout (ours: ``head.fc``; official: ``head``; both: ``aux_head``)."""
    return key.startswith(("head.fc.", "aux_head.")) or key in ("head.weight", "head.bias")


def check_state_dict(
    state_dict: Mapping[str, Tensor], model: nn.Module, name: str, without_classifier: bool = False
) -> str:
    """Raise a one-line CheckpointError unless ``state_dict`` (official layout or ours) fits
    ``model`` exactly, derived ``Relpos`` buffers included (``without_classifier``: all but the
    classifiers' tensors, on either side); returns ``"official"`` or ``"rmt"``."""
    reparameterized = getattr(model, "is_reparameterized", False)

    def kept(key: str) -> bool:
        return not (without_classifier and _is_classifier_key(key))

    if without_classifier:
        state_dict = {k: v for k, v in state_dict.items() if kept(k)}
    if not _is_official_layout(state_dict):
        try:
            check_fits(state_dict, {k: v.shape for k, v in model.state_dict().items() if kept(k)}, name)
        except CheckpointError as e:
            if reparameterized:  # most likely an unfolded checkpoint: say what to do instead
                raise CheckpointError(f"{e}; {_REPARAMETERIZED}") from None
            raise
        return "rmt"
    if reparameterized:
        raise CheckpointError(f"an official checkpoint does not fit a folded model: {_REPARAMETERIZED}")
    expected = {k: v.shape for k, v in export_official_state_dict(model).items() if kept(k)}
    relpos = tuple(k for k in expected if _RELPOS.match(k))
    check_fits(state_dict, expected, name, optional=relpos)
    _check_relpos(state_dict, model, name)
    return "official"


def check_variant_state_dict(state_dict: Mapping[str, Tensor], name: str) -> tuple[str, int]:
    """Check a state dict against a published variant without building its weights.

    Returns the layout (``"official"`` or ``"rmt"``) and the variant's parameter count.
    """
    model = _variant_on_meta(name)
    return check_state_dict(state_dict, model, name), sum(p.numel() for p in model.parameters())


def convert_checkpoint(
    checkpoint: Any, model: nn.Module, ema: Optional[bool] = None, model_name: str = "", prefer_ema: bool = True,
    without_classifier: bool = False,
) -> dict[str, Tensor]:
    """Select (as :func:`select_state_dict`), validate and convert a loaded checkpoint (any official
    layout or ours) for ``model``.

    Raises CheckpointError naming every problem; returns a state dict ``model`` loads strictly, or
    with ``without_classifier`` one that holds all but the classifiers' tensors, checked against
    all but ``model``'s (for another number of classes than the file's).
    """
    state_dict, _ = select_state_dict(checkpoint, ema, prefer_ema)
    return _convert_state_dict(state_dict, model, model_name, without_classifier)


def _convert_state_dict(
    state_dict: dict[str, Tensor], model: nn.Module, model_name: str, without_classifier: bool = False
) -> dict[str, Tensor]:
    """Validate a selected state dict (any official layout or ours) for ``model`` and convert it to ours."""
    name = model_name or getattr(model, "pretrained_cfg", {}).get("architecture", "") or type(model).__name__
    state_dict = _adapt_input_channels(state_dict, model)
    layout = check_state_dict(state_dict, model, name, without_classifier)
    converted = state_dict if layout == "rmt" else _from_official(state_dict)
    return {k: v for k, v in converted.items() if not _is_classifier_key(k)} if without_classifier else converted


def _adapt_input_channels(state_dict: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """The stem's first conv made to take ``model.in_chans`` channels, as timm adapts its pretrained
    models' (``in_chans=1``: the RGB filters summed; more: repeated and scaled)."""
    in_chans = getattr(model, "in_chans", None)
    for key in ("stem.0.weight", "patch_embed.proj.0.weight"):  # ours, official
        weight = state_dict.get(key)
        if in_chans and weight is not None and weight.ndim == 4 and weight.shape[1] != in_chans:
            from timm.models import adapt_input_conv

            return {**state_dict, key: adapt_input_conv(in_chans, weight)}
    return state_dict


def _check_relpos(state_dict: Mapping[str, Tensor], model: nn.Module, name: str) -> None:
    for key, value in state_dict.items():
        m = _RELPOS.match(key)
        if not m:
            continue
        ours = model.stages[int(m.group(1))].position.official_buffers()[m.group(2)]
        if value.shape != ours.shape or not torch.allclose(value.float(), ours, rtol=1e-4, atol=1e-6):
            raise CheckpointError(
                f"checkpoint does not fit {name}: {key} differs from the value this configuration computes "
                "(the file was made with other decay or head settings)"
            )


def published_prefers_ema(model_name: str) -> bool:
    """``prefer_ema`` picking, in a training checkpoint of the variant ``model_name`` holding both,
    the state dict its published figures belong to: the zoo entry's ``state_dict`` (the plain
    model for rmt_t, the EMA model for the others); EMA for a name the zoo does not list."""
    from rmt.errors import ZooError
    from rmt.zoo.registry import get_entry
    from rmt.zoo.verify import prefers_ema

    try:
        return prefers_ema(get_entry(model_name))
    except ZooError:  # not a zoo name, or a zoo file that does not load: no published choice
        return True


def load_checkpoint(
    model: nn.Module, path: PathLike, ema: Optional[bool] = None, model_name: str = "", prefer_ema: bool = True,
    keep_model_classifier: bool = False,
) -> str:
    """Load a checkpoint file into ``model`` strictly (state dict chosen as :func:`select_state_dict`
    does). ``keep_model_classifier``: where the file's classifier has another number of classes
    than ``model``'s (or the file has none), every other tensor, checked, and ``model``'s
    classifiers as they are. Returns which state dict was used."""
    _refuse_feature_model(model, "build it with its weights: rmt.create_model(NAME, checkpoint=PATH, features_only=True)")
    state_dict, source = select_state_dict(read_checkpoint(path), ema, prefer_ema)
    without_classifier = keep_model_classifier and checkpoint_num_classes(state_dict) != model.num_classes
    # without the classifiers, the check leaves the non-strict load nothing else to miss
    model.load_state_dict(_convert_state_dict(state_dict, model, model_name, without_classifier), strict=not without_classifier)
    return source or "state dict"


def checkpoint_num_classes(state_dict: Mapping[str, Tensor]) -> Optional[int]:
    """The classes of a selected state dict's classifier (ours: ``head.fc``; official: ``head``),
    or None if it has none (saved with ``num_classes=0``)."""
    weight = state_dict.get("head.fc.weight", state_dict.get("head.weight"))
    return None if weight is None else int(weight.shape[0])


def save_atomic(obj: Any, path: PathLike) -> None:
    """``torch.save`` through a temporary file and a rename: never a half-written checkpoint."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def convert_checkpoint_file(
    model_name: str, source: PathLike, destination: PathLike, layout: str = "official", ema: Optional[bool] = None
) -> dict[str, Any]:
    """Rewrite a checkpoint of ``model_name`` in the ``official`` layout, as ``{"model": state_dict}``
    (what the official scripts read), or in the ``rmt`` layout, as a bare state dict.

    The source is checked tensor by tensor first. ``ema=None`` takes, of a file holding both, the
    state dict the variant's published figures belong to (:func:`published_prefers_ema`). Returns a
    summary (parameters, source entry).
    """
    from rmt.models.factory import create_model

    if layout not in ("official", "rmt"):
        raise CheckpointError(f"unknown layout {layout!r}: choose official or rmt")
    if same_file(source, destination):
        raise CheckpointError("destination is the source file: write the converted checkpoint elsewhere")
    if os.fspath(destination).endswith(".safetensors"):  # what torch.load and timm would take it for
        raise CheckpointError(
            f"{destination}: rmt convert writes torch.save checkpoints, not safetensors; give the destination a .pth name"
        )
    check_writable(destination)  # before the source is read
    model = create_model(model_name)
    used = load_checkpoint(model, source, ema=ema, model_name=model_name, prefer_ema=published_prefers_ema(model_name))
    state = export_official_state_dict(model) if layout == "official" else model.state_dict()
    save_atomic({"model": state} if layout == "official" else state, destination)
    return {
        "model": model_name,
        "layout": layout,
        "source_entry": used,
        "params": sum(p.numel() for p in model.parameters()),
        "tensors": len(state),
    }
