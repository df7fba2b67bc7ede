"""``hiprune`` with ``official=True`` against a restatement of the released ``encode_images`` (Danielement321/HiPrune,
``llava/model/llava_arch.py``; written here from reading it, not copied) on LLaVA-1.5 sizes: [CLS] + 24 x 24
patches, the object layer 8 and the feature layer 22 of 24."""

from __future__ import annotations

import pytest
import torch

from tokenthin.errors import TokenThinError
from tokenthin.methods.base import ReduceInput, SignalSource, get

S = 24
N = S * S


class Mean(SignalSource):
    has_cls = True

    def __init__(self, per_layer: dict[int, torch.Tensor]) -> None:
        self.per_layer = per_layer

    def mean_attention(self, layer: int) -> torch.Tensor:
        return self.per_layer[layer]


def make(b: int, seed: int, anchors_at: list[int] | None = None) -> ReduceInput:
    g = torch.Generator().manual_seed(seed)
    shallow, deep = torch.rand(b, 1 + N, generator=g) * 0.01, torch.rand(b, 1 + N, generator=g) * 0.01
    if anchors_at is not None:  # hand-placed anchors (flat patch indices) at row ends and in the first / last row
        shallow[:, [1 + i for i in anchors_at]] = 1.0
    return ReduceInput(
        x=torch.zeros(b, 1 + N, 4),
        size=torch.ones(b, 1 + N),
        valid=torch.ones(b, 1 + N, dtype=torch.bool),
        num_protected=1,
        layer=22,
        num_layers=24,
        grid=(S, S),
        pristine=True,
        signals=Mean({8: shallow, 22: deep}),
    )


def released(shallow: torch.Tensor, deep: torch.Tensor, k: int, alpha: float) -> list[int]:
    """One image's kept patch indices: ``shallow`` / ``deep`` (N,) attention received by each patch."""
    a = round(k * alpha / 5)
    top = torch.sort(shallow, descending=True, stable=True).indices[:a]
    cand = torch.cat([top, top - 1, top + 1, top - S, top + S]).clamp(0, N - 1)
    chosen = sorted(set(cand.tolist()))
    mask = torch.zeros(N)
    mask[chosen] = 1.0
    rest = torch.sort(deep - mask, descending=True, stable=True).indices[: k - len(chosen)]
    return sorted(chosen + rest.tolist())


@pytest.mark.parametrize(("k", "alpha"), [(64, 0.1), (128, 0.5), (192, 0.5), (144, 1.0)])
def test_hiprune_official_is_the_released_selection(k, alpha):
    b = 3
    inp = make(b, k)
    keep, target = get("hiprune")(official=True, alpha=alpha).reduce(inp, torch.full((b,), k))
    assert target is None and keep[:, 0].all()  # [CLS] kept on top, as the host drops it on LLaVA
    for i in range(b):
        want = released(inp.signals.per_layer[8][i, 1:], inp.signals.per_layer[22][i, 1:], k, alpha)
        assert (keep[i, 1:].nonzero().flatten()).tolist() == want, i


def test_hiprune_official_wraps_across_rows_and_clamps_where_the_default_does_not():
    # anchors: a row end (23), a row start (48), one in the first row (5) and one in the last row (570)
    spots = [23, 48, 5, 570]
    inp = make(1, 0, spots)
    k = 100  # round(100 * 0.2 / 5) = 4 anchors
    keep_o, _ = get("hiprune")(official=True, alpha=0.2).reduce(inp, torch.tensor([k]))
    keep_d, _ = get("hiprune")(alpha=0.2).reduce(inp, torch.tensor([k]))
    want = released(inp.signals.per_layer[8][0, 1:], inp.signals.per_layer[22][0, 1:], k, 0.2)
    got = keep_o[0, 1:].nonzero().flatten().tolist()
    assert got == want
    for wrapped in (24, 47, 0, 575):  # 23 + 1, 48 - 1, clamp(5 - 24), clamp(570 + 24): in the release's buffers
        assert wrapped in got
    # the default's buffers are true grid neighbours: none of those is a neighbour of an anchor (they can still
    # be registers), and 5 - 24 / 570 + 24 do not exist
    d = set(keep_d[0, 1:].nonzero().flatten().tolist())
    assert {22, 47 + 1 + 1, 5 + 24, 570 - 24} <= d and d != set(got)


def test_hiprune_official_errors_where_the_release_overruns_the_budget():
    spots = [r * S + c for r in (2, 5, 8, 11, 14, 17, 20) for c in (3, 10)][:13]
    inp = make(1, 1, spots)  # 13 isolated interior anchors: 65 tokens with their buffers
    with pytest.raises(TokenThinError, match="overrun"):
        get("hiprune")(official=True, alpha=1.0).reduce(inp, torch.tensor([64]))  # 13 anchors: up to 65 > 64
    keep, _ = get("hiprune")(alpha=1.0).reduce(inp, torch.tensor([64]))  # the default caps anchors at 12
    assert int(keep[0, 1:].sum()) == 64
    with pytest.raises(TokenThinError, match="official"):
        get("hiprune")(official=1)
