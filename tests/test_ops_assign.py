"""Property tests for assignments and bipartite matching."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenthin.ops import assign
from tokenthin.ops.matching import match


@st.composite
def plans(draw):
    b = draw(st.integers(1, 3))
    n = draw(st.integers(2, 24))
    d = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (b, n), generator=g).double()
    keep = torch.rand(b, n, generator=g) < 0.5
    keep[:, 0] = True  # at least one slot per sample
    # every non-kept token merges into a random kept token, or is dropped
    target = torch.full((b, n), -1, dtype=torch.long)
    for i in range(b):
        kept = keep[i].nonzero().flatten()
        pick = kept[torch.randint(0, len(kept), (n,), generator=g)]
        drop = torch.rand(n, generator=g) < 0.3
        target[i] = torch.where(keep[i] | drop, torch.full_like(pick, -1), pick)
    return x, size, keep, target


@settings(max_examples=60, deadline=None)
@given(plans())
def test_merge_preserves_size_and_weighted_mean(p) -> None:
    x, size, keep, target = p
    a = assign.build(keep, target)
    out, size_out = assign.merge(x, size, a)
    moved = (a.dst >= 0).double()
    # the size sum over surviving tokens is preserved, and so is the size-weighted sum of features
    assert torch.allclose(size_out.sum(1), (size * moved).sum(1))
    assert torch.allclose((out * size_out[..., None]).sum(1), (x * (size * moved)[..., None]).sum(1))
    assert torch.equal(a.counts, keep.sum(1))


@settings(max_examples=60, deadline=None)
@given(plans())
def test_unmerge_maps_every_token_to_its_slot(p) -> None:
    x, size, keep, target = p
    b, n, _ = x.shape
    a = assign.build(keep, target)
    out, _ = assign.merge(x, size, a)
    src = assign.compose_source(torch.arange(n).expand(b, n), a)
    full = assign.unmerge(out, src)
    assert full.shape == x.shape
    for i in range(b):
        for t in range(n):
            if src[i, t] < 0:
                assert torch.all(full[i, t] == 0)
            else:
                assert torch.equal(full[i, t], out[i, src[i, t]])
    # composing twice equals composing the chained assignment
    keep2 = torch.zeros(b, a.n_out, dtype=torch.bool)
    keep2[:, 0] = True
    a2 = assign.build(keep2, torch.zeros(b, a.n_out, dtype=torch.long).masked_fill(keep2, -1))
    src2 = assign.compose_source(src, a2)
    assert bool(((src2 == 0) | (src < 0)).all())


def test_pure_selection_copies_exactly() -> None:
    x = torch.randn(2, 7, 3)
    keep = torch.tensor([[1, 0, 1, 1, 0, 0, 1], [1, 1, 0, 0, 0, 1, 1]], dtype=torch.bool)
    a = assign.build(keep)
    out, size = assign.merge(x, torch.ones(2, 7), a)
    assert torch.equal(out[0], x[0, [0, 2, 3, 6]])
    assert torch.equal(out[1], x[1, [0, 1, 5, 6]])
    assert not a.merges and torch.equal(size, torch.ones(2, 4))


def test_padding_when_counts_differ() -> None:
    x = torch.randn(2, 4, 2)
    keep = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    out, size = assign.merge(x, torch.ones(2, 4), assign.build(keep))
    assert out.shape == (2, 3, 2)
    assert torch.equal(size[1], torch.tensor([1.0, 0.0, 0.0])) and torch.all(out[1, 1:] == 0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(3, 30), st.integers(0, 2), st.integers(0, 2**16))
def test_match_merges_exactly_r_and_never_protected(b: int, n: int, protected: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    metric = torch.randn(b, n, 4, generator=g)
    cand = torch.ones(b, n, dtype=torch.bool)
    cand[:, :protected] = False
    n_a = len(range(0, n, 2)) - len(range(0, min(protected, n), 2))
    r = min(n_a, (n - protected) // 2)
    keep, target = match(metric, r, cand)
    assert torch.all(keep[:, :protected])
    assert torch.equal((~keep).sum(1), torch.full((b,), r))
    moved = ~keep
    assert torch.all(target[moved] >= protected)
    assert torch.all(keep.gather(1, target.clamp(min=0))[moved])
    assert torch.all(target[keep] == -1)


def test_match_picks_the_most_similar_pair() -> None:
    # token 2 (A) is a near copy of token 3 (B); everything else is orthogonal-ish
    metric = torch.eye(6).unsqueeze(0)
    metric[0, 2] = metric[0, 3] + 0.01
    keep, target = match(metric, 1, torch.ones(1, 6, dtype=torch.bool))
    assert keep[0].tolist() == [True, True, False, True, True, True]
    assert target[0, 2] == 3


def test_threshold_limits_merges_per_sample() -> None:
    metric = torch.eye(6).repeat(2, 1, 1)
    metric[0, 2] = metric[0, 3] + 0.01  # sample 0 has one similar pair, sample 1 none
    keep, _ = match(metric, 3, torch.ones(2, 6, dtype=torch.bool), threshold=0.5)
    assert (~keep).sum(1).tolist() == [1, 0]
