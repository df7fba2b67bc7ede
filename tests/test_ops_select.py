"""Tests for the selectors (ops.select, diversity, coverage, grid): contracts, batching, loop references, cases."""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenthin.errors import BudgetError
from tokenthin.ops.coverage import coverage_greedy, greedy_max_coverage
from tokenthin.ops.diversity import k_center_greedy, max_min_diversity
from tokenthin.ops.grid import grid_pool_map, grid_shape_for_keep
from tokenthin.ops.select import random_subset, topk_by_score
from tokenthin.ops.similarity import normalize

SETTINGS = settings(
    max_examples=int(os.environ.get("SELECT_MAX_EXAMPLES", "50")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


# --------------------------------------------------------------------------- strategies


@st.composite
def problems(draw, max_b: int = 4, max_n: int = 64, max_d: int = 16, min_d: int = 1):
    """(x, candidates, k, seed): random features, some with exact duplicates or zero rows."""
    b = draw(st.integers(1, max_b))
    n = draw(st.integers(1, max_n))
    d = draw(st.integers(min_d, max_d))
    seed = draw(st.integers(0, 2**31 - 1))
    density = draw(st.sampled_from([0.1, 0.4, 0.8, 1.0]))
    kind = draw(st.sampled_from(["randn", "randn", "duplicates", "zeros"]))
    g = torch.Generator().manual_seed(seed)
    cand = torch.rand(b, n, generator=g) < density
    cand[torch.arange(b), torch.randint(0, n, (b,), generator=g)] = True  # >= 1 eligible per row
    x = torch.randn(b, n, d, generator=g)
    if kind == "duplicates":
        pool = torch.randn(b, max(1, n // 4), d, generator=g)
        pick = torch.randint(0, pool.shape[1], (b, n), generator=g)
        x = pool.gather(1, pick.unsqueeze(-1).expand(b, n, d)).contiguous()
    elif kind == "zeros":
        x[torch.rand(b, n, generator=g) < 0.2] = 0.0
    k = draw(st.integers(0, int(cand.sum(dim=1).min())))
    return x, cand, k, seed


def _random_first(cand: torch.Tensor, seed: int) -> torch.Tensor:
    """One random eligible index per row."""
    g = torch.Generator().manual_seed(seed + 1)
    keys = torch.rand(cand.shape, generator=g).masked_fill(~cand, -1.0)
    return keys.argmax(dim=1)


def _ref_inputs(x: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 2)
    m = int(torch.randint(1, 9, (1,), generator=g))
    ref = torch.randn(x.shape[0], m, x.shape[2], generator=g)
    valid = torch.rand(x.shape[0], m, generator=g) < 0.8
    return ref, valid


def _selectors(x: torch.Tensor, cand: torch.Tensor, seed: int) -> dict:
    """name -> callable(x, k, cand) running one selector with per-problem extras fixed."""
    g = torch.Generator().manual_seed(seed + 3)
    score = torch.randn(cand.shape, generator=g)
    first = _random_first(cand, seed)
    ref, valid = _ref_inputs(x, seed)
    return {
        "topk": lambda xx, k, c, sl=slice(None): topk_by_score(score[sl], k, c),
        "random": lambda xx, k, c, sl=slice(None): random_subset(c, k, torch.Generator().manual_seed(seed)),
        "max_min": lambda xx, k, c, sl=slice(None): max_min_diversity(xx, k, c),
        "k_center": lambda xx, k, c, sl=slice(None): k_center_greedy(xx, k, c),
        "k_center_first": lambda xx, k, c, sl=slice(None): k_center_greedy(xx, k, c, first=first[sl]),
        "coverage": lambda xx, k, c, sl=slice(None): coverage_greedy(xx, k, c),
        "coverage_ref": lambda xx, k, c, sl=slice(None): coverage_greedy(
            xx, k, c, ref=ref[sl], ref_valid=valid[sl], temperature=0.05
        ),
    }


# --------------------------------------------------------------------------- loop references
# Straightforward single-sample versions: Python loops over steps and over tokens.


def _eligible(cand_row: torch.Tensor) -> list[int]:
    return [j for j, ok in enumerate(cand_row.tolist()) if ok]


def _distances(x_row: torch.Tensor) -> list[list[float]]:
    xn = normalize(x_row)
    return (1.0 - xn @ xn.T).tolist()


def _argmax_first(items: list[int], score) -> int:
    best, best_score = None, None
    for j in items:
        s = score(j)
        if best is None or s > best_score:  # strict: the lowest index wins ties
            best, best_score = j, s
    return best


def _farthest_first_ref(dist: list[list[float]], elig: list[int], start: int, k: int) -> list[int]:
    chosen = [start]
    while len(chosen) < k:
        rest = [j for j in elig if j not in chosen]
        chosen.append(_argmax_first(rest, lambda j: min(dist[s][j] for s in chosen)))
    return sorted(chosen)


def ref_max_min(x_row: torch.Tensor, cand_row: torch.Tensor, k: int) -> list[int]:
    if k == 0:
        return []
    dist = _distances(x_row)
    elig = _eligible(cand_row)

    def isolation(j: int) -> float:
        others = [dist[i][j] for i in elig if i != j]
        return min(others) if others else math.inf

    return _farthest_first_ref(dist, elig, _argmax_first(elig, isolation), k)


def ref_k_center(x_row: torch.Tensor, cand_row: torch.Tensor, k: int, first: int | None = None) -> list[int]:
    if k == 0:
        return []
    dist = _distances(x_row)
    elig = _eligible(cand_row)
    if first is None:
        xn = normalize(x_row)
        mean = xn[elig].mean(dim=0)
        first = _argmax_first(elig, lambda i: float((xn[i] * mean).sum()))
    return _farthest_first_ref(dist, elig, first, k)


def ref_coverage(
    x_row: torch.Tensor,
    cand_row: torch.Tensor,
    k: int,
    ref_row: torch.Tensor | None = None,
    valid_row: torch.Tensor | None = None,
    temperature: float = 0.2,
) -> list[int]:
    if k == 0:
        return []
    elig = _eligible(cand_row)
    xn = normalize(x_row)
    if ref_row is None:
        rn, valid = xn, cand_row  # the eligible tokens cover themselves
    else:
        rn, valid = normalize(ref_row), valid_row
    logits = (rn @ xn.T) / temperature
    logits[:, ~cand_row] = -math.inf
    sim = torch.softmax(logits, dim=-1) / max(int(valid.sum()), 1)  # softmax over eligible tokens
    sim[~valid] = 0.0  # invalid references cover nothing
    columns = {i: sim[:, i].contiguous() for i in elig}
    covered = torch.zeros(sim.shape[0])
    chosen: list[int] = []
    while len(chosen) < k:
        rest = [i for i in elig if i not in chosen]
        best = _argmax_first(rest, lambda i, cov=covered: float((columns[i] - cov).clamp(min=0).sum()))
        chosen.append(best)
        covered = torch.maximum(covered, columns[best])
    return sorted(chosen)


# --------------------------------------------------------------------------- properties


@SETTINGS
@given(problems())
def test_every_selector_returns_k_unique_sorted_candidates(problem):
    x, cand, k, seed = problem
    for name, fn in _selectors(x, cand, seed).items():
        out = fn(x, k, cand)
        assert out.dtype == torch.long, name
        assert tuple(out.shape) == (x.shape[0], k), name
        if k > 1:
            assert bool((out[:, 1:] > out[:, :-1]).all()), f"{name}: not sorted/unique {out}"
        if k > 0:
            assert bool(cand.gather(1, out).all()), f"{name}: picked a non-candidate"


@SETTINGS
@given(problems())
def test_batched_equals_per_sample(problem):
    x, cand, k, seed = problem
    for name, fn in _selectors(x, cand, seed).items():
        if name == "random":
            continue  # one key stream per call; per-sample runs draw different keys
        full = fn(x, k, cand)
        for b in range(x.shape[0]):
            alone = fn(x[b : b + 1], k, cand[b : b + 1], slice(b, b + 1))
            assert torch.equal(alone[0], full[b]), f"{name}: sample {b}: {alone[0]} != {full[b]}"


@SETTINGS
@given(problems(max_b=3, max_n=40, max_d=8))
def test_greedy_selectors_match_loop_references(problem):
    # Exact equality, also for duplicates, zero rows and D == 1 (ties up to an ulp): the
    # references build the same float32 similarities and sum each token's gain as a 1-D sum,
    # which is the order the batched token-major reduction uses.
    x, cand, k, seed = problem
    first = _random_first(cand, seed)
    ref, valid = _ref_inputs(x, seed)
    got = {
        "max_min": max_min_diversity(x, k, cand),
        "k_center": k_center_greedy(x, k, cand),
        "k_center_first": k_center_greedy(x, k, cand, first=first),
        "coverage": coverage_greedy(x, k, cand),
        "coverage_ref": coverage_greedy(x, k, cand, ref=ref, ref_valid=valid, temperature=0.05),
    }
    for b in range(x.shape[0]):
        want = {
            "max_min": ref_max_min(x[b], cand[b], k),
            "k_center": ref_k_center(x[b], cand[b], k),
            "k_center_first": ref_k_center(x[b], cand[b], k, first=int(first[b])),
            "coverage": ref_coverage(x[b], cand[b], k),
            "coverage_ref": ref_coverage(x[b], cand[b], k, ref[b], valid[b], temperature=0.05),
        }
        for name, expected in want.items():
            assert got[name][b].tolist() == expected, f"{name}: sample {b}"


@SETTINGS
@given(problems(max_b=2, max_n=32, max_d=8), st.sampled_from([torch.float16, torch.bfloat16]))
def test_half_precision_inputs(problem, dtype):
    x, cand, k, seed = problem
    low = x.to(dtype)
    for name, fn in _selectors(x, cand, seed).items():
        if name in ("topk", "random"):
            continue
        # coverage_ref keeps its references in float32: mixed dtypes are fine
        assert torch.equal(fn(low, k, cand), fn(low.float(), k, cand)), name  # similarities run in float32
    score = torch.randn(cand.shape).to(dtype)
    assert torch.equal(topk_by_score(score, k, cand), topk_by_score(score.float(), k, cand))


@SETTINGS
@given(st.integers(1, 40), st.integers(1, 40), st.data())
def test_grid_pool_map_partitions_the_grid(h, w, data):
    out_h = data.draw(st.integers(1, h))
    out_w = data.draw(st.integers(1, w))
    cell = grid_pool_map(h, w, out_h, out_w)
    assert cell.dtype == torch.long and tuple(cell.shape) == (h * w,)
    counts = torch.bincount(cell, minlength=out_h * out_w)
    assert counts.numel() == out_h * out_w and bool((counts > 0).all())
    grid = cell.view(h, w)
    rows, cols = grid // out_w, grid % out_w
    assert bool((rows[1:] >= rows[:-1]).all()) and bool((cols[:, 1:] >= cols[:, :-1]).all())  # contiguous bins
    r = torch.arange(h).unsqueeze(1).expand(h, w)
    c = torch.arange(w).unsqueeze(0).expand(h, w)
    assert torch.equal(rows, r * out_h // h) and torch.equal(cols, c * out_w // w)


@SETTINGS
@given(st.integers(1, 6), st.integers(1, 6), st.integers(1, 6), st.integers(1, 6))
def test_grid_pool_map_matches_adaptive_avg_pool_when_divisible(out_h, out_w, fh, fw):
    h, w = out_h * fh, out_w * fw
    v = torch.randn(h, w, dtype=torch.float64)
    cell = grid_pool_map(h, w, out_h, out_w)
    sums = torch.zeros(out_h * out_w, dtype=torch.float64).index_add_(0, cell, v.flatten())
    means = sums / torch.bincount(cell).to(torch.float64)
    pooled = F.adaptive_avg_pool2d(v[None, None], (out_h, out_w)).flatten()
    assert torch.allclose(means, pooled)


@SETTINGS
@given(st.integers(1, 64), st.integers(1, 64), st.integers(1, 5000))
def test_grid_shape_for_keep_fits(h, w, k):
    out_h, out_w = grid_shape_for_keep(h, w, k)
    assert 1 <= out_h <= h and 1 <= out_w <= w
    assert out_h * out_w <= k
    if k >= h * w:
        assert (out_h, out_w) == (h, w)
    assert out_h * out_w * 2 >= min(k, h * w)  # never throws away more than half the budget
    grid_pool_map(h, w, out_h, out_w)  # always a valid pooling grid


# --------------------------------------------------------------------------- explicit cases


ALL_NAMES = ["topk", "random", "max_min", "k_center", "k_center_first", "coverage", "coverage_ref"]


def _small_problem():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 10, 4, generator=g)
    cand = torch.ones(3, 10, dtype=torch.bool)
    cand[0, :4] = False  # sample 0 has 6 eligible tokens
    cand[:, 0] = False  # protected CLS
    return x, cand


@pytest.mark.parametrize("name", ALL_NAMES)
def test_k_zero_gives_empty(name):
    x, cand = _small_problem()
    out = _selectors(x, cand, 0)[name](x, 0, cand)
    assert out.dtype == torch.long and tuple(out.shape) == (3, 0)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_k_too_large_or_negative_raises_budget_error(name):
    x, cand = _small_problem()
    fn = _selectors(x, cand, 0)[name]
    with pytest.raises(BudgetError, match=r"lower k to at most 6"):
        fn(x, 7, cand)
    with pytest.raises(BudgetError, match=r"k >= 0"):
        fn(x, -1, cand)
    assert tuple(fn(x, 6, cand).shape) == (3, 6)  # the largest allowed k works


def test_non_int_k_raises_budget_error():
    _, cand = _small_problem()
    with pytest.raises(BudgetError):
        random_subset(cand, 2.0)
    with pytest.raises(BudgetError):
        random_subset(cand, True)


def test_bad_shapes_raise():
    x, cand = _small_problem()
    with pytest.raises(ValueError, match="candidates"):
        max_min_diversity(x, 2, cand.int())
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        max_min_diversity(x[:, :5], 2, cand)
    with pytest.raises(ValueError, match="score"):
        topk_by_score(torch.zeros(3, 9), 2, cand)
    with pytest.raises(ValueError, match="ref"):
        coverage_greedy(x, 2, cand, ref=torch.zeros(3, 2, 5))
    with pytest.raises(ValueError, match="temperature"):
        coverage_greedy(x, 2, cand, temperature=0.0)


def _clusters(noise: float = 0.01):
    """Three tight clusters of 8 points around orthogonal directions, interleaved in index order."""
    g = torch.Generator().manual_seed(1)
    centers = torch.eye(3, 16) * 5.0
    labels = torch.arange(24) % 3
    x = centers[labels] + noise * torch.randn(24, 16, generator=g)
    return x.unsqueeze(0), labels


@pytest.mark.parametrize("fn", [max_min_diversity, k_center_greedy, coverage_greedy])
def test_diverse_selectors_pick_one_point_per_cluster(fn):
    x, labels = _clusters()
    cand = torch.ones(1, 24, dtype=torch.bool)
    out = fn(x, 3, cand)[0]
    assert sorted(labels[out].tolist()) == [0, 1, 2]
    # with a budget of 6, still every cluster is represented
    out6 = fn(x, 6, cand)[0]
    assert set(labels[out6].tolist()) == {0, 1, 2}


def test_topk_picks_a_single_cluster_for_contrast():
    _, labels = _clusters()
    score = torch.zeros(1, 24)
    score[0, labels == 1] = 1.0  # scores only favour cluster 1
    out = topk_by_score(score, 3, torch.ones(1, 24, dtype=torch.bool))[0]
    assert labels[out].tolist() == [1, 1, 1]


def test_max_min_starts_from_the_outlier_and_k_center_from_the_centre():
    x, _ = _clusters(noise=0.05)
    outlier = torch.zeros(1, 1, 16)
    outlier[0, 0, 10] = 5.0
    x = torch.cat([x, outlier], dim=1)  # index 24: alone in its own direction
    cand = torch.ones(1, 25, dtype=torch.bool)
    assert max_min_diversity(x, 1, cand).tolist() == [[24]]
    assert k_center_greedy(x, 1, cand).tolist() != [[24]]
    # centre: a point nearest the mean direction of all tokens
    xn = normalize(x[0])
    assert k_center_greedy(x, 1, cand)[0, 0] == int((xn @ xn.mean(0)).argmax())


def test_max_min_matches_divprune_reference_semantics():
    """Same picks as DivPrune's reference logic (no mask; second-smallest column entry first)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 30, 8, generator=g)
    dist = 1.0 - normalize(x[0]) @ normalize(x[0]).T
    k = 7
    picks = [int(torch.topk(dist, 2, dim=0, largest=False).values[1].argmax())]
    while len(picks) < k:
        picks.append(int(dist[picks].min(dim=0).values.argmax()))
    assert max_min_diversity(x, k, torch.ones(1, 30, dtype=torch.bool))[0].tolist() == sorted(picks)


def test_max_min_single_eligible_token():
    x = torch.randn(2, 5, 3)
    cand = torch.zeros(2, 5, dtype=torch.bool)
    cand[0, 3] = True
    cand[1, 1] = True
    assert max_min_diversity(x, 1, cand).tolist() == [[3], [1]]


def test_duplicates_never_repeat():
    x = torch.ones(2, 12, 4)  # all tokens identical: every distance is ~0, every gain ties
    cand = torch.ones(2, 12, dtype=torch.bool)
    for fn in (max_min_diversity, k_center_greedy, coverage_greedy):
        out = fn(x, 12, cand)
        assert out.tolist() == [list(range(12))] * 2


def test_k_center_first_must_be_eligible():
    x, cand = _small_problem()
    with pytest.raises(ValueError, match="not a candidate"):
        k_center_greedy(x, 2, cand, first=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match="outside"):
        k_center_greedy(x, 2, cand, first=torch.tensor([5, 10, 1]))
    with pytest.raises(ValueError, match=r"\(3,\)"):
        k_center_greedy(x, 2, cand, first=torch.tensor([5, 1]))
    out = k_center_greedy(x, 1, cand, first=torch.tensor([5, 2, 9]))
    assert out.tolist() == [[5], [2], [9]]


def test_topk_ties_nan_and_minus_inf():
    cand = torch.tensor([[False, True, True, True, False, True]])
    assert topk_by_score(torch.zeros(1, 6), 2, cand).tolist() == [[1, 2]]  # ties: lowest index
    score = torch.tensor([[9.0, -math.inf, float("nan"), 1.0, 9.0, -math.inf]])
    assert topk_by_score(score, 1, cand).tolist() == [[3]]
    assert topk_by_score(score, 4, cand).tolist() == [[1, 2, 3, 5]]  # never the 9.0 non-candidates
    ints = torch.tensor([[5, 3, 3, 7, 100, 3]])
    assert topk_by_score(ints, 2, cand).tolist() == [[1, 3]]


def test_random_subset_is_seeded_and_uniform():
    cand = torch.zeros(4000, 10, dtype=torch.bool)
    cand[:, [0, 2, 3, 5, 8, 9]] = True
    a = random_subset(cand, 2, torch.Generator().manual_seed(7))
    b = random_subset(cand, 2, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    counts = torch.bincount(a.flatten(), minlength=10)
    assert counts[[1, 4, 6, 7]].sum() == 0
    expected = 4000 * 2 / 6
    assert bool(((counts[[0, 2, 3, 5, 8, 9]].float() - expected).abs() < 150).all()), counts
    pairs = torch.bincount(a[:, 0] * 10 + a[:, 1], minlength=100)
    assert int((pairs > 0).sum()) == 15  # every one of the C(6, 2) pairs shows up


def test_coverage_without_valid_refs_keeps_lowest_indices():
    x, cand = _small_problem()
    ref = torch.randn(3, 4, 4)
    valid = torch.ones(3, 4, dtype=torch.bool)
    valid[1] = False
    out = coverage_greedy(x, 3, cand, ref=ref, ref_valid=valid)
    assert out[1].tolist() == [1, 2, 3]


def test_greedy_max_coverage_on_a_hand_made_matrix():
    # token 2 covers references 0 and 1, token 0 covers 0, token 1 covers 2, token 3 nothing
    cover = torch.tensor([[[0.9, 0.0, 1.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.5, 0.0, 0.1]]])
    cand = torch.ones(1, 4, dtype=torch.bool)
    assert greedy_max_coverage(cover, 1, cand).tolist() == [[2]]
    assert greedy_max_coverage(cover, 2, cand).tolist() == [[1, 2]]
    cand[0, 2] = False
    assert greedy_max_coverage(cover, 2, cand).tolist() == [[0, 1]]


def test_grid_examples_and_errors():
    assert grid_shape_for_keep(24, 24, 64) == (8, 8)
    assert grid_shape_for_keep(24, 24, 57) == (7, 8)  # 10 % of 576; 8x7 ties, the smaller out_h wins
    assert grid_shape_for_keep(24, 24, 1000) == (24, 24)
    assert grid_shape_for_keep(100, 2, 150) == (75, 2)
    assert grid_shape_for_keep(1, 100, 10) == (1, 10)
    with pytest.raises(BudgetError, match="k >= 1"):
        grid_shape_for_keep(24, 24, 0)
    with pytest.raises(BudgetError):
        grid_pool_map(4, 4, 5, 2)
    with pytest.raises(ValueError):
        grid_pool_map(0, 4, 1, 1)
    assert grid_pool_map(3, 3, 1, 1).tolist() == [0] * 9
    assert grid_pool_map(3, 2, 2, 2).tolist() == [0, 1, 0, 1, 2, 3]  # rows 0,1 -> 0; row 2 -> 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_selections():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 50, 16, generator=g)
    cand = torch.rand(2, 50, generator=g) < 0.7
    for fn in (max_min_diversity, k_center_greedy, coverage_greedy):
        got = fn(x.cuda().half(), 8, cand.cuda())
        assert got.device.type == "cuda"
        assert torch.equal(got.cpu(), fn(x.half(), 8, cand))
    gen = torch.Generator().manual_seed(0)
    assert torch.equal(
        random_subset(cand.cuda(), 5, gen).cpu(), random_subset(cand, 5, torch.Generator().manual_seed(0))
    )
