"""Getting a model's weights into the cache: from its source, a mirror, a URL, or a local file.

Every way in goes through the same steps, under the file's lock: transfer into
``partial/``, check the sha256 (given, in zoo.yaml, or recorded on first use), check that the
file is a checkpoint of the model's architecture, then rename into ``weights/`` and record it in
the manifest. Any failure removes the partial file, except a dropped connection, whose bytes are
kept so that the same command resumes.
"""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from filelock import Timeout

from rmt.errors import CheckpointError, DownloadError, RMTError, WeightsNotCachedError, ZooError
from rmt.models.checkpoint import is_safetensors, not_a_file
from rmt.zoo.cache import CachedFile, WeightsCache, cache_write_error, refetch_command, sha256_file
from rmt.zoo.registry import SHA256_HEX, ZooEntry, get_entry
from rmt.zoo.transfer import Notify, Progress, TransferOptions, copy_file, discard_partial, fetch
from rmt.zoo.verify import check_weights_file


@dataclass(frozen=True)
class Fetched:
    """The outcome of :func:`download`."""

    model: str
    path: Path
    sha256: str
    size: int
    source: str
    action: str  # downloaded, imported, or cached (already there and verified)
    state_dict: str  # which state dict of the file the model uses ("" for a bare state dict)
    params: Optional[int]  # parameter count found by the check (None when nothing was checked)
    trusted_on_first_use: bool  # no sha256 was known: this one was recorded and is enforced from now on

    def to_json(self) -> dict:
        return {
            "model": self.model, "path": str(self.path), "sha256": self.sha256, "size": self.size,
            "source": self.source, "action": self.action, "state_dict": self.state_dict, "params": self.params,
            "trusted_on_first_use": self.trusted_on_first_use,
        }


def mirror_url(entry: ZooEntry) -> Optional[str]:
    """``$RMT_ZOO_MIRROR/<model>/<filename>`` when a mirror is set (the cache's own layout)."""
    mirror = os.environ.get("RMT_ZOO_MIRROR", "").strip()
    if not mirror or not entry.weights.get("filename"):
        return None
    try:
        urllib.parse.urlsplit(mirror)
    except ValueError as e:
        raise ZooError(
            f"RMT_ZOO_MIRROR={mirror!r} is not a valid URL ({e}): set it to an http(s):// or file:// base URL"
        ) from None
    return f"{mirror.rstrip('/')}/{entry.name}/{entry.weights['filename']}"


def source_url(entry: ZooEntry) -> Optional[str]:
    """Where a program can fetch the weights from: the mirror, else the source; None for Baidu."""
    mirror = mirror_url(entry)
    if mirror:
        return mirror
    weights = entry.weights
    if weights.get("source") == "hf-hub":
        endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")
        return f"{endpoint}/{weights['hf_hub_id']}/resolve/main/{weights['filename']}"
    if weights.get("source") == "url":
        return weights["url"]
    return None


def how_to_get(entry: ZooEntry) -> dict:
    """How to get the weights of ``entry`` into the cache: a sentence, and its facts for programs."""
    weights = entry.weights
    if not weights:
        return {"message": f"timm has no pretrained weights for {entry.name}", "command": None}
    importing = f"rmt download {entry.name} --from PATH/TO/{weights['filename']}"
    if entry.manual_only and not mirror_url(entry):
        return {
            "message": (
                f"the weights of {entry.name} are only on Baidu pan: open {weights['url']} in a browser "
                f"(extraction code {weights['code']}), download the file, then run `{importing}` "
                "(or set RMT_ZOO_MIRROR to a mirror that has it)"
            ),
            "url": weights["url"],
            "code": weights["code"],
            "command": importing,
        }
    url = source_url(entry)
    return {
        "message": (
            f"run `rmt download {entry.name}` (from {url}); on a machine without network access, run it "
            f"elsewhere, copy the file here and run `{importing}`"
        ),
        "url": url,
        "command": f"rmt download {entry.name}",
        "import_command": importing,
    }


def weights_path(name: str, cache: Optional[WeightsCache] = None) -> Optional[Path]:
    """The verified cached weights of ``name``, or None when they are not in the cache.

    The file's sha256 is checked against the manifest; a mismatch raises ZooError (never used).
    """
    entry = get_entry(name)
    if not entry.weights:
        return None
    return (cache or WeightsCache()).verified_path(entry)


def pretrained_checkpoint(name: str) -> Path:
    """The verified cached file of an RMT variant.

    Raises WeightsNotCachedError, saying exactly how to get the file, when it is not cached.
    """
    entry = get_entry(name)
    path = weights_path(name)
    if path is None:
        how = how_to_get(entry)
        raise WeightsNotCachedError(
            f"no weights for {name} in the cache ({WeightsCache().weights_dir}): {how['message']}", how
        )
    return path


