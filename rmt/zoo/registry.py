"""The zoo's entries: ``zoo.yaml``, validated on load, and any timm model by its own name.

``zoo.yaml`` is kept at the repository root; ``rmt/zoo/zoo.yaml`` is a symbolic link to it, so
one file serves a source checkout, an editable install and a wheel (the wheel build copies the
link's target as package data). ``RMT_ZOO_FILE`` points at another file, e.g. a company's own zoo
with its mirror's hashes.
"""

from __future__ import annotations

import difflib
import functools
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from rmt.errors import UnknownModelError, ZooError

PACKAGED_ZOO_FILE = Path(__file__).with_name("zoo.yaml")

FAMILIES = ("rmt", "baseline")  # in zoo.yaml; entries built for other timm models are "timm"
WEIGHT_SOURCES = ("baidu", "hf-hub", "url")
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")
STATE_DICTS = ("model_ema", "model")
_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")  # also a directory name in the cache and on mirrors
_FILENAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

_ENTRY_FIELDS = ("family", "timm_name", "published", "measured", "preprocessing", "weights")
_REQUIRED_ENTRY_FIELDS = ("family", "timm_name", "published", "preprocessing", "weights")
_PUBLISHED_FIELDS = ("params_m", "gflops", "top1")
_MEASURED_FIELDS = ("params", "gmacs")
_PREPROCESSING_FIELDS = ("input_size", "interpolation", "crop_pct", "mean", "std")
# weights fields each source needs (all also take sha256)
_WEIGHT_FIELDS = {
    "baidu": ("url", "code", "filename", "state_dict"),
    "hf-hub": ("hf_hub_id", "filename"),
    "url": ("url", "filename"),
}
_OPTIONAL_WEIGHT_FIELDS = ("sha256", "state_dict")


@dataclass(frozen=True)
class ZooEntry:
    """One model of the zoo: what it is, its figures, how to evaluate it, where its weights are.

    Attributes:
        name: the zoo name (``rmt_s``, ``swin_t``) or a timm model name given directly.
        family: ``rmt``, ``baseline`` (a zoo.yaml timm baseline) or ``timm`` (any other timm model).
        timm_name: what ``timm.create_model`` takes, pretrained tag included where the zoo pins one.
        published: ``params_m``, ``gflops``, ``top1`` as published (None where not published);
            empty for plain timm models.
        measured: ``params`` (exact) and ``gmacs`` (fvcore, 224x224) where measured; may be empty.
        preprocessing: ``input_size`` (3, H, W), ``interpolation``, ``crop_pct``, ``mean``, ``std``;
            timm models also ``crop_mode`` (``center``, ``squash`` or ``border``, as timm's
            pretrained_cfg says); an entry without it (zoo.yaml's) is ``center``.
        weights: ``source`` (``baidu``: a share link fetched by hand; ``hf-hub``; ``url``),
            ``filename`` (its name in the cache and on mirrors), ``sha256`` (None: unknown) and
            the source's own fields (``url`` and ``code``, ``hf_hub_id``); for RMT ``state_dict``
            names the state dict holding the published model (``model_ema`` or ``model``).
            Empty when the model has no pretrained weights.
    """

    name: str
    family: str
    timm_name: str
    published: dict = field(default_factory=dict)
    measured: dict = field(default_factory=dict)
    preprocessing: dict = field(default_factory=dict)
    weights: dict = field(default_factory=dict)

    @property
    def published_top1(self) -> Optional[float]:
        return self.published.get("top1")

    @property
    def is_rmt(self) -> bool:
        return self.family == "rmt"

    @property
    def manual_only(self) -> bool:
        """True when no program can fetch the weights from their source (Baidu share links)."""
        return self.weights.get("source") == "baidu"


