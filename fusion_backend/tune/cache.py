"""The persistent tuning cache: a decision measured once is reused by every later process.

Layout: one JSON file per key, `<cache dir>/<key>.json`, holding an envelope

    {"format": 1, "truthfuse": "0.1.0", "key": "<key>", "created": <unix time>, "record": {...}}

One file per key makes concurrent writers safe without a lock on the common path: each write goes
to a temporary file in the same directory and is moved into place with os.replace, which is atomic
on POSIX and Windows. Readers therefore see either the old or the new complete file, and two
processes writing different keys never touch the same file. Two processes writing the same key
both wrote a valid decision for the same graph; the last one wins.

Only JSON is ever read: a cache directory may be shared or copied between machines, and unpickling
a file from elsewhere would run arbitrary code.

Anything wrong with a file (unreadable, not JSON, another format or truthfuse version, a key that
does not match its name, or a record its reader finds malformed: `TuningCache.reject`) gives one
TuningCacheWarning and counts as a miss: the graph is retuned and the file overwritten. The cache
never makes compilation fail.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
STATE_FORMAT = "truthfuse-tuning-state"
ENV_CACHE_DIR = "TRUTHFUSE_CACHE_DIR"
_KEY_PATTERN = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,199}$")
_log = logging.getLogger("truthfuse")


class TuningCacheWarning(UserWarning):
    """A cache entry or directory could not be used; truthfuse retunes instead."""


class TuningStateError(ValueError):
    """A file given to load_state is not a truthfuse tuning state."""


# -- versions and keys ------------------------------------------------------------------------


def _distribution_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def truthfuse_version() -> str:
    """truthfuse's version, from the installed distribution's metadata.

    Read through importlib.metadata rather than `fusion_backend.__version__` so that this module
    never imports the package root (which imports the backend, which imports the tuner). Falls back
    to an already-imported package's __version__, then to "unknown".
    """
    version = _distribution_version("truthfuse")
    if version:
        return version
    package = sys.modules.get("fusion_backend")
    return str(getattr(package, "__version__", "unknown"))


def library_versions() -> dict[str, str]:
    """The versions that make a cached decision stale when they change."""
    torch_version = _distribution_version("torch")
    if torch_version is None and "torch" in sys.modules:
        torch_version = sys.modules["torch"].__version__
    return {
        "torch": torch_version or "unknown",
        "triton": _distribution_version("triton") or "unknown",
        "truthfuse": truthfuse_version(),
    }


def _canonical(value: Any) -> Any:
    """A JSON-stable form of shapes, dtypes and similar values (dtypes and symbols by str())."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, Mapping):
        return {str(k): _canonical(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)) or (isinstance(value, Iterable) and not isinstance(value, (bytes, str))):
        return [_canonical(v) for v in value]
    return str(value)


