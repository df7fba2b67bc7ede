"""Shared by the real-model loaders: the on-disk cache of converted weights (where it lives, atomic writes,
validity) and optional-dependency imports."""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import importlib.util
import os
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import MissingDependencyError


def cache_dir() -> Path:
    """``$TOKENTHIN_CACHE`` if set, else ``platformdirs.user_cache_dir("tokenthin")``, else
    ``~/.cache/tokenthin``. Not created here."""
    env = os.environ.get("TOKENTHIN_CACHE")
    if env:
        return Path(env).expanduser()
    try:
        import platformdirs
    except ImportError:
        return Path.home() / ".cache" / "tokenthin"
    return Path(platformdirs.user_cache_dir("tokenthin"))


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """Write tensors (safetensors, or torch.save for a .pt path) through a temporary file and a rename, so an
    interrupted write never leaves a half file behind."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import save_file

            save_file(tensors, tmp, metadata=metadata)
        else:
            torch.save({"tensors": tensors, "metadata": metadata}, tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache may be shared
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def load_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata written by :func:`save_atomic`."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
    blob = torch.load(path, map_location="cpu", weights_only=True)
    return blob["tensors"], blob["metadata"]


def package_version() -> str:
    """tokenthin's installed version (cache file names carry it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tokenthin")
    except PackageNotFoundError:
        return "0+unknown"


def source_key(path: Path) -> str:
    """Short hash of a source file's size and mtime: a changed file gets a new cache file."""
    st = path.stat()
    return hashlib.sha256(f"{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]


def has_safetensors() -> bool:
    return importlib.util.find_spec("safetensors") is not None


def cached_tensors(
    path: Path, metadata: dict[str, str], convert: Callable[[], dict[str, torch.Tensor]], label: str, cache: bool = True
) -> dict[str, torch.Tensor]:
    """Tensors from the cache file at ``path`` when its ``format`` and ``source`` metadata match, else from
    ``convert()`` (then written to the cache; a cache that cannot be read or written only warns)."""
    if not cache:
        return convert()
    if path.is_file():
        try:
            tensors, found = load_file(path)
            if all(found.get(k) == metadata[k] for k in ("format", "source")):
                return tensors
            warnings.warn(f"ignoring stale {label} cache {path}", stacklevel=3)
        except Exception as exc:
            warnings.warn(f"ignoring unreadable {label} cache {path} ({exc}); converting again", stacklevel=3)
    tensors = convert()
    try:
        save_atomic(tensors, path, metadata)
    except OSError as exc:
        warnings.warn(f"could not write the {label} cache {path} ({exc}); continuing uncached", stacklevel=3)
    return tensors


def require(module: str, model: str, extra: str = "real") -> Any:
    """Import an optional dependency of a real-model loader, or fail with the install command."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"`{module}` is needed for the {model} model; install it (`pip install {module}` or "
            f"`pip install tokenthin[{extra}]`)"
        ) from exc


def cache_file(stem: str, format_version: int, source: Path) -> Path:
    """Where the converted tensors of ``source`` are cached: under :func:`cache_dir`, named
    ``<stem>-tokenthin<version>-f<format_version>-<source_key(source)>`` with the suffix ``.safetensors`` when
    safetensors is installed, else ``.pt`` (a ``torch.save`` file). A new tokenthin version, conversion format or
    source file gets a new name."""
    suffix = "safetensors" if has_safetensors() else "pt"
    version = package_version().replace("+", "_")
    return cache_dir() / f"{stem}-tokenthin{version}-f{format_version}-{source_key(source)}.{suffix}"
