"""The fixed-count path (every sample has the same tokens, no padding: a Python int budget, counts known from the
shapes) gives bit-identical plans and merged tokens to the general path (the same inputs with an all-True padding
mask and per-sample tensor budgets), and to the fixed-count matching as it was before its rewrite (``_ref_match``:
the chosen rows' best match by a gather over an expanded index and ``argmax``), at DINOv2-S sizes, ties included."""

from __future__ import annotations

import pytest
import torch

from tokenthin.methods.base import ReduceInput, SignalSource
from tokenthin.methods.tome import merge_rounds
from tokenthin.ops import assign, matching


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the runtime runs reductions
    yield
    torch.set_num_threads(before)


class Keys(SignalSource):
    def __init__(self, k: torch.Tensor) -> None:
        self.k = k

    def keys(self, layer: int) -> torch.Tensor:
        return self.k


def _tokens(b: int, n: int, d: int, seed: int) -> torch.Tensor:
    """Clustered tokens (as real keys are) with exact duplicates, so that edges tie."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(b, 16, d, generator=g)
    x = centres.gather(1, torch.randint(0, 16, (b, n, 1), generator=g).expand(b, n, d))
    x = x + 0.5 * torch.randn(b, n, d, generator=g)
    x[:, 9:30] = x[:, 5:6]  # 21 identical tokens: equal best edges
    x[:, -4:] = x[:, 40:41]
    return x


def _ref_match(metric: torch.Tensor, r: int, candidates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed-count bipartite matching before the rewrite (alternate split, one int r)."""
    b, n, _ = metric.shape
    a_idx, b_idx = torch.arange(n)[0::2].expand(b, -1), torch.arange(n)[1::2].expand(b, -1)
    a_ok, b_ok = candidates[:, 0::2], candidates[:, 1::2]
    m = metric / metric.norm(dim=-1, keepdim=True).clamp_min(1e-6)
    scores = m[:, 0::2] @ m[:, 1::2].transpose(-1, -2)
    if not bool(b_ok.all()):
        scores = scores.masked_fill(~b_ok.unsqueeze(1), -torch.inf)
    best = scores.amax(dim=-1).masked_fill(~a_ok, -torch.inf)
    top = best.topk(min(r, best.shape[1]), dim=-1, sorted=False).indices
    ok = torch.isfinite(best.gather(1, top))
    j = scores.gather(1, top.unsqueeze(-1).expand(-1, -1, scores.shape[-1])).argmax(-1)
    src = a_idx.gather(1, top)
    keep = torch.ones(b, n, dtype=torch.bool).scatter_(1, src, ~ok)
    target = torch.full((b, n), -1, dtype=torch.long).scatter_(1, src, torch.where(ok, b_idx.gather(1, j), -1))
    return keep, target


def _inp(x: torch.Tensor, keys: torch.Tensor, protected: int, fixed: bool) -> ReduceInput:
    b, n, _ = x.shape
    return ReduceInput(
        x=x,
        size=torch.ones(b, n),
        valid=torch.ones(b, n, dtype=torch.bool),  # the general path: an all-True padding mask
        num_protected=protected,
        layer=0,
        num_layers=12,
        grid=(16, 16),
        pristine=False,
        signals=Keys(keys),
        fixed=n - protected if fixed else None,
    )


@pytest.mark.parametrize(("b", "n", "r"), [(8, 257, 34), (8, 223, 30), (2, 1025, 136), (1, 1370, 152), (3, 101, 70)])
@pytest.mark.parametrize("protected", [1, 5])
def test_fixed_count_tome_is_bit_identical_to_the_general_path(b, n, r, protected):
    x = _tokens(b, n, 384, seed=n)
    keys = _tokens(b, n, 64, seed=n + 1)
    fast = merge_rounds(_inp(x, keys, protected, True), n - protected - r, keys)
    general = merge_rounds(_inp(x, keys, protected, False), torch.full((b,), n - protected - r), keys)
    assert torch.equal(fast[0], general[0]) and torch.equal(fast[1], general[1])
    if r <= (n - protected) // 2:  # one matching (more: rounds on the survivors, which the old code ran alike)
        cand = torch.ones(b, n, dtype=torch.bool)
        cand[:, :protected] = False
        ref = _ref_match(keys, r, cand)
        assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])
        per_sample = matching.match(keys, torch.full((b,), r), cand)  # r as a tensor: rank by a stable argsort
        assert torch.equal(fast[0], per_sample[0]) and torch.equal(fast[1], per_sample[1])
    assert int((~fast[0]).sum()) == b * r  # r merges per sample
    # the assignment planned from the shapes (n_out given) merges exactly as the one counted from the data
    keep, target = fast
    a_fixed, a_counted = assign.build(keep, target, n - r), assign.build(keep, target)
    for name in ("dst", "slot_src", "counts"):
        assert torch.equal(getattr(a_fixed, name), getattr(a_counted, name)), name
    size = torch.rand(b, n) + 1
    out_f, size_f = assign.merge(x, size, a_fixed)
    out_c, size_c = assign.merge(x, size, a_counted)
    assert torch.equal(out_f, out_c) and torch.equal(size_f, size_c)


def test_fixed_count_matching_keeps_the_old_choices_with_zero_and_tied_keys():
    """Rounded keys (many exact ties) and all-zero keys (every similarity 0): the same picks as before."""
    g = torch.Generator().manual_seed(3)
    keys = torch.randint(-1, 2, (4, 257, 8), generator=g).float()
    keys[1] = 0.0
    cand = torch.ones(4, 257, dtype=torch.bool)
    cand[:, 0] = False
    for r in (1, 34, 128):
        got, want = matching.match(keys, r, cand), _ref_match(keys, r, cand)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("method", ["tome", "pitome"])
def test_head_mean_taken_at_capture_changes_nothing(monkeypatch, method):
    """Methods that read only the keys' head mean get it computed when the keys are captured (while they are in
    cache); the encoder's output is bit-identical to computing it at the reduction, and the mean was taken there."""
    import tiny
    import tokenthin
    from tokenthin.runtime import state

    model = tiny.build("dinov2")
    x = torch.randn(3, 3, tiny.IMAGE, tiny.IMAGE, generator=torch.Generator().manual_seed(0))
    with tokenthin.applied(model, method, r=4):
        calls = []
        orig = state._Signals.head_mean
        monkeypatch.setattr(state._Signals, "head_mean", staticmethod(lambda k, h: calls.append(1) or orig(k, h)))
        eager = tiny.outputs(model, x)["last_hidden_state"]
        assert len(calls) == 2  # the two reduction points, at capture
        no_store = property(lambda self: {}, lambda self, v: None)  # every lookup misses: the mean is taken late
        monkeypatch.setattr(state.CallState, "k_mean", no_store, raising=False)
        lazy = tiny.outputs(model, x)["last_hidden_state"]
    assert len(calls) == 6  # taken at capture (and thrown away) and again at the reductions
    assert torch.equal(eager, lazy)
