"""The per-user weights cache: verified files, a manifest of their hashes, a lock per file.

Layout (under ``RMT_HOME``, default ``$XDG_CACHE_HOME/rmt``, i.e. ``~/.cache/rmt``)::

    manifest.json                  sha256, size, source and time of every stored file
    weights/<model>/<filename>     verified files only (the mirror layout too)
    partial/<model>/<filename>.incomplete[.json]   an interrupted transfer, kept to resume
    .locks/<model>/<filename>.lock                 one lock per file; .locks/manifest.lock

A file reaches ``weights/`` only by a rename after it was verified, so ``weights/`` never holds
a half-written or unverified file. The manifest's hash is checked on every use: a file that no
longer matches is reported, never used. A record stays in the manifest when its file is deleted,
so a later download of the same model must match the hash trusted on first use.
"""

from __future__ import annotations

import datetime
import errno
import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from filelock import FileLock

from rmt.errors import ZooError
from rmt.io import replacing
from rmt.zoo.registry import SHA256_HEX, ZooEntry, zoo_file

MANIFEST_VERSION = 1
_HASH_CHUNK = 8 << 20


def cache_dir() -> Path:
    """The cache root: ``RMT_HOME`` when set, else ``$XDG_CACHE_HOME/rmt`` (``~/.cache/rmt``)."""
    home = os.environ.get("RMT_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "rmt"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_write_error(root: Path, error: OSError, what: str = "") -> ZooError:
    """A one-line ZooError for an OSError raised while writing into the cache."""
    reason = error.strerror or str(error)
    doing = f" while writing {what}" if what else ""
    if error.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return ZooError(
            f"no space left in the weights cache {root}{doing} ({reason}): free some space or set RMT_HOME "
            "to a directory on a larger disk"
        )
    return ZooError(
        f"cannot write to the weights cache {root}{doing} ({reason}): set RMT_HOME to a writable directory"
    )


@dataclass(frozen=True)
class CachedFile:
    """The manifest's record of one stored file."""

    model: str
    path: Path
    sha256: str
    size: int
    source: str  # the URL it was downloaded from, or file://... for an import
    added: str  # ISO 8601, UTC
    state_dict: str  # the state dict that was checked: model_ema, model, "" (bare state dict)

    def to_json(self) -> dict:
        out = asdict(self)
        out["path"] = str(self.path)
        return out


class WeightsCache:
    """The weights cache rooted at ``root`` (default: :func:`cache_dir`)."""

    def __init__(self, root: Optional[Path] = None) -> None:
        self.root = Path(root) if root is not None else cache_dir()

    @property
    def weights_dir(self) -> Path:
        return self.root / "weights"

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def file_path(self, entry: ZooEntry) -> Path:
        return self.weights_dir / self._key(entry)

    def partial_path(self, entry: ZooEntry) -> Path:
        return self.root / "partial" / (self._key(entry) + ".incomplete")

    def lock(self, entry: ZooEntry) -> FileLock:
        """The lock serialising every write of this entry's file (across processes)."""
        return FileLock(str(self._lock_path(self._key(entry))))

    @staticmethod
    def _key(entry: ZooEntry) -> str:
        if not entry.weights.get("filename"):
            raise ZooError(f"{entry.name} has no pretrained weights to cache")
        return f"{entry.name}/{entry.weights['filename']}"

    def _lock_path(self, key: str) -> Path:
        path = self.root / ".locks" / f"{key}.lock"
        self.make_dirs(path.parent)
        return path

    def make_dirs(self, directory: Path) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise cache_write_error(self.root, e) from None

    # ------------------------------------------------------------------------- manifest

    def _read_manifest(self) -> dict:
        try:
            text = self.manifest_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {"version": MANIFEST_VERSION, "files": {}}
        except NotADirectoryError:  # the root, or a folder above it, is a file
            raise ZooError(self._not_a_folder()) from None
        except (OSError, UnicodeDecodeError) as e:
            raise ZooError(f"cannot read the cache manifest {self.manifest_path}: {getattr(e, 'strerror', None) or e}") from None
        try:
            manifest = json.loads(text)
            if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
                raise ValueError("no 'files' mapping")
            for key, record in manifest["files"].items():
                problem = _record_problem(record)
                if problem:
                    raise ValueError(f"its record {key!r} {problem}")
        except ValueError as e:
            raise ZooError(
                f"the cache manifest {self.manifest_path} is corrupt ({e}); fix that or delete the manifest and fetch "
                "the weights again (its hashes are what cached files are checked against)"
            ) from None
        return manifest

    def _not_a_folder(self) -> str:
        blocker = next((p for p in (self.root, *self.root.parents) if p.exists() and not p.is_dir()), self.root)
        what = "RMT_HOME" if os.environ.get("RMT_HOME") and self.root == cache_dir() else "the weights cache"
        problem = "is a file, not a folder" if blocker == self.root else f"cannot be a folder: {blocker} is a file"
        return f"{what} {self.root} {problem}; set RMT_HOME to a folder (it is created if missing)"

    def _record_from(self, key: str, record: dict) -> CachedFile:
        return CachedFile(
            model=record["model"], path=self.weights_dir / key, sha256=record["sha256"], size=record["size"],
            source=record["source"], added=record["added"], state_dict=record.get("state_dict", ""),
        )

    def record(self, entry: ZooEntry) -> Optional[CachedFile]:
        """The manifest's record of this entry's file (kept after the file itself is deleted)."""
        key = self._key(entry)
        record = self._read_manifest()["files"].get(key)
        return self._record_from(key, record) if record else None

    def _update_manifest(self, key: str, record: dict) -> None:
        # read-modify-write under its own lock: several models may be stored at once
        try:
            with FileLock(str(self._lock_path("manifest"))):
                manifest = self._read_manifest()
                manifest["version"] = MANIFEST_VERSION
                manifest["files"][key] = record
                with replacing(self.manifest_path) as tmp:
                    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        except OSError as e:
            raise cache_write_error(self.root, e, "the manifest") from None

    # ------------------------------------------------------------------------- files

    def store(self, entry: ZooEntry, verified: Path, *, sha256: str, source: str, state_dict: str) -> CachedFile:
        """Move a verified file into the cache and record it. The caller holds :meth:`lock`."""
        final = self.file_path(entry)
        self.make_dirs(final.parent)
        size = verified.stat().st_size
        try:
            os.replace(verified, final)
        except OSError as e:
            raise cache_write_error(self.root, e, entry.weights["filename"]) from None
        record = {
            "model": entry.name,
            "sha256": sha256,
            "size": size,
            "source": source,
            "added": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "state_dict": state_dict,
        }
        try:
            self._update_manifest(self._key(entry), record)
        except ZooError:
            final.unlink(missing_ok=True)  # an unrecorded file would never be trusted: do not keep it
            raise
        return self._record_from(self._key(entry), record)

    def verified_path(self, entry: ZooEntry) -> Optional[Path]:
        """The cached file of ``entry`` after checking its sha256 against the manifest, or None.

        A file whose size or hash differs from its record, or whose record is not the sha256
        zoo.yaml pins, raises ZooError: it is reported, not used.
        """
        record = self.record(entry)
        path = self.file_path(entry)
        if record is None or not path.is_file():
            return None
        pinned = _pin_not_recorded(entry, record)
        if pinned:
            raise ZooError(
                f"the cached {path} has sha256 {record.sha256[:16]}..., not the {pinned[:16]}... that {zoo_file()} "
                f"pins for {entry.name}: it was not used; replace it with the pinned file: `{refetch_command(entry)}`"
            )
        size = path.stat().st_size
        actual = sha256_file(path) if size == record.size else None
        if actual != record.sha256:
            found = f"sha256 {actual[:16]}..." if actual else f"{size:,} bytes"
            raise ZooError(
                f"the cached {path} no longer matches its manifest record (sha256 {record.sha256[:16]}..., "
                f"{record.size:,} bytes; found {found}): it changed after it was stored and was not used; "
                f"fetch it again with `{refetch_command(entry)}`"
            )
        return path

    def status(self, entry: ZooEntry) -> str:
        """``cached``, ``missing`` or ``changed``: a cheap check (file present, size as recorded, the
        recorded hash the one zoo.yaml pins, if it pins one).

        :meth:`verified_path` checks the hash; this only tells people what to expect.
        """
        if not entry.weights.get("filename"):
            return "missing"
        record = self.record(entry)
        path = self.file_path(entry)
        if record is None or not path.is_file():
            return "missing"
        if _pin_not_recorded(entry, record):
            return "changed"
        return "cached" if path.stat().st_size == record.size else "changed"


def _pin_not_recorded(entry: ZooEntry, record: CachedFile) -> Optional[str]:
    """The sha256 zoo.yaml pins for ``entry`` when the cached file's record has another, else None."""
    pinned = entry.weights.get("sha256")
    return pinned if pinned and record.sha256 != pinned else None


def refetch_command(entry: ZooEntry) -> str:
    """The command that replaces the cached file of ``entry``: weights only on Baidu pan come from
    a file fetched by hand (``--force`` alone would print the Baidu steps, which import nothing)."""
    if entry.manual_only:
        return f"rmt download {entry.name} --from PATH/TO/{entry.weights['filename']} --force"
    return f"rmt download {entry.name} --force"


def _record_problem(record: object) -> Optional[str]:
    """What is wrong with one manifest record (a hand edit, a truncated write elsewhere), or None."""
    if not isinstance(record, dict):
        return f"is a {type(record).__name__}, not a mapping"
    missing = [k for k in ("model", "sha256", "size", "source", "added") if k not in record]
    if missing:
        return f"lacks {', '.join(missing)}"
    for key in ("model", "source", "added", "state_dict"):
        if key in record and not isinstance(record[key], str):
            return f"has {key} {record[key]!r}, not a string"
    if not isinstance(record["sha256"], str) or not SHA256_HEX.match(record["sha256"]):
        return f"has sha256 {record['sha256']!r}, not 64 hexadecimal digits"
    size = record["size"]
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        return f"has size {size!r}, not a number of bytes"
    return None