def download(
    name: str,
    *,
    url: Optional[str] = None,
    sha256: Optional[str] = None,
    source_file: Optional[Union[str, os.PathLike]] = None,
    force: bool = False,
    progress: Optional[Progress] = None,
    notify: Optional[Notify] = None,
    options: Optional[TransferOptions] = None,
    cache: Optional[WeightsCache] = None,
) -> Fetched:
    """Put the weights of ``name`` into the cache, verified, and return where they are.

    Args:
        name: a zoo name or a timm model name.
        url: fetch from this http(s):// or file:// URL instead of the entry's source or mirror.
        sha256: the expected hash (overrides the one recorded on first use).
        source_file: import this local file (e.g. fetched by hand from Baidu pan).
        force: fetch again even when a verified file is cached (or the cached one changed).
        progress: called with (bytes so far, total or None) during a transfer.
        notify: called with status lines (waiting for another process, retrying, resuming).
        options: timeouts and retries (default: :meth:`TransferOptions.from_env`).
        cache: the cache (default: the per-user one, ``RMT_HOME``).

    Raises:
        WeightsNotCachedError: the weights can only be fetched by hand (the message says how).
        DownloadError: the transfer failed (HTTP error, HTML page, connection, offline).
        CheckpointError: the file is not a checkpoint of this architecture, or cannot be read safely.
        ZooError: wrong sha256, unwritable or full cache, a cached file that changed.
    """
    entry = get_entry(name)
    if not entry.weights:
        raise ZooError(f"timm has no pretrained weights for {name}: nothing to download")
    if url is not None and source_file is not None:
        raise ZooError("give either --url or --from, not both")
    if sha256 is not None:
        sha256 = sha256.strip().lower()
        if not SHA256_HEX.match(sha256):
            raise ZooError(f"--sha256 must be 64 hexadecimal digits, got {sha256!r}")
    if url is not None and not url.strip():  # else taken for no URL at all: the entry's own source
        raise ZooError("--url was given an empty URL: give the http(s):// or file:// URL to fetch")
    if source_file is not None:
        if os.fspath(source_file) == "":  # Path("") would be the current directory
            raise ZooError("--from was given an empty path: give the file to import")
        source_file = Path(source_file).expanduser()
        if not source_file.is_file():
            raise ZooError(f"--from {source_file}: {not_a_file(source_file) if os.path.lexists(source_file) else 'no such file'}")
    cache = cache or WeightsCache()
    lock = cache.lock(entry)
    try:
        try:
            lock.acquire(timeout=0.5)
        except Timeout:
            if notify:
                notify(f"waiting for another process that is fetching {entry.weights['filename']}")
            lock.acquire()
    except OSError as e:  # the lock file cannot be created: a read-only cache
        raise cache_write_error(cache.root, e) from None
    try:
        return _fetch_locked(entry, cache, url, sha256, source_file, force, progress, notify, options)
    finally:
        lock.release()


def _fetch_locked(
    entry: ZooEntry,
    cache: WeightsCache,
    url: Optional[str],
    sha256: Optional[str],
    source_file: Optional[Path],
    force: bool,
    progress: Optional[Progress],
    notify: Optional[Notify],
    options: Optional[TransferOptions],
) -> Fetched:
    record = cache.record(entry)
    if not force:
        cached = cache.verified_path(entry)  # a changed file raises: reported, never used or replaced silently
        if cached is not None:  # another process may just have stored it
            if sha256 is not None and record.sha256 != sha256:
                given_source = source_file is not None or url is not None
                how = "add --force" if given_source else f"run `{refetch_command(entry)} --sha256 {sha256}`"
                raise ZooError(
                    f"{entry.name} is already cached with sha256 {record.sha256[:16]}..., not the --sha256 {sha256[:16]}... "
                    f"given: nothing was fetched; to replace it with the file that has that hash, {how}"
                )
            if source_file is not None and _sha256_of_source(source_file) != record.sha256:
                raise ZooError(
                    f"{entry.name} is already cached (sha256 {record.sha256[:12]}...) and --from {source_file} is "
                    "another file: nothing was imported; add --force to replace the cached file with it"
                )
            return _fetched(entry, record, "cached", params=None, trusted=False)
    expected, why = _expected_sha256(entry, sha256, record)
    if source_file is not None:
        source, shown = source_file.resolve().as_uri(), str(source_file)
    else:
        source = url or source_url(entry)
        if source is None:
            how = how_to_get(entry)
            raise WeightsNotCachedError(how["message"], how)
        shown = source
    partial = cache.partial_path(entry)
    cache.make_dirs(partial.parent)
    keep_partial = False
    try:
        if source_file is not None:
            copy_file(source_file, partial, progress)
        else:
            fetch(source, partial, options=options, progress=progress, notify=notify)
        actual = sha256_file(partial)
        if expected is not None and actual != expected:
            retrust = f"; if the file legitimately changed, pass --sha256 {actual} to trust it" if why.startswith("recorded") else ""
            raise ZooError(
                f"sha256 mismatch for {entry.name} from {shown}: got {actual}, expected {expected} ({why}); "
                f"the file was not stored{retrust}"
            )
        try:
            checked = check_weights_file(entry, partial)
        except CheckpointError as e:
            # its messages name the file read, the cache's temporary copy (deleted below), or none
            # ("checkpoint does not fit rmt_s: ..."): name the user's
            message = str(e)
            named = str(partial) in message
            raise CheckpointError(message.replace(str(partial), shown) if named else f"{shown}: {message}") from None
        _check_format_matches_name(entry, partial, shown)
        stored = cache.store(entry, partial, sha256=actual, source=source, state_dict=checked.state_dict)
    except DownloadError as e:
        keep_partial = e.resumable
        if e.unreachable:
            how = how_to_get(entry)
            what = how.get("import_command") or how["command"]
            raise DownloadError(
                f"{e}; without network access: fetch the file on another machine and run `{what}`"
                + ("" if mirror_url(entry) else ", or set RMT_ZOO_MIRROR to an internal mirror"),
                resumable=e.resumable,
                unreachable=True,
            ) from None
        raise
    except KeyboardInterrupt:
        keep_partial = source_file is None  # an interrupted transfer resumes next time
        raise
    except OSError as e:  # writing the partial file: a read-only or full disk
        raise cache_write_error(cache.root, e, entry.weights["filename"]) from None
    finally:
        if not keep_partial:
            discard_partial(partial)
    return _fetched(
        entry, stored, "imported" if source_file is not None else "downloaded",
        params=checked.params, trusted=expected is None,
    )


