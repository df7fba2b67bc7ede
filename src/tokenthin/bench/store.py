"""Benchmark results on disk: one JSON object per line in ``results/<run>/results.jsonl``.

The file is append-only and safe to resume. Each row carries a ``key``: the hash of the configuration that
produced it (:func:`config_key`). A resumed run asks :meth:`ResultStore.has` before computing a row and skips
the ones already stored. :meth:`ResultStore.append` writes a whole line with one ``os.write`` on an ``O_APPEND``
descriptor and fsyncs it, so a crash leaves at most one truncated last line. Readers skip that line with a
warning, and the next append starts on a fresh line, so the fragment cannot swallow the next row.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
import os
import platform
import warnings
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path, PurePath
from typing import Any

__all__ = ["ResultStore", "ResultStoreWarning", "config_key", "environment"]

KEY_LENGTH = 16  # hex digits of the sha256 kept: 64 bits, plenty for a few thousand rows per run


class ResultStoreWarning(UserWarning):
    """A line of a results file could not be read and was skipped."""


# --------------------------------------------------------------------------------------------------- config keys


def _canonical(obj: Any) -> Any:
    """A JSON-ready copy of ``obj`` that depends only on its values: keys sorted later, tuples as lists,
    integral floats as ints (so ``budget=1`` and ``budget=1.0`` hash alike), paths as POSIX strings."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise ValueError(f"config_key: non-finite number {obj!r} in a configuration")
        return int(obj) if obj.is_integer() else obj
    if isinstance(obj, Mapping):
        return {str(k): _canonical(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_canonical(v) for v in obj]
    if isinstance(obj, (set, frozenset)):
        items = [_canonical(v) for v in obj]
        return sorted(items, key=lambda v: json.dumps(v, sort_keys=True))
    if isinstance(obj, PurePath):
        return obj.as_posix()
    item = getattr(obj, "item", None)  # numpy / torch scalars
    if callable(item):
        try:
            return _canonical(item())
        except (TypeError, ValueError, RuntimeError):
            pass
    raise TypeError(f"config_key: cannot hash a value of type {type(obj).__name__}: {obj!r}")


def config_key(config: Mapping[str, Any]) -> str:
    """A stable short hash of the configuration that defines a row.

    sha256 of the canonical JSON (sorted keys, no whitespace) of ``config``, first 16 hex digits. It does not
    depend on key order. Tuples hash as lists, integral floats as ints, paths as POSIX strings, and numpy/torch
    scalars as their Python value. Non-finite numbers and other types raise, so a key never depends on a
    ``repr`` that could change.
    """
    if not isinstance(config, Mapping):
        raise TypeError(f"config_key expects a mapping, got {type(config).__name__}")
    text = json.dumps(_canonical(config), sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:KEY_LENGTH]


# ------------------------------------------------------------------------------------------------- row encoding


def _jsonable(obj: Any, where: str, bad: list[str]) -> Any:
    """A JSON-ready copy of a row value. Non-finite floats become ``None`` and their paths go in ``bad``;
    numpy/torch scalars and arrays become Python numbers and lists."""
    if obj is None or isinstance(obj, (bool, str, int)):
        return obj
    if isinstance(obj, float):
        if math.isfinite(obj):
            return obj
        bad.append(where)
        return None
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v, f"{where}.{k}" if where else str(k), bad) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]", bad) for i, v in enumerate(obj)]
    if isinstance(obj, PurePath):
        return obj.as_posix()
    if isinstance(obj, (_dt.datetime, _dt.date)):
        return obj.isoformat()
    for attr in ("tolist", "item"):  # numpy arrays/scalars, torch tensors
        fn = getattr(obj, attr, None)
        if callable(fn):
            try:
                return _jsonable(fn(), where, bad)
            except (TypeError, ValueError, RuntimeError):
                continue
    raise TypeError(f"result row: cannot store a value of type {type(obj).__name__} at {where or 'top level'}")


def _encode_row(row: Mapping[str, Any]) -> bytes:
    bad: list[str] = []
    clean = _jsonable(row, "", bad)
    if bad:
        warnings.warn(
            f"result row {row.get('key')!r}: non-finite values stored as null: {', '.join(bad)}",
            ResultStoreWarning,
            stacklevel=3,
        )
    return json.dumps(clean, ensure_ascii=False, allow_nan=False).encode("utf-8")


# ------------------------------------------------------------------------------------------------------ the store


