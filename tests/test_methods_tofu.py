"""ToFu (tomesd's matching; MLERP merging in early blocks, pruning in late ones) on diffusers UNets: the MLERP op, the
invariants, and the block outputs against a restatement of the paper's scheme on tomesd's official matching
(tests/test_methods_tomesd.py) on a 64 x 64 token grid."""

from __future__ import annotations

import pytest
import torch

import tokenthin
from denoise_checks import BUILDERS, batch_singles_and_remove, bf16, capture, cfg_batch, identity, sdpa_eager
from test_methods_tomesd import official_offsets, restated
from tiny_diffusers import run, sd_unet
from tokenthin.adapters.registry import find_adapter
from tokenthin.ops import assign, mlerp

pytest.importorskip("diffusers")


def test_mlerp_keeps_the_largest_norm_and_copies_untouched_slots() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 6, 5, generator=g)
    keep = torch.tensor([[1, 0, 1, 0, 1, 1], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    target = torch.tensor([[-1, 0, -1, 0, -1, -1], [-1, -1, -1, -1, 1, 3]])
    a = assign.build(keep, target)
    size = torch.ones(2, 6)
    out, s = mlerp.merge(x, size, a)
    mean, s_mean = assign.merge(x, size, a)
    assert torch.equal(s, s_mean)
    groups = {0: [[0, 1, 3], [2], [4], [5]], 1: [[0], [1, 4], [2], [3, 5]]}
    for b, slots in groups.items():
        for j, members in enumerate(slots):
            if len(members) == 1:
                assert torch.equal(out[b, j], x[b, members[0]])  # untouched: bit for bit
                continue
            m = x[b, members].mean(0)
            want = m / m.norm() * x[b, members].norm(dim=-1).max()
            assert torch.allclose(out[b, j], want, atol=1e-6)
            assert torch.allclose(out[b, j] / out[b, j].norm(), mean[b, j] / mean[b, j].norm(), atol=1e-6)
    half, _ = mlerp.merge(x.to(torch.bfloat16), size, a)
    assert half.dtype == torch.bfloat16 and torch.allclose(half.float(), out, atol=3e-2)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_zero_ratio_is_identity(family: str) -> None:
    identity(family, "tofu", {"ratio": 0.0})


@pytest.mark.parametrize("family", list(BUILDERS))
def test_batch_equals_singles_and_remove_is_exact(family: str) -> None:
    batch_singles_and_remove(family, "tofu", {"ratio": 0.5, "max_downsample": 2})


def test_cfg_batch_equals_separate_runs() -> None:
    cfg_batch("tofu", {"ratio": 0.5, "merge_crossattn": True, "merge_mlp": True})


@pytest.mark.parametrize("family", ["sd", "plain"])
def test_sdpa_equals_eager(family: str) -> None:
    sdpa_eager(family, "tofu", {"ratio": 0.5, "max_downsample": 2})


@pytest.mark.parametrize("family", list(BUILDERS))
def test_bf16_runs(family: str) -> None:
    bf16(family, "tofu", {"ratio": 0.5})


def restated_tofu(metric: torch.Tensor, h: int, w: int, r: int, offsets: torch.Tensor, prune: bool):
    """tomesd's official matching with ToFu's merge: MLERP (``mean / |mean| * max |x_i|`` over a destination and
    its sources) in merging blocks, the destination as it is in pruning blocks; tomesd's unmerge (every merged
    source takes its destination's output). Slots: the unmerged sources, then the destinations."""
    _, _, dst_pos, merged, into = restated(metric, h, w, r, offsets)
    n = metric.shape[1]
    src = torch.ones(n, dtype=torch.bool)
    src[dst_pos] = False
    src[merged[0]] = False
    slots = torch.cat([src.nonzero().squeeze(1), dst_pos])  # the token each slot stands for
    slot_of = torch.full((n,), -1, dtype=torch.long)
    slot_of[slots] = torch.arange(slots.numel())
    slot_of[merged[0]] = slot_of[into[0]]  # a merged / pruned source reads its destination's slot

    def merge(x: torch.Tensor) -> torch.Tensor:
        out = x[:, slots].clone()
        if not prune:
            base = int(src.sum())
            for j, pos in enumerate(dst_pos.tolist()):
                members = [pos, *merged[0][into[0] == pos].tolist()]
                if len(members) > 1:
                    m = x[:, members].mean(1)
                    peak = x[:, members].norm(dim=-1).amax(1, keepdim=True)
                    out[:, base + j] = m / m.norm(dim=-1, keepdim=True) * peak
        return out

    return merge, lambda y: y[:, slot_of]


@pytest.mark.parametrize(("block", "prune"), [(0, False), (5, True)])
def test_block_outputs_equal_the_restated_scheme(block: int, prune: bool) -> None:
    """SD-1.x layout at 64 x 64 tokens: block 0 (down path) merges with MLERP, block 5 (up path) prunes."""
    model = sd_unet(sample=64)
    ad = find_adapter(model)
    blk = ad.blocks[block].module
    assert ad.blocks[block].level == 0
    t = 601.0
    tokenthin.apply(model, "tofu", ratio=0.5)
    assert tokenthin.api._APPLIED[model].method.prunes(block, len(ad.blocks)) is prune
    got: dict = {}
    hooks = capture(blk, got)
    run(model, torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(3)), t)
    for hk in hooks:
        hk.remove()
    tokenthin.remove(model)
    x, ehs = got["args"][0], got["kwargs"]["encoder_hidden_states"]
    h = w = 64
    m, u = restated_tofu(x, h, w, int(h * w * 0.5), official_offsets(0, t, h, w), prune)
    with torch.no_grad():
        y = u(blk.attn1(m(blk.norm1(x)))) + x
        y = blk.attn2(blk.norm2(y), encoder_hidden_states=ehs) + y
        y = blk.ff(blk.norm3(y)) + y
    assert (got["out"] - y).abs().max() <= 1e-5


def test_merge_op_mean_is_tomesd_and_errors() -> None:
    model = sd_unet()
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with tokenthin.applied(model, "tomesd", ratio=0.5):
        ref = run(model, x)
    with tokenthin.applied(model, "tofu", ratio=0.5, merge_op="mean", prune_after=1.0):
        # merging everywhere with the mean is tomesd (whose mean merge takes the precomputed row path: rounding,
        # which varies with buffer alignment across runs by up to a few float32 ulps of the UNet's outputs)
        assert (run(model, x) - ref).abs().max() <= 1e-5
    with tokenthin.applied(model, "tofu", ratio=0.5):
        assert not torch.equal(run(model, x), ref)
    with pytest.raises(tokenthin.TokenThinError, match="prune_after"):
        tokenthin.apply(model, "tofu", prune_after=2)
    with pytest.raises(tokenthin.TokenThinError, match="mlerp"):
        tokenthin.apply(model, "tofu", merge_op="slerp")