def zoo_file() -> Path:
    """The zoo.yaml in use: ``RMT_ZOO_FILE`` when set, else the one shipped with the package."""
    override = os.environ.get("RMT_ZOO_FILE")
    if override:
        return Path(override).expanduser()
    # a git checkout without symlink support (Windows' default) stores the link as a one-line
    # text file holding its target
    if PACKAGED_ZOO_FILE.is_file() and not PACKAGED_ZOO_FILE.is_symlink() and PACKAGED_ZOO_FILE.stat().st_size < 256:
        target = PACKAGED_ZOO_FILE.read_text(encoding="utf-8").strip()
        if target.endswith("zoo.yaml") and "\n" not in target:
            return (PACKAGED_ZOO_FILE.parent / target).resolve()
    return PACKAGED_ZOO_FILE


def load_zoo(path: Optional[Path] = None) -> dict[str, ZooEntry]:
    """Read and validate a zoo.yaml; errors name the file, the entry and the field."""
    path = Path(path) if path is not None else zoo_file()
    try:
        stat = path.stat()
    except OSError as e:
        raise ZooError(f"cannot read the zoo file {path}: {e.strerror or e}") from None
    # re-read when the file changes (a hand edit in a long session), parse once otherwise
    return _load_zoo_cached(str(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _load_zoo_cached(path: str, mtime_ns: int, size: int) -> dict[str, ZooEntry]:
    try:
        with open(path, encoding="utf-8") as f:
            document = yaml.load(f, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ZooError(f"{path}:{where} is not valid YAML: {problem}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ZooError(f"cannot read the zoo file {path}: {getattr(e, 'strerror', None) or e}") from None
    return _parse_document(document, path)


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice (YAML would silently keep the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key '{key}' appears twice in one mapping", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _parse_document(document: Any, path: str) -> dict[str, ZooEntry]:
    if not isinstance(document, dict):
        raise ZooError(f"{path}: expected a mapping with 'version' and 'models', got {_kind(document)}")
    unknown = set(document) - {"version", "models"}
    if unknown:
        raise ZooError(f"{path}: unknown top-level field(s) {', '.join(map(str, sorted(unknown, key=str)))}")
    if document.get("version") != 1:
        raise ZooError(f"{path}: version must be 1, got {document.get('version')!r}")
    models = document.get("models")
    if not isinstance(models, dict) or not models:
        raise ZooError(f"{path}: 'models' must be a non-empty mapping of entries, got {_kind(models)}")
    return {str(name): _parse_entry(str(name), spec, path) for name, spec in models.items()}


def _parse_entry(name: str, spec: Any, path: str) -> ZooEntry:
    where = f"{path}: models.{name}"
    if not _NAME.match(name):
        raise ZooError(f"{where}: the name must be lower case letters, digits, '_', '.' or '-'")
    if not isinstance(spec, dict):
        raise ZooError(f"{where}: expected a mapping of fields, got {_kind(spec)}")
    _check_fields(spec, _ENTRY_FIELDS, where, required=_REQUIRED_ENTRY_FIELDS)
    family = spec["family"]
    if family not in FAMILIES:
        raise ZooError(f"{where}.family: must be one of {', '.join(FAMILIES)}, got {family!r}")
    timm_name = spec.get("timm_name")
    if not isinstance(timm_name, str) or not timm_name:
        raise ZooError(f"{where}.timm_name: expected a timm model name, got {timm_name!r}")
    _check_timm_name(name, family, timm_name, where)
    published = _parse_numbers(spec["published"], _PUBLISHED_FIELDS, f"{where}.published", required=True)
    measured = _parse_numbers(spec.get("measured") or {}, _MEASURED_FIELDS, f"{where}.measured", required=False)
    if measured.get("params") is not None:
        if float(measured["params"]) != int(measured["params"]):
            raise ZooError(f"{where}.measured.params: expected a whole number, got {measured['params']!r}")
        measured["params"] = int(measured["params"])
    preprocessing = _parse_preprocessing(spec["preprocessing"], f"{where}.preprocessing")
    weights = _parse_weights(spec["weights"], family, f"{where}.weights")
    return ZooEntry(name, family, timm_name, published, measured, preprocessing, weights)


def _check_timm_name(name: str, family: str, timm_name: str, where: str) -> None:
    import timm

    import rmt.models  # noqa: F401 - registers the RMT variants with timm
    from rmt.models.config import VARIANTS

    if family == "rmt":
        if name not in VARIANTS or timm_name != name:
            raise ZooError(
                f"{where}: an rmt entry must be one of the variants ({', '.join(VARIANTS)}) with timm_name equal "
                f"to its name, got {name} / {timm_name}"
            )
    elif not timm.is_model(timm_name):
        raise ZooError(f"{where}.timm_name: timm has no model '{timm_name}'")


def _check_fields(spec: dict, allowed: tuple, where: str, required: tuple = ()) -> None:
    unknown = [str(k) for k in spec if k not in allowed]
    if unknown:
        raise ZooError(f"{where}: unknown field(s) {', '.join(unknown)} (allowed: {', '.join(allowed)})")
    missing = [k for k in required if k not in spec]
    if missing:
        raise ZooError(f"{where}: missing field(s) {', '.join(missing)}")


def _number(value: Any, where: str, positive: bool = True) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ZooError(f"{where}: expected a number, got {value!r}")
    if positive and value <= 0:
        raise ZooError(f"{where}: expected a positive number, got {value!r}")
    return value


def _parse_numbers(spec: Any, fields: tuple, where: str, required: bool) -> dict:
    if not isinstance(spec, dict):
        raise ZooError(f"{where}: expected a mapping of {', '.join(fields)}, got {_kind(spec)}")
    _check_fields(spec, fields, where, required=fields if required else ())
    return {k: (None if v is None else _number(v, f"{where}.{k}")) for k, v in spec.items()}


def _parse_preprocessing(spec: Any, where: str) -> dict:
    if not isinstance(spec, dict):
        raise ZooError(f"{where}: expected a mapping of {', '.join(_PREPROCESSING_FIELDS)}, got {_kind(spec)}")
    _check_fields(spec, _PREPROCESSING_FIELDS, where, required=_PREPROCESSING_FIELDS)
    size = spec["input_size"]
    if (
        not isinstance(size, list) or len(size) != 3
        or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)
    ):
        raise ZooError(f"{where}.input_size: expected [channels, height, width] of positive integers, got {size!r}")
    if spec["interpolation"] not in INTERPOLATIONS:
        raise ZooError(f"{where}.interpolation: must be one of {', '.join(INTERPOLATIONS)}, got {spec['interpolation']!r}")
    crop = _number(spec["crop_pct"], f"{where}.crop_pct")
    if crop > 1:
        raise ZooError(f"{where}.crop_pct: must be in (0, 1], got {crop!r}")
    out = {"input_size": tuple(size), "interpolation": spec["interpolation"], "crop_pct": float(crop)}
    for key in ("mean", "std"):
        values = spec[key]
        if not isinstance(values, list) or len(values) != size[0]:
            raise ZooError(f"{where}.{key}: expected one number per channel ({size[0]}), got {values!r}")
        out[key] = tuple(float(_number(v, f"{where}.{key}", positive=key == "std")) for v in values)
    return out


def _parse_weights(spec: Any, family: str, where: str) -> dict:
    if not isinstance(spec, dict):
        raise ZooError(f"{where}: expected a mapping with a 'source' field, got {_kind(spec)}")
    source = spec.get("source")
    if source not in WEIGHT_SOURCES:
        raise ZooError(f"{where}.source: must be one of {', '.join(WEIGHT_SOURCES)}, got {source!r}")
    needed = _WEIGHT_FIELDS[source]
    if family == "rmt" and "state_dict" not in needed:
        needed = needed + ("state_dict",)
    _check_fields(spec, ("source",) + needed + _OPTIONAL_WEIGHT_FIELDS, where, required=needed)
    out = dict(spec)
    for key in needed:
        if not isinstance(spec[key], str) or not spec[key]:
            raise ZooError(f"{where}.{key}: expected a non-empty string, got {spec[key]!r}")
    if not _FILENAME.match(spec["filename"]):
        raise ZooError(f"{where}.filename: a plain file name is needed (letters, digits, '_', '.', '-'), got {spec['filename']!r}")
    if "url" in needed and not spec["url"].startswith(("https://", "http://", "file://")):
        raise ZooError(f"{where}.url: expected an http(s):// or file:// URL, got {spec['url']!r}")
    if "state_dict" in spec and spec["state_dict"] not in STATE_DICTS:
        raise ZooError(f"{where}.state_dict: must be one of {', '.join(STATE_DICTS)}, got {spec['state_dict']!r}")
    sha = spec.get("sha256")
    if sha is not None and not (isinstance(sha, str) and SHA256_HEX.match(sha.lower())):
        raise ZooError(f"{where}.sha256: expected 64 hexadecimal digits or null, got {sha!r}")
    out["sha256"] = sha.lower() if sha else None
    return out


def _kind(value: Any) -> str:
    return "nothing" if value is None else f"a {type(value).__name__} ({str(value)[:40]!r})"


# ----------------------------------------------------------------------------- lookup


def list_entries() -> list[ZooEntry]:
    """The zoo.yaml entries, in file order."""
    return list(load_zoo().values())


def get_entry(name: str) -> ZooEntry:
    """A zoo entry by name, or an entry for any timm model name (with timm's pretrained_cfg).

    Raises UnknownModelError, suggesting close names, for anything else.
    """
    import timm

    import rmt.models  # noqa: F401 - registers the RMT variants with timm

    zoo = load_zoo()
    if name in zoo:
        return zoo[name]
    if isinstance(name, str) and _NAME.match(name) and timm.is_model(name):
        return _timm_entry(name)
    raise UnknownModelError(f"unknown model '{name}'{_suggestion(str(name), zoo)}")


def _suggestion(name: str, zoo: dict[str, ZooEntry]) -> str:
    import timm

    wanted = name.lower().replace("-", "_")
    candidates = list(zoo) + [n for n in timm.list_models() if n not in zoo]
    by_lower = {c.lower(): c for c in reversed(candidates)}  # zoo names win on ties
    close = difflib.get_close_matches(wanted, list(by_lower), n=3, cutoff=0.6)
    if close:
        return f"; did you mean {', '.join(by_lower[c] for c in close)}?"
    return f"; zoo models: {', '.join(zoo)} (any timm model name works too; `rmt list` shows the zoo)"


def _timm_entry(name: str) -> ZooEntry:
    """An entry for a timm model that is not in the zoo, from timm's own pretrained_cfg."""
    import timm.models

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except RuntimeError:  # timm knows the architecture, not the pretrained tag after its '.'
        arch, _, tag = name.partition(".")
        tags = [t.partition(".")[2] for t in timm.list_pretrained(f"{arch}.*")]
        more = f" and {len(tags) - 8} more (timm.list_pretrained('{arch}.*'))" if len(tags) > 8 else ""
        known = f"its tags: {', '.join(tags[:8])}{more}" if tags else "it has no pretrained tags"
        raise UnknownModelError(f"unknown model '{name}': timm's {arch} has no pretrained tag '{tag}' ({known})") from None
    cfg = cfg.to_dict() if cfg is not None else {}
    preprocessing = {
        "input_size": tuple(cfg.get("input_size", (3, 224, 224))),
        "interpolation": cfg.get("interpolation", "bicubic") or "bicubic",
        "crop_pct": float(cfg.get("crop_pct", 0.875)),
        # center, squash (both sides resized, aspect ratio not kept) or border (longer side resized,
        # padded): how timm evaluates the weights, which the eval transform follows
        "crop_mode": cfg.get("crop_mode") or "center",
        "mean": tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        "std": tuple(cfg.get("std", (0.229, 0.224, 0.225))),
    }
    weights: dict = {}
    if cfg.get("hf_hub_id"):
        weights = {
            "source": "hf-hub",
            "hf_hub_id": cfg["hf_hub_id"],
            "filename": cfg.get("hf_hub_filename") or "model.safetensors",
            "sha256": None,
        }
    elif cfg.get("url"):
        weights = {"source": "url", "url": cfg["url"], "filename": cfg["url"].rsplit("/", 1)[-1].split("?")[0], "sha256": None}
    return ZooEntry(name=name, family="timm", timm_name=name, preprocessing=preprocessing, weights=weights)