class ResultStore:
    """An append-only JSON-lines file of result rows, keyed by :func:`config_key`.

    ``ResultStore(path)`` takes the path of the ``results.jsonl`` file. :meth:`for_run` builds
    ``<root>/<run>/results.jsonl``. The file and its folder are created by the first :meth:`append`. Reads
    cache the set of keys and check the file's size and mtime, so calling :meth:`has` before every row stays
    cheap.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._keys: set[str] | None = None
        self._sig: tuple[int, int, int] | None = None

    @classmethod
    def for_run(cls, run: str, root: str | os.PathLike[str] = "results") -> ResultStore:
        """The store of run ``run``: ``<root>/<run>/results.jsonl``."""
        if not run or "/" in run or "\\" in run or run in (".", ".."):
            raise ValueError(f"bad run name {run!r}")
        return cls(Path(root) / run / "results.jsonl")

    def __repr__(self) -> str:
        return f"ResultStore({str(self.path)!r})"

    def __len__(self) -> int:
        return len(self.keys())

    def _signature(self) -> tuple[int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    # -- reading

    def rows(self) -> list[dict[str, Any]]:
        """Every complete row, in file order.

        A line that is not a JSON object with a string ``key`` is skipped with a :class:`ResultStoreWarning`.
        This covers the truncated last line of an interrupted write, and the same fragment once later appends
        have moved it into the middle of the file. A key seen twice keeps its first row, also with a warning.
        """
        sig = self._signature()
        if sig is None:
            self._keys, self._sig = set(), None
            return []
        data = self.path.read_bytes()
        lines = data.split(b"\n")
        last = len(lines) - 1  # lines[last] is whatever follows the final newline ("" for a well-formed file)
        out: list[dict[str, Any]] = []
        seen: set[str] = set()
        for i, raw in enumerate(lines):
            if not raw.strip():
                continue
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                row = None
            if not isinstance(row, dict) or not isinstance(row.get("key"), str) or not row["key"]:
                what = "incomplete last line (interrupted write?)" if i == last else "unreadable line"
                warnings.warn(
                    f"{self.path}:{i + 1}: skipping {what}: {raw[:80]!r}{'...' if len(raw) > 80 else ''}",
                    ResultStoreWarning,
                    stacklevel=2,
                )
                continue
            if row["key"] in seen:
                warnings.warn(
                    f"{self.path}:{i + 1}: duplicate key {row['key']!r}; keeping the first row",
                    ResultStoreWarning,
                    stacklevel=2,
                )
                continue
            seen.add(row["key"])
            out.append(row)
        self._keys, self._sig = seen, sig
        return out

    def keys(self) -> set[str]:
        """The keys of all complete rows."""
        if self._keys is None or self._signature() != self._sig:
            self.rows()
        assert self._keys is not None
        return set(self._keys)

    def has(self, key: str) -> bool:
        """Whether a row with this key is stored. A resumed run checks this before computing a row."""
        if self._keys is None or self._signature() != self._sig:
            self.rows()
        assert self._keys is not None
        return key in self._keys

    # -- writing

    def append(self, row: Mapping[str, Any]) -> None:
        """Store one row as one JSON line, durably.

        Raises ``ValueError`` if the row has no non-empty string ``"key"`` or its key is already stored.
        Callers check :meth:`has` first. The line is written with a single ``os.write`` on an ``O_APPEND``
        descriptor, then fsynced. If the file does not end in a newline (a fragment left by an interrupted
        write), the line is prefixed with one, so it starts fresh and the fragment stays one skippable line.
        Non-finite floats are stored as ``null`` with a warning. Numpy/torch values become plain numbers.
        """
        if not isinstance(row, Mapping):
            raise TypeError(f"a result row is a dict, got {type(row).__name__}")
        key = row.get("key")
        if not isinstance(key, str) or not key:
            raise ValueError('a result row needs a non-empty string "key" (see config_key)')
        if self.has(key):
            raise ValueError(f"{self.path}: a row with key {key!r} is already stored (check has() first)")
        line = _encode_row(row) + b"\n"

        self.path.parent.mkdir(parents=True, exist_ok=True)
        created = not self.path.exists()
        flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_BINARY", 0)
        fd = os.open(self.path, flags, 0o644)
        try:
            size = os.fstat(fd).st_size
            if size > 0:
                os.lseek(fd, size - 1, os.SEEK_SET)  # O_APPEND writes still go to the end
                if os.read(fd, 1) != b"\n":
                    line = b"\n" + line
            written = os.write(fd, line)
            while written < len(line):  # a regular file only writes short on a full disk; finish or raise
                written += os.write(fd, line[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        if created:
            _fsync_dir(self.path.parent)

        if self._keys is not None and self._sig is not None and size == self._sig[1]:
            self._keys.add(key)  # nobody else wrote since our last read: update the cache in place
            self._sig = self._signature()
        else:
            self._keys, self._sig = None, None


def _fsync_dir(path: Path) -> None:
    """Make a new file's directory entry durable too (POSIX only; a no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------------- environment


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    name = platform.processor()
    if name and name not in (platform.machine(), "x86_64", "i386", "aarch64", "arm64"):
        return name
    try:  # Linux: platform.processor() is often empty or just the architecture
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return name or platform.machine() or "unknown"


def environment(device: Any = None) -> dict[str, dict[str, Any]]:
    """Software versions and hardware for result rows: ``{"versions": {...}, "hardware": {...}}``.

    ``versions``: tokenthin, torch, transformers (``None`` when not installed; it is not imported) and python.
    ``hardware``: ``cpu`` (processor name), ``cpu_count``, ``threads`` (``torch.get_num_threads()``),
    ``device`` (the CUDA device name when ``device`` is a CUDA device, or when ``device`` is ``None`` and CUDA
    is available, else ``"cpu"``) and ``platform``.
    """
    import torch

    from .. import __version__

    dev_name = "cpu"
    dev = torch.device(device) if device is not None else None
    if dev is None and torch.cuda.is_available():
        dev = torch.device("cuda", torch.cuda.current_device())
    if dev is not None and dev.type == "cuda":
        dev_name = torch.cuda.get_device_name(dev)
    elif dev is not None:
        dev_name = dev.type
    return {
        "versions": {
            "tokenthin": __version__,
            "torch": torch.__version__,
            "transformers": _version("transformers"),
            "python": platform.python_version(),
        },
        "hardware": {
            "cpu": _cpu_name(),
            "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "device": dev_name,
            "platform": platform.platform(),
        },
    }