def _sha256_of_source(source_file: Path) -> str:
    try:
        return sha256_file(source_file)
    except OSError as e:
        raise ZooError(f"cannot read --from {source_file}: {e.strerror or e}") from None


def _check_format_matches_name(entry: ZooEntry, path: Path, shown: str) -> None:
    """Refuse a checkpoint whose format is not the one its name in the cache says.

    Tools open the cached file by its name (``torch.load`` takes any ``*.safetensors`` for
    safetensors, timm and mirrors expect what the hub serves), so a torch.save file must not land
    as ``model.safetensors``, nor a safetensors file as ``RMT_T.pth``. It is refused, not
    converted: the cache keeps the bytes it was given, whose sha256 is what ``--sha256``, zoo.yaml
    and trust on first use speak of.
    """
    filename = entry.weights["filename"]
    if is_safetensors(path) == filename.endswith(".safetensors"):
        return
    if filename.endswith(".safetensors"):
        raise CheckpointError(
            f"{shown} is a torch.save checkpoint, but {entry.name}'s weights are cached as {filename}, a safetensors "
            f"file: nothing was stored; save its state dict with safetensors.torch.save_file(state_dict, '{filename}') "
            f"and import that, or load the file as it is with rmt.zoo.create_model('{entry.name}', checkpoint=PATH)"
        )
    raise CheckpointError(
        f"{shown} is a safetensors file, but {entry.name}'s weights are cached as {filename}, a torch.save checkpoint: "
        f"nothing was stored; convert it with torch.save(safetensors.torch.load_file(PATH), '{filename}') and import "
        f"that, or load the file as it is with checkpoint=PATH"
    )


def _expected_sha256(entry: ZooEntry, given: Optional[str], record: Optional[CachedFile]) -> tuple[Optional[str], str]:
    """The hash a new file must have, and why; None: unknown (it will be trusted on first use)."""
    listed = entry.weights.get("sha256")
    if given and listed and given != listed:
        raise ZooError(f"--sha256 {given} conflicts with the sha256 zoo.yaml gives for {entry.name} ({listed})")
    if given:
        return given, "given with --sha256"
    if listed:
        return listed, "listed in zoo.yaml"
    if record is not None:
        return record.sha256, f"recorded when the file was first stored, {record.added}"
    return None, ""


def _fetched(entry: ZooEntry, record: CachedFile, action: str, params: Optional[int], trusted: bool) -> Fetched:
    return Fetched(
        model=entry.name, path=record.path, sha256=record.sha256, size=record.size, source=record.source,
        action=action, state_dict=record.state_dict, params=params, trusted_on_first_use=trusted,
    )


def cache_report(entry: ZooEntry, cache: Optional[WeightsCache] = None, verify: bool = False) -> dict:
    """The cache state of ``entry`` for people and programs: status, path, record.

    ``verify=True`` hashes the file (``status`` becomes ``verified`` or ``changed``);
    otherwise only presence and size are checked.
    """
    cache = cache or WeightsCache()
    if not entry.weights:
        return {"status": "none", "path": None}
    status = cache.status(entry)
    detail = None
    if verify and status == "cached":
        try:
            cache.verified_path(entry)
            status = "verified"
        except RMTError as e:
            status, detail = "changed", str(e)
    record = cache.record(entry)
    return {
        "status": status,
        "path": str(cache.file_path(entry)),
        "record": record.to_json() if record else None,
        "detail": detail,
    }
