"""PiToMe and DToMe (DyMU): the energy score, hand-made plans, and the behaviour every method keeps on tiny models."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import tokenthin
from tokenthin.methods.base import ReduceInput, SignalSource, get
from tokenthin.methods.dtome import DToMe
from tokenthin.methods.pitome import pitome_round
from tokenthin.scores.energy import energy

IMAGE, PATCH, LAYERS = 56, 8, 4
N_PATCHES = (IMAGE // PATCH) ** 2
METHODS = ["pitome", "dtome"]
FAMILIES = ["vit", "dinov2"]


def build(family: str, attn: str = "sdpa", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    common = dict(hidden_size=32, num_hidden_layers=LAYERS, num_attention_heads=4, image_size=IMAGE, patch_size=PATCH)
    if family == "vit":
        from transformers import ViTConfig, ViTModel

        return ViTModel(ViTConfig(intermediate_size=64, attn_implementation=attn, **common)).eval()
    from transformers import Dinov2Config, Dinov2Model

    return Dinov2Model(Dinov2Config(mlp_ratio=2, attn_implementation=attn, **common)).eval()


def run(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=x).last_hidden_state


def apply(model: nn.Module, method: str, r: int, calib: torch.Tensor, **kw) -> nn.Module:
    if method == "dtome":
        return tokenthin.apply(model, method, r=r, calibration=calib.to(next(model.parameters()).dtype), **kw)
    return tokenthin.apply(model, method, r=r, **kw)


@pytest.fixture
def images() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(4, 3, IMAGE, IMAGE, generator=g)


@pytest.fixture
def mixed(images: torch.Tensor) -> torch.Tensor:
    """Two noise images and two flat ones: under fixed thresholds they keep very different token counts."""
    return torch.cat([images[:2], torch.ones(1, 3, IMAGE, IMAGE), torch.full((1, 3, IMAGE, IMAGE), -0.5)])


# ----- hand-made reduction inputs -----


class _Keys(SignalSource):
    def __init__(self, k: torch.Tensor) -> None:
        self.k = k

    def keys(self, layer: int) -> torch.Tensor:
        return self.k


def _inp(k: torch.Tensor, calibrating: bool) -> ReduceInput:
    b, n, _ = k.shape
    return ReduceInput(
        x=torch.zeros(b, n, 4),
        size=torch.ones(b, n),
        valid=torch.ones(b, n, dtype=torch.bool),
        num_protected=1,
        layer=0,
        num_layers=2,
        grid=(1, n - 1),
        pristine=True,
        signals=_Keys(k),
        calibrating=calibrating,
    )


# ----- the energy score -----


def test_energy_hand_example() -> None:
    # three copies of e1 and one e2: cos = 1 inside the cluster, 0 across
    metric = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.5, 0.0], [0.0, 3.0]]])
    m = 0.5
    hi, lo = 1 - m, math.exp(0 - m) - 1  # ELU(1 - m), ELU(0 - m)
    e = energy(metric, m)
    expected = torch.tensor([[(3 * hi + lo) / 4] * 3 + [(hi + 3 * lo) / 4]])
    assert torch.allclose(e, expected, atol=1e-6)
    assert e[0, :3].min() > e[0, 3]  # the cluster has high energy, the isolated token low
    # alpha scales the part below the margin only
    e2 = energy(metric, m, alpha=2.0)
    assert torch.allclose(e2, torch.tensor([[(3 * hi + 2 * lo) / 4] * 3 + [(hi + 6 * lo) / 4]]), atol=1e-6)


def test_energy_candidates_and_batch() -> None:
    metric = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [0.5, 0.0], [0.0, 3.0]]])
    cand = torch.tensor([[True, False, True, True]])
    m = 0.5
    hi, lo = 1 - m, math.exp(-m) - 1
    e = energy(metric, m, candidates=cand)
    assert e[0, 1] == -torch.inf
    assert torch.allclose(e[0, [0, 2, 3]], torch.tensor([(2 * hi + lo) / 3, (2 * hi + lo) / 3, (hi + 2 * lo) / 3]))
    # two candidates always tie exactly (symmetric graph), whatever the kernels round
    pair = torch.tensor([[False, False, True, True, False]]).expand(64, 5)
    e = energy(torch.randn(64, 5, 6, generator=torch.Generator().manual_seed(3)), 0.675, 1.0, pair)
    assert torch.equal(e[:, 2], e[:, 3])
    # batched with a per-sample margin == one sample at a time
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 7, 5, generator=g)
    cand = torch.rand(3, 7, generator=g) > 0.3
    margins = torch.tensor([0.9, 0.3, -0.2])
    eb = energy(x, margins, 1.0, cand)
    for i in range(3):
        ei = energy(x[i : i + 1], float(margins[i]), 1.0, cand[i : i + 1])
        assert torch.equal(torch.isinf(eb[i]), ~cand[i])
        assert torch.allclose(eb[i][cand[i]], ei[0][cand[i]], atol=1e-6)


def test_pitome_round_merges_the_cluster_and_protects_isolated_tokens() -> None:
    # tokens 0, 2, 3, 5 form a tight cluster; 1 and 4 are isolated (low energy)
    metric = torch.tensor(
        [[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [1.0, 0.01, 0.0], [1.0, 0.0, 0.02], [0.0, 0.0, 1.0], [1.0, 0.01, 0.01]]]
    )
    cand = torch.ones(1, 6, dtype=torch.bool)
    keep, target = pitome_round(metric, torch.tensor([2]), cand, margin=0.5, alpha=1.0)
    assert keep[0, 1] and keep[0, 4]
    assert int((~keep).sum()) == 2
    assert target is not None
    gone = (~keep[0]).nonzero().flatten()
    assert all(int(target[0, i]) in (0, 2, 3, 5) and keep[0, int(target[0, i])] for i in gone)


def test_pitome_reduce_padded_multi_round_per_sample() -> None:
    """Random padded batches and keep counts (many need several rounds): exact counts, valid targets, and every
    sample planned exactly as when it runs alone."""
    pitome = get("pitome")()
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        b, n = 3, int(torch.randint(4, 24, (1,), generator=g))
        valid = torch.arange(n).expand(b, n) < torch.randint(3, n + 1, (b, 1), generator=g)
        k = torch.randn(b, n, 6, generator=g)

        def inp(sl: slice, k=k, valid=valid) -> ReduceInput:
            i = _inp(k[sl], False)
            i.valid, i.layer, i.num_layers = valid[sl], 1, 4
            return i

        full = inp(slice(None))
        keep_n = (torch.rand(b, generator=g) * full.counts).long() + 1
        keep, target = pitome.reduce(full, keep_n)
        assert torch.equal((keep & full.candidates).sum(1), keep_n)
        moving = ~keep & valid
        assert target is not None or not moving.any()
        if target is not None:
            assert (target[moving] >= 0).all() and keep.gather(1, target.clamp(min=0))[moving].all()
        for i in range(b):
            k1, t1 = pitome.reduce(inp(slice(i, i + 1)), keep_n[i : i + 1])
            assert torch.equal(k1[0] & valid[i], keep[i] & valid[i])
            if t1 is not None:
                assert torch.equal(t1[0][moving[i]], target[i][moving[i]])


# ----- DToMe on hand-made inputs -----


def _flat_and_busy(n: int = 9) -> torch.Tensor:
    flat = torch.ones(1, n, 8) + 0.01 * torch.arange(n).view(1, n, 1) * torch.eye(8)[0]
    busy = torch.eye(8).repeat(2, 1)[:n].unsqueeze(0)  # one-hot tokens: every A->B edge has similarity 0
    return torch.cat([flat, busy])


def test_dtome_calibration_is_batch_level_and_inference_per_sample() -> None:
    k = _flat_and_busy()
    counts = torch.tensor([8, 8])
    m = DToMe()
    m.calibrate(lambda: m.reduce(_inp(k, True), counts - 2))  # B * r = 4 merges in the batch
    keep, _ = m.reduce(_inp(k, True), counts - 2)
    merged = (~keep).sum(1)
    assert int(merged.sum()) == 4 and merged.tolist() == [4, 0]  # all four from the flat sample
    assert 0.0 <= m.thresholds[0] < 1.0
    keep, _ = m.reduce(_inp(k, False), counts - 2)  # inference: keep count is ignored, the threshold rules
    assert (~keep).sum(1).tolist() == [4, 0]
    m.thresholds = {0: -1.0}  # everything above threshold: capped at half of each sample's candidates
    keep, _ = m.reduce(_inp(k, False), counts - 2)
    assert (~keep).sum(1).tolist() == [4, 4]


def test_dtome_needs_calibration(images: torch.Tensor) -> None:
    with pytest.raises(tokenthin.TokenThinError, match="calibration"):
        DToMe().reduce(_inp(_flat_and_busy(), False), torch.tensor([6, 6]))
    model = build("vit")
    with pytest.raises(tokenthin.TokenThinError, match="calibration="):
        tokenthin.apply(model, "dtome", r=2)
    assert not tokenthin.is_applied(model)


# ----- behaviour on tiny HF models -----


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_budget_is_identity_and_remove_restores(family: str, method: str, images: torch.Tensor) -> None:
    model = build(family)
    ref = run(model, images)
    apply(model, method, 0, images)
    assert (run(model, images) - ref).abs().max() <= 1e-5
    tokenthin.remove(model)
    apply(model, method, 3, images)
    reduced = run(model, images)
    assert reduced.shape[1] < ref.shape[1]
    tokenthin.remove(model)
    assert torch.equal(run(model, images), ref)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("family", FAMILIES)
def test_batch_equals_single(family: str, method: str, images: torch.Tensor, mixed: torch.Tensor) -> None:
    model = build(family)
    apply(model, method, 3, images)
    batched = run(model, mixed)
    valid = tokenthin.info(model).valid
    kept = tokenthin.info(model).kept
    if method == "dtome":
        assert len(set(kept)) > 1, kept  # dynamic: samples really keep different counts
    else:
        assert set(kept) == {kept[0]}
    for i in range(mixed.shape[0]):
        single = run(model, mixed[i : i + 1])
        assert single.shape[1] == kept[i]
        got = batched[i][valid[i]] if valid is not None else batched[i]
        assert torch.allclose(got, single[0], atol=2e-5, rtol=1e-4), i


@pytest.mark.parametrize("method", METHODS)
def test_sdpa_equals_eager(method: str, images: torch.Tensor, mixed: torch.Tensor) -> None:
    sdpa = build("dinov2", "sdpa")
    eager = build("dinov2", "eager", seed=1)
    eager.load_state_dict(sdpa.state_dict())
    for m in (sdpa, eager):
        apply(m, method, 3, images)
    a, b = run(sdpa, mixed), run(eager, mixed)
    assert a.shape == b.shape and (a - b).abs().max() <= 1e-4
    assert tokenthin.info(sdpa).kept == tokenthin.info(eager).kept


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_runs(method: str, dtype: torch.dtype, images: torch.Tensor, mixed: torch.Tensor) -> None:
    model = build("dinov2").to(dtype)
    apply(model, method, 3, images)
    out = run(model, mixed.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert out.shape[1] < 1 + N_PATCHES


@pytest.mark.parametrize("family", FAMILIES)
def test_pitome_token_counts_match_budget(family: str, images: torch.Tensor) -> None:
    model = build(family)
    tokenthin.apply(model, "pitome", r=5)
    run(model, images)
    info = tokenthin.info(model)
    assert info.tokens_per_layer == [1 + N_PATCHES - 5 * i for i in range(LAYERS)]
    assert info.kept == [1 + N_PATCHES - 5 * (LAYERS - 1)] * images.shape[0]
    assert torch.equal(info.size.sum(1), torch.full((images.shape[0],), 1.0 + N_PATCHES))


def test_pitome_single_site_beyond_half(images: torch.Tensor, mixed: torch.Tensor) -> None:
    model = build("dinov2")
    tokenthin.apply(model, "pitome", keep=5, site="output")  # 49 -> 5 needs several rounds
    batched = run(model, mixed)
    info = tokenthin.info(model)
    assert info.kept == [6] * mixed.shape[0]
    assert torch.equal(info.size.sum(1), torch.full((mixed.shape[0],), 1.0 + N_PATCHES))
    assert bool((info.source >= 0).all())  # merged, never dropped
    for i in range(mixed.shape[0]):
        assert torch.allclose(batched[i], run(model, mixed[i : i + 1])[0], atol=2e-5, rtol=1e-4)


def test_pitome_margin_schedule_and_params() -> None:
    m = get("pitome")()
    assert [round(m.margin_at(i, 4), 6) for i in range(4)] == [0.9, 0.675, 0.45, 0.225]
    assert get("pitome")(margin=0.5).margin_at(2, 4) == 0.25
    with pytest.raises(tokenthin.TokenThinError, match="margin"):
        get("pitome")(margin=2.0)


def test_dtome_calibration_merges_b_times_r(images: torch.Tensor) -> None:
    model = build("dinov2")
    r = 3
    tokenthin.apply(model, "dtome", r=r, calibration=images)
    thresholds = tokenthin.runtime_of(model).method.thresholds
    assert sorted(thresholds) == list(range(LAYERS - 1))
    assert all(0.0 <= t <= 1.0 for t in thresholds.values())
    info = tokenthin.info(model)  # the calibration pass itself: batch-level, B * r merges per layer
    assert sum(info.kept) == images.shape[0] * (1 + N_PATCHES - r * (LAYERS - 1))
    # re-applying re-calibrates: a larger r gives lower thresholds
    tokenthin.apply(model, "dtome", r=2 * r, calibration=images, replace=True)
    lower = tokenthin.runtime_of(model).method.thresholds
    assert all(lower[k] <= thresholds[k] for k in thresholds)


def test_dtome_caps_r_per_sample_for_nearly_empty_samples() -> None:
    """A flat image merges almost everything early; later layers must cap r per sample instead of raising."""
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    cfg = Dinov2Config(
        hidden_size=32, num_hidden_layers=8, num_attention_heads=4, mlp_ratio=2, image_size=56, patch_size=8
    )
    m = Dinov2Model(cfg).eval()
    x = torch.randn(4, 3, 56, 56)
    flat = torch.ones(1, 3, 56, 56)
    tokenthin.apply(m, "dtome", r=4, calibration=torch.cat([x, flat]))
    with torch.no_grad():
        m(pixel_values=torch.cat([x, flat]))
    kept = tokenthin.info(m).kept
    assert kept[-1] < min(kept[:-1])
    with torch.no_grad():
        m(pixel_values=flat)
    assert tokenthin.info(m).tokens_per_layer[-1] >= 2
