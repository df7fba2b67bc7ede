"""ToDo (token downsampling of the self-attention's keys / values) on diffusers UNets: the invariants, and the block
outputs against a restatement of the official ``TokenMergeAttentionProcessor`` (ethansmith2000/ImprovedTokenMerge,
``merge_tokens="keys/values"``, ``merge_method="downsample"``) written here, on 64 x 64 token grids."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import tokenthin
from denoise_checks import BUILDERS, batch_singles_and_remove, bf16, capture, cfg_batch, identity, sdpa_eager
from tiny_diffusers import plain_unet, run, sd_unet
from tokenthin.adapters.registry import find_adapter
from tokenthin.methods.base import ReduceInput
from tokenthin.methods.todo import ToDo

pytest.importorskip("diffusers")


@pytest.mark.parametrize("family", list(BUILDERS))
def test_factor_one_is_identity(family: str) -> None:
    identity(family, "todo", {"downsample_factor": 1})


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize("mode", ["nearest-exact", "avg_pool"])
def test_batch_equals_singles_and_remove_is_exact(family: str, mode: str) -> None:
    batch_singles_and_remove(family, "todo", {"downsample_method": mode, "max_downsample": 2})


def test_cfg_batch_equals_separate_runs() -> None:
    cfg_batch("todo", {})


@pytest.mark.parametrize("family", ["sd", "plain"])
def test_sdpa_equals_eager(family: str) -> None:
    sdpa_eager(family, "todo", {"max_downsample": 2})


@pytest.mark.parametrize("family", list(BUILDERS))
def test_bf16_runs(family: str) -> None:
    bf16(family, "todo", {})


def official_downsample(t: torch.Tensor, h: int, w: int, f: int, mode: str) -> torch.Tensor:
    """The official ``up_or_downsample(item, w, h, w // f, h // f, method)``, restated."""
    b = t.shape[0]
    g = t.reshape(b, h, w, -1).permute(0, 3, 1, 2)
    if mode == "avg_pool":
        g = F.avg_pool2d(g, kernel_size=f, stride=f)
    else:
        g = F.interpolate(g, size=(h // f, w // f), mode=mode)
    return g.permute(0, 2, 3, 1).reshape(b, (h // f) * (w // f), -1)


def official_attention(a: torch.nn.Module, z: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
    """Attention with queries from z and keys / values from kv, then the output projection (the processor's body)."""
    b, _, c = z.shape
    q = a.to_q(z).view(b, -1, a.heads, c // a.heads).transpose(1, 2)
    k, v = (p(kv).view(b, -1, a.heads, c // a.heads).transpose(1, 2) for p in (a.to_k, a.to_v))
    return a.to_out[0](F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, -1, c))


@pytest.mark.parametrize("mode", ["nearest-exact", "nearest", "avg_pool"])
@pytest.mark.parametrize("f", [2, 3])
def test_same_keys_as_the_official_downsampling(mode: str, f: int) -> None:
    """The kept / pooled key tokens equal the official F.interpolate / avg_pool2d of the 64 x 64 grid."""
    h = w = 64
    x = torch.randn(2, h * w, 12, generator=torch.Generator().manual_seed(0))
    inp = ReduceInput(
        x=x,
        size=torch.ones(2, h * w),
        valid=torch.ones(2, h * w, dtype=torch.bool),
        num_protected=0,
        layer=0,
        num_layers=1,
        grid=(h, w),
        pristine=True,
        signals=None,  # type: ignore[arg-type]
    )
    m = ToDo(downsample_factor=f, downsample_method=mode)
    keep, target = m.reduce(inp, torch.full((2,), 0))
    from tokenthin.ops import assign

    got = m.block_merge(x, assign.build(keep, target), 0, 1)
    ref = official_downsample(x, h, w, f, mode)
    assert got.shape == ref.shape == (2, (h // f) * (w // f), 12)
    assert (got - ref).abs().max() <= 1e-6  # same tokens (nearest: exact copies) in the same raster order
    if mode == "nearest-exact" and f == 2:  # the bottom-right token of every 2 x 2 cell
        assert keep[0].view(h, w)[1::2, 1::2].all() and int(keep[0].sum()) == (h // 2) * (w // 2)


def test_unet2d_attention_equals_the_official_processor() -> None:
    """UNet2DModel: the attention at 64 x 64 tokens equals ``(x + out(attn(q(gn(x)), kv(down(gn(x)))))) / rescale``."""
    model = plain_unet(sample=128)
    a = find_adapter(model).blocks[0].module
    tokenthin.apply(model, "todo")
    got: dict = {}
    hooks = capture(a, got)
    run(model, torch.randn(1, 3, 128, 128, generator=torch.Generator().manual_seed(4)), 3.0)
    for hk in hooks:
        hk.remove()
    assert tokenthin.info(model).tokens_per_layer[0] == 32 * 32
    tokenthin.remove(model)
    x4 = got["args"][0]
    b, c, h, w = x4.shape
    assert (h, w) == (64, 64)
    with torch.no_grad():
        z = a.group_norm(x4.flatten(2)).transpose(1, 2)
        y = official_attention(a, z, official_downsample(z, h, w, 2, "nearest-exact"))
        y = (y.transpose(1, 2).reshape(b, c, h, w) + x4) / a.rescale_output_factor
    assert (got["out"] - y).abs().max() <= 1e-5


def test_sd_block_equals_the_official_processor() -> None:
    """SD 1.x layout, 64 x 64 tokens: attn1 with all queries and downsampled keys / values, attn2 and ff as usual."""
    model = sd_unet(sample=64)
    blk = find_adapter(model).blocks[0].module
    tokenthin.apply(model, "todo", downsample_method="nearest")
    got: dict = {}
    hooks = capture(blk, got)
    run(model, torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(3)), 601.0)
    for hk in hooks:
        hk.remove()
    tokenthin.remove(model)
    x, ehs = got["args"][0], got["kwargs"]["encoder_hidden_states"]
    with torch.no_grad():
        z = blk.norm1(x)
        y = official_attention(blk.attn1, z, official_downsample(z, 64, 64, 2, "nearest")) + x
        y = blk.attn2(blk.norm2(y), encoder_hidden_states=ehs) + y
        y = blk.ff(blk.norm3(y)) + y
    assert (got["out"] - y).abs().max() <= 1e-5


def test_timestep_threshold_stop_and_errors() -> None:
    model = sd_unet()
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    ref_early, ref_late = run(model, x, 900), run(model, x, 100)
    with tokenthin.applied(model, "todo", timestep_threshold_stop=0.2):
        assert (run(model, x, 900) - ref_early).abs().max() > 0  # 0.9 > 0.2: downsampled
        assert (run(model, x, 100) - ref_late).abs().max() <= 1e-6  # 0.1 <= 0.2: every key
        with pytest.raises(tokenthin.TokenThinError, match="different counts"):
            run(model, torch.cat([x, x]), torch.tensor([900, 100]))
    with pytest.raises(tokenthin.BudgetError, match="own budget"):
        tokenthin.apply(model, "todo", keep=0.5)
    with pytest.raises(tokenthin.TokenThinError, match="not token assignments"):
        tokenthin.apply(model, "todo", downsample_method="bilinear")
    assert ToDo(downsample_factor=3).block_ratio() == pytest.approx(8 / 9)