def cache_key(graph_signature: str, shapes: Any, dtypes: Any, device_name: str, strategy: str,
              *, extra: Mapping[str, Any] | None = None) -> str:
    """The sha256 (hex) naming one tuning decision.

    graph_signature: the canonical graph structure (the lead's canonical FX printout or its hash).
    shapes, dtypes: the graph inputs' shapes and dtypes (nested lists/tuples, torch.Size,
        torch.dtype are all fine; symbolic sizes count by their str()).
    device_name: e.g. torch.cuda.get_device_name(), so an H100 decision is not reused on an A100.
    strategy: the tuning strategy, because each strategy may choose differently.
    extra: anything else the decision depends on, e.g. {"space": DecisionSpace.signature()}, so
        that a new kernel variant or launch config forces a retune.
    torch, triton and truthfuse versions and the cache format are always included.
    """
    payload = {
        "format": FORMAT_VERSION,
        "graph": str(graph_signature),
        "shapes": _canonical(shapes),
        "dtypes": _canonical(dtypes),
        "device": str(device_name),
        "strategy": str(strategy),
        "versions": library_versions(),
        "extra": _canonical(dict(extra or {})),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- the cache ------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """$TRUTHFUSE_CACHE_DIR if set, else $XDG_CACHE_HOME/truthfuse, else ~/.cache/truthfuse."""
    override = os.environ.get(ENV_CACHE_DIR)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "truthfuse"


def _check_key(key: str) -> str:
    if not isinstance(key, str) or not _KEY_PATTERN.match(key):
        raise ValueError(f"invalid tuning cache key {key!r}: use letters, digits, '_', '-', '.'")
    return key


def _write_json_atomically(path: Path, payload: Any) -> None:
    """Write `payload` as JSON to `path` so that readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The temporary file must live in the same directory: os.replace is atomic only within one
    # file system. Its leading dot keeps it out of entries() if a crash leaves it behind.
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            json.dump(payload, handle, sort_keys=True, allow_nan=False)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates the file owner-only; a cache directory shared by a team or a cluster
        # needs the usual readable-by-all mode.
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except OSError:
            pass
        raise


class TuningCache:
    """Tuning decisions on disk, one JSON file per key.

    directory: where the files live; default `default_cache_dir()`, read when the cache is created
    (so TRUTHFUSE_CACHE_DIR set before compiling takes effect).
    """

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory).expanduser() if directory is not None else default_cache_dir()
        # An unusable directory fails every read and write; the backend uses one cache per graph,
        # so a compile warns about it once, not once per read and once per write.
        self._io_problem_reported = False

    def _io_problem(self, message: str) -> None:
        if self._io_problem_reported:
            _log.debug("truthfuse: %s", message)
            return
        self._io_problem_reported = True
        _warn(message, stacklevel=4)

    def path_for(self, key: str) -> Path:
        """The file that holds `key`."""
        return self.directory / f"{_check_key(key)}.json"

    def get(self, key: str) -> dict | None:
        """The record stored under `key`, or None on a miss.

        A file that exists but cannot be used (corrupt, foreign format or truthfuse version,
        mismatched key) warns once with TuningCacheWarning and counts as a miss. So does a file
        that cannot be read, but this cache warns about reads and writes failing only once.
        """
        path = self.path_for(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            # A path component that is a file leaves no entry there to read: a plain miss. The
            # write that follows says the directory is unusable.
            return None
        except OSError as error:
            self._io_problem(f"cannot read tuning cache file {path}: {error}; retuning")
            return None
        record, problem = _parse_envelope(data, key)
        if problem:
            _warn(f"ignoring tuning cache file {path}: {problem}; retuning")
            return None
        return record

    def reject(self, key: str, problem: str) -> None:
        """Warn (TuningCacheWarning) that the record `get` returned for `key` cannot be used, for a
        problem only its reader can see (a malformed field, a plan for other sites); the caller
        then retunes and overwrites it."""
        _warn(f"ignoring tuning cache file {self.path_for(key)}: {problem}; retuning")

    def put(self, key: str, record: Mapping[str, Any]) -> bool:
        """Store `record` (a JSON-serializable dict, finite floats only) under `key` atomically.

        Returns True when written. A cache directory that cannot be written (read-only home,
        full disk) warns and returns False: the decision is still used, just not remembered. No
        second warning comes if a read of this cache already failed.
        A record that is not JSON-serializable is a programming error and raises TypeError or
        ValueError.
        """
        path = self.path_for(key)
        envelope = {
            "format": FORMAT_VERSION,
            "truthfuse": truthfuse_version(),
            "key": key,
            "created": time.time(),
            "record": dict(record),
        }
        # Serialize first so a bad record raises here instead of being reported as an I/O problem.
        json.dumps(envelope, allow_nan=False)
        try:
            _write_json_atomically(path, envelope)
        except OSError as error:
            self._io_problem(f"cannot write tuning cache file {path}: {error}; the decision is not saved")
            return False
        return True

    def entries(self) -> dict[str, dict]:
        """Every usable record, by key. Unusable files are skipped with one summary warning."""
        found: dict[str, dict] = {}
        skipped = []
        for path in self._files():
            key = path.stem
            try:
                data = path.read_bytes()
            except OSError as error:
                skipped.append(f"{path.name} ({error})")
                continue
            record, problem = _parse_envelope(data, key)
            if problem:
                skipped.append(f"{path.name} ({problem})")
            else:
                found[key] = record
        if skipped:
            _warn(f"skipped {len(skipped)} unusable tuning cache file(s) in {self.directory}: "
                  + "; ".join(skipped[:5]) + ("; ..." if len(skipped) > 5 else ""))
        return found

    def clear(self) -> int:
        """Delete every cache file (and leftover temporary files); returns how many entries went.

        Only truthfuse's own files go (see `_written_by_truthfuse`): the directory may be shared
        (TRUTHFUSE_CACHE_DIR, `truthfuse cache --dir`), and other JSON files there are not ours."""
        removed = 0
        for path in self._files():
            if not _written_by_truthfuse(path):
                continue
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
        if self.directory.is_dir():
            for leftover in self.directory.glob(".*.json.*.tmp"):
                try:
                    leftover.unlink()
                except OSError:
                    pass
        return removed

    def __len__(self) -> int:
        return len(self._files())

    def _files(self) -> list[Path]:
        if not self.directory.is_dir():
            return []
        return sorted(p for p in self.directory.glob("*.json")
                      if not p.name.startswith(".") and _KEY_PATTERN.match(p.stem))


_DIGEST_NAME = re.compile(r"^[0-9a-f]{64}$")


def _written_by_truthfuse(path: Path) -> bool:
    """Whether `path` is a cache file: its envelope names truthfuse and its own key (whatever the
    format or truthfuse version), or it is named by a cache_key digest and no longer parses (a
    file truncated by a full disk, say; entries are written whole, so this is rare)."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    try:
        envelope = _json_of(data)
    except _UNREADABLE_JSON:
        return bool(_DIGEST_NAME.match(path.stem))
    return (isinstance(envelope, dict) and "truthfuse" in envelope and "format" in envelope
            and envelope.get("key") == path.stem)


def _warn(message: str, stacklevel: int = 3) -> None:
    warnings.warn(f"truthfuse: {message}", TuningCacheWarning, stacklevel=stacklevel)


# What reading a file's bytes as JSON raises on a corrupt file: not UTF-8 (UnicodeDecodeError is a
# ValueError), not JSON, or nested too deep for the parser (RecursionError)
_UNREADABLE_JSON = (ValueError, RecursionError)


def _json_of(data: bytes, **kwargs):
    """json.loads of a file's bytes, decoded as UTF-8 here: read_text's UnicodeDecodeError is no
    OSError, so a file of bytes that are not UTF-8 failed the compile and `truthfuse cache`."""
    return json.loads(data.decode("utf-8"), **kwargs)


def _parse_envelope(data: bytes, key: str) -> tuple[dict | None, str | None]:
    """(record, None) for a usable file's bytes, (None, reason) otherwise: a file of bytes that are
    not UTF-8 (disk corruption) is as unusable as one that is not JSON."""
    try:
        envelope = _json_of(data)
    except _UNREADABLE_JSON as error:
        return None, f"not valid JSON ({error})"
    if not isinstance(envelope, dict):
        return None, "not a JSON object"
    if envelope.get("format") != FORMAT_VERSION:
        return None, f"cache format {envelope.get('format')!r}, expected {FORMAT_VERSION}"
    version = truthfuse_version()
    if envelope.get("truthfuse") != version:
        return None, f"written by truthfuse {envelope.get('truthfuse')!r}, this is {version!r}"
    if envelope.get("key") != key:
        return None, f"holds key {envelope.get('key')!r}, not {key!r}"
    record = envelope.get("record")
    if not isinstance(record, dict):
        return None, "no record object"
    return record, None


# -- export and import ----------------------------------------------------------------------


def save_state(path: str | os.PathLike, cache: TuningCache | None = None) -> int:
    """Write every decision in the cache to one JSON file at `path`; returns how many.

    Ship that file to other machines and call load_state there: their first compile then hits the
    cache instead of tuning (as long as the graph, shapes, device name and versions match, since
    those make up the key).
    """
    if Path(path).is_dir():
        # the atomic write's temporary file sat beside the folder, and its rename onto the folder
        # raised an IsADirectoryError that named the temporary file, not the path given
        raise IsADirectoryError(f"save_state: {path} is a folder; give the path of the file to write, "
                                f"e.g. {Path(path) / 'truthfuse_state.json'}")
    cache = TuningCache() if cache is None else cache
    entries = cache.entries()
    state = {
        "format": STATE_FORMAT,
        "format_version": FORMAT_VERSION,
        "truthfuse": truthfuse_version(),
        "versions": library_versions(),
        "entries": entries,
    }
    _write_json_atomically(Path(path), state)
    return len(entries)


def _no_such_number(name: str):
    """json.loads' hook for NaN, Infinity and -Infinity, which JSON does not have: a state holding
    one (hand-edited) failed the import with the ValueError the cache's writer raises for them."""
    raise ValueError(f"{name} is not a JSON number")


def load_state(path: str | os.PathLike, cache: TuningCache | None = None) -> int:
    """Merge the decisions in a save_state file into the cache; returns how many were imported.

    Existing entries with other keys are kept; an entry with the same key is replaced by the file's.
    A file that is missing, not JSON, or not a truthfuse tuning state raises TuningStateError (a
    ValueError) naming the file and the problem. A state saved by another truthfuse version warns
    and imports nothing: its keys embed that version, so none of them could ever hit.
    """
    cache = TuningCache() if cache is None else cache
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as error:
        raise TuningStateError(f"cannot read tuning state {path}: {error}") from error
    try:
        state = _json_of(data, parse_constant=_no_such_number)
    except _UNREADABLE_JSON as error:
        raise TuningStateError(f"tuning state {path} is not valid JSON: {error}") from error
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise TuningStateError(f"{path} is not a truthfuse tuning state (no format {STATE_FORMAT!r})")
    if state.get("format_version") != FORMAT_VERSION:
        raise TuningStateError(f"tuning state {path} has format version "
                               f"{state.get('format_version')!r}; this truthfuse reads {FORMAT_VERSION}")
    entries = state.get("entries")
    if not isinstance(entries, dict):
        raise TuningStateError(f"tuning state {path} has no 'entries' object")
    bad = [k for k, v in entries.items()
           if not isinstance(k, str) or not _KEY_PATTERN.match(k) or not isinstance(v, dict)]
    if bad:
        raise TuningStateError(f"tuning state {path} has malformed entries: {bad[:5]}")
    version = truthfuse_version()
    if state.get("truthfuse") != version:
        _warn(f"tuning state {path} was saved by truthfuse {state.get('truthfuse')!r}, this is "
              f"{version!r}; its {len(entries)} decision(s) cannot match and were not imported")
        return 0
    imported = 0
    for key, record in entries.items():
        if cache.put(key, record):
            imported += 1
    return imported
