"""Batched token selection: pick ``k`` token indices per sample.

Every selector takes ``candidates``, a ``(B, N)`` bool tensor (True = the token may be
chosen; False for protected tokens such as CLS and for padding), and an int ``k`` shared by
the whole batch. It returns a ``(B, k)`` LongTensor of token indices that are sorted
ascending, unique and all eligible. ``k == 0`` gives shape ``(B, 0)``; ``k < 0`` or ``k``
larger than the smallest per-sample eligible count raises :class:`BudgetError`.

Conventions shared by the greedy selectors:

* Features may have any float dtype and live on any device; similarities are computed in
  float32 on the features' device.
* The pairwise similarity matrix is built sample by sample: one GEMM per sample on
  64-byte-aligned contiguous operands (a slice of the batch is copied only when it is not
  aligned), not one batched GEMM. BLAS may add up the dot products in a different order for
  a batched call or for operands at another memory alignment, so two duplicate tokens could
  tie when a sample runs alone and not inside a batch. Built this way a sample's selection
  is bitwise independent of the rest of the batch (checked by the tests).
* Every selection step is one batched tensor op over ``(B, N)``; the only Python loop runs
  over the ``k`` steps.
* Ties are broken by the lowest token index (``torch.argmax`` returns the first maximum).
* Memory is ``O(B * N * N)`` float32 for the diversity selectors and ``O(B * M * N)`` for
  the coverage selector (about 33 MB per sample at N = M = 2880).
"""

from __future__ import annotations

import math
import operator
from fractions import Fraction

import torch

from tokenthin.errors import BudgetError
from tokenthin.ops.similarity import normalize

__all__ = [
    "coverage_greedy",
    "greedy_max_coverage",
    "grid_pool_map",
    "grid_shape_for_keep",
    "k_center_greedy",
    "max_min_diversity",
    "random_subset",
    "topk_by_score",
]

# MMTok's default softmax temperatures (MMTokCore): vision-vision 0.2, text-vision 0.02.
MMTOK_VISION_TEMPERATURE = 0.2
MMTOK_TEXT_TEMPERATURE = 0.02


# --------------------------------------------------------------------------- checks


def _check_candidates(candidates: torch.Tensor) -> None:
    if not isinstance(candidates, torch.Tensor) or candidates.dtype != torch.bool or candidates.dim() != 2:
        got = (
            f"{tuple(candidates.shape)} {candidates.dtype}"
            if isinstance(candidates, torch.Tensor)
            else type(candidates).__name__
        )
        raise ValueError(
            f"candidates must be a (B, N) bool tensor, got {got}; pass e.g. `mask.bool()` with one row per sample."
        )


def _check_k(candidates: torch.Tensor, k: int) -> int:
    """Validate ``k`` against the eligible counts; return it as a Python int."""
    _check_candidates(candidates)
    if isinstance(k, bool):
        raise BudgetError(f"k must be an int, got {k!r}; pass the number of tokens to keep as an int.")
    try:
        k = operator.index(k)
    except TypeError:
        raise BudgetError(
            f"k must be an int, got {type(k).__name__}; pass the number of tokens to keep as an int."
        ) from None
    if k < 0:
        raise BudgetError(f"k={k} is negative; pass a keep count k >= 0.")
    if k == 0 or candidates.shape[0] == 0:
        return k
    counts = candidates.sum(dim=1)
    smallest = int(counts.min())
    if k > smallest:
        worst = int(counts.argmin())
        raise BudgetError(
            f"k={k} exceeds the eligible token count of sample {worst} ({smallest} of "
            f"{candidates.shape[1]}); lower k to at most {smallest}, or mark more tokens as candidates."
        )
    return k


def _check_features(x: torch.Tensor, candidates: torch.Tensor, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 3 or tuple(x.shape[:2]) != tuple(candidates.shape):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(
            f"{name} must be a (B, N, D) tensor matching candidates {tuple(candidates.shape)}, got {got}; "
            f"pass one feature row per token."
        )
    if x.device != candidates.device:
        raise ValueError(
            f"{name} is on {x.device} but candidates on {candidates.device}; move both to the same device."
        )


def _empty(candidates: torch.Tensor, k: int = 0) -> torch.Tensor:
    return torch.empty(candidates.shape[0], k, dtype=torch.long, device=candidates.device)


def per_sample_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b^T`` for (B, M, D) x (B, N, D) -> (B, M, N), one GEMM per sample.

    One GEMM per sample (instead of one batched GEMM), on 64-byte-aligned operands, keeps
    every sample's result bitwise identical to running that sample alone: BLAS libraries may
    sum in a different order for a batched call, and (MKL) for operands at a different memory
    alignment, which a slice of a batch can be. See the module docstring.
    """
    if a.shape[0] == 1:
        return torch.mm(_aligned(a[0]), _aligned(b[0]).transpose(0, 1)).unsqueeze(0)
    out = torch.empty(a.shape[0], a.shape[1], b.shape[1], dtype=torch.float32, device=a.device)
    for i in range(a.shape[0]):  # loop over samples, not tokens
        out[i].copy_(torch.mm(_aligned(a[i]), _aligned(b[i]).transpose(0, 1)))
    return out


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` if it is contiguous and 64-byte aligned (as a fresh allocation is), else a copy."""
    if t.is_contiguous() and t.data_ptr() % 64 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _cosine_distance(x: torch.Tensor) -> torch.Tensor:
    """(B, N, D) -> (B, N, N) float32 cosine distance ``1 - cos``; entry [i, j] = d(i, j)."""
    xn = normalize(x)
    return per_sample_matmul(xn, xn).neg_().add_(1.0)  # == 1 - cos, bit for bit, in place


def _ascending(idx: torch.Tensor) -> torch.Tensor:
    return idx.sort(dim=1).values


# --------------------------------------------------------------------------- simple


def _top_k_keys(key: torch.Tensor, k: int, candidates: torch.Tensor) -> torch.Tensor:
    """Indices of the k largest keys among candidates (lowest index first on ties)."""
    # Two stable sorts: by key descending, then by eligibility. Eligible tokens therefore
    # always rank above non-eligible ones (even at -inf), and equal keys keep index order.
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    eligible = candidates.gather(1, order).to(torch.int8)
    order = order.gather(1, torch.sort(eligible, dim=1, descending=True, stable=True).indices)
    return _ascending(order[:, :k])


def topk_by_score(score: torch.Tensor, k: int, candidates: torch.Tensor) -> torch.Tensor:
    """The ``k`` eligible tokens with the highest ``score`` (B, N), sorted by index.

    Ties go to the lowest index. NaN scores rank as -inf; an eligible token always ranks
    above a non-eligible one.
    """
    k = _check_k(candidates, k)
    if not isinstance(score, torch.Tensor) or tuple(score.shape) != tuple(candidates.shape):
        got = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
        raise ValueError(
            f"score must be a (B, N) tensor matching candidates {tuple(candidates.shape)}, got {got}; "
            "pass one score per token."
        )
    if k == 0:
        return _empty(candidates)
    score = score.to(candidates.device)
    if not score.is_floating_point():
        score = score.to(torch.float64)
    elif score.dtype != torch.float64:
        score = score.float()  # exact for half and bfloat16
    score = score.masked_fill(torch.isnan(score), -math.inf)
    return _top_k_keys(score, k, candidates)


def random_subset(candidates: torch.Tensor, k: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``k`` eligible tokens per sample, uniformly at random without replacement.

    Each sample draws independent uniform keys and keeps the ``k`` largest among its
    eligible tokens, which is a uniform random k-subset. The keys are drawn on the
    generator's device (``candidates``' device when ``generator`` is None), so a seeded CPU
    generator gives the same subsets for CPU and CUDA inputs.
    """
    k = _check_k(candidates, k)
    if k == 0:
        return _empty(candidates)
    device = generator.device if generator is not None else candidates.device
    keys = torch.rand(candidates.shape, generator=generator, device=device, dtype=torch.float64)
    return _top_k_keys(keys.to(candidates.device), k, candidates)


# --------------------------------------------------------------------------- diversity


def _farthest_first(dist: torch.Tensor, avail: torch.Tensor, first: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy farthest-first traversal shared by DivPrune and k-center.

    ``dist[b, s, j]`` is the distance from selected token ``s`` to token ``j``. Starting from
    ``first`` (B,), each step keeps, per token, its distance to the nearest selected token
    and adds the available token that maximises it.
    """
    B, N = avail.shape
    rows = torch.arange(B, device=avail.device)
    avail = avail.clone()
    out = torch.empty(B, k, dtype=torch.long, device=avail.device)
    nearest = torch.full((B, N), math.inf, dtype=dist.dtype, device=dist.device)
    cur = first
    for t in range(k):
        out[:, t] = cur
        avail[rows, cur] = False
        if t + 1 == k:
            break
        nearest = torch.minimum(nearest, dist[rows, cur])  # (B, N): row of the newest pick
        cur = nearest.masked_fill(~avail, -math.inf).argmax(dim=1)
    return _ascending(out)


def max_min_diversity(x: torch.Tensor, k: int, candidates: torch.Tensor) -> torch.Tensor:
    """DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175): greedy Max-Min Diversity.

    Distance: cosine distance ``d(i, j) = 1 - cos(x_i, x_j)`` (float32).

    Initial element (as in the official code): the token whose nearest *other* token is
    farthest away, ``argmax_j min_{i != j} d(i, j)``, i.e. the most isolated token. The
    official code takes the second smallest entry of each distance column (the smallest
    being the token's ~0 distance to itself); here the self-distance is excluded explicitly,
    which is the same thing unless rounding puts another token below the self-distance.

    Update rule (as in the paper's greedy MMDP solution and the code): repeatedly add the
    token maximising its minimum distance to the tokens selected so far,
    ``argmax_j min_{s in S} d(s, j)``.

    Choices where the paper/code leave it open:

    * Only eligible tokens take part: non-candidates neither get selected nor count as
      nearest neighbours in the initial step (the code has no mask at all).
    * Selected tokens are masked out of later steps, so the result is always ``k`` unique
      tokens (the code relies on the ~0 self-distance and can repeat a token when the
      remaining ones are exact duplicates of selected ones).
    * A sample with a single eligible token starts from it (its nearest-neighbour distance
      is +inf).
    * Ties go to the lowest index.

    Apart from the initial element this is exactly :func:`k_center_greedy`.
    """
    k = _check_k(candidates, k)
    _check_features(x, candidates)
    if k == 0:
        return _empty(candidates)
    dist = _cosine_distance(x)
    # Nearest eligible other token of every token j: min over rows i (eligible, i != j).
    # Done in place: the traversal only reads rows of selected (eligible) tokens, and a
    # token's own diagonal entry only matters once it is selected, when it is masked anyway.
    dist.masked_fill_(~candidates.unsqueeze(-1), math.inf)
    dist.diagonal(dim1=1, dim2=2).fill_(math.inf)
    isolation = dist.amin(dim=1)
    first = isolation.masked_fill(~candidates, -math.inf).argmax(dim=1)
    return _farthest_first(dist, candidates, first, k)


def k_center_greedy(
    x: torch.Tensor, k: int, candidates: torch.Tensor, first: torch.Tensor | None = None
) -> torch.Tensor:
    """Greedy k-center (Gonzalez farthest-first traversal) on cosine distance ``1 - cos``.

    This is the token-selection stage of ToDRE v1 (arXiv 2505.18757v1, "a greedy k-center
    algorithm to select and retain a small subset of diverse visual tokens after the vision
    encoder"); ToDRE v2 replaced it with greedy max-sum diversification. Which token ToDRE
    seeds the traversal with is not fixed here: pass it as ``first``.

    Start: ``first`` (B,) if given (it must be eligible; e.g. the argmax of a CLS-attention
    score seeds from the most important token). When ``first`` is None the
    start is the eligible token nearest the mean of the eligible tokens: the mean ``m`` of
    the L2-normalised eligible features, and the token maximising ``cos(x_i, m)`` - the most
    central token.

    Update: repeatedly add the eligible, not yet selected token farthest from its nearest
    selected token, ``argmax_j min_{s in S} d(s, j)``. Ties go to the lowest index.

    Difference from :func:`max_min_diversity` (DivPrune): the update rule is the same; only
    the first token differs. DivPrune starts from the most isolated token (an outlier: the
    one whose nearest neighbour is farthest), this starts from the most central token (or
    the caller's seed), so the first pick covers the bulk of the tokens and the following
    picks spread out from it.
    """
    k = _check_k(candidates, k)
    _check_features(x, candidates)
    if k == 0:
        return _empty(candidates)
    B = candidates.shape[0]
    if first is None:
        xn = normalize(x)
        weight = candidates.unsqueeze(-1).to(xn.dtype)
        mean = (xn * weight).sum(dim=1) / weight.sum(dim=1).clamp_min(1.0)  # (B, D)
        centrality = (xn * mean.unsqueeze(1)).sum(dim=-1)  # (B, N), proportional to cos(x_i, mean)
        first = centrality.masked_fill(~candidates, -math.inf).argmax(dim=1)
    else:
        if not isinstance(first, torch.Tensor) or tuple(first.shape) != (B,) or first.is_floating_point():
            got = tuple(first.shape) if isinstance(first, torch.Tensor) else type(first).__name__
            raise ValueError(f"first must be a ({B},) integer tensor, got {got}; pass one start index per sample.")
        first = first.to(device=candidates.device, dtype=torch.long)
        n = candidates.shape[1]
        if bool(((first < 0) | (first >= n)).any()):
            raise ValueError(f"first has indices outside [0, {n}); pass start indices of eligible tokens.")
        if not bool(candidates.gather(1, first.unsqueeze(1)).all()):
            raise ValueError("first names a token that is not a candidate; pass start indices of eligible tokens.")
    return _farthest_first(_cosine_distance(x), candidates, first, k)


# --------------------------------------------------------------------------- coverage


def _greedy_coverage_token_major(cover_t: torch.Tensor, k: int, candidates: torch.Tensor) -> torch.Tensor:
    """Greedy coverage on ``cover_t`` laid out (B, N, M): token-major, references contiguous.

    With the references innermost, every token's gain is a contiguous row sum, added up in
    exactly the order of a 1-D sum over that token's M values.
    """
    B, _, M = cover_t.shape
    rows = torch.arange(B, device=candidates.device)
    avail = candidates.clone()
    covered = torch.zeros(B, 1, M, dtype=cover_t.dtype, device=cover_t.device)
    buf = torch.empty_like(cover_t)
    out = torch.empty(B, k, dtype=torch.long, device=candidates.device)
    for t in range(k):
        torch.sub(cover_t, covered, out=buf)
        gain = buf.clamp_(min=0).sum(dim=-1)  # (B, N): marginal gain of every token at once
        pick = gain.masked_fill_(~avail, -math.inf).argmax(dim=1)
        out[:, t] = pick
        avail[rows, pick] = False
        covered = torch.maximum(covered, cover_t[rows, pick].unsqueeze(1))  # (B, 1, M)
    return _ascending(out)


def greedy_max_coverage(cover: torch.Tensor, k: int, candidates: torch.Tensor) -> torch.Tensor:
    """Greedy maximisation of ``f(S) = sum_j max(0, max_{i in S} cover[b, j, i])``.

    ``cover`` is a (B, M, N) float tensor: how well candidate token ``i`` covers reference
    ``j``. Coverage starts at 0; each step computes every candidate's gain
    ``sum_j max(0, cover[j, i] - cov[j])`` as one batched op, adds the eligible, not yet
    selected token with the largest gain (ties: lowest index) and raises ``cov`` to
    ``max(cov, cover[:, i])``. This is MMTok's greedy step; use it directly to build MMTok's
    multimodal objective by concatenating weighted coverage blocks along M, e.g.
    ``torch.cat([text_block, alpha * vision_block], dim=1)``.

    Internally the matrix is copied to a token-major (B, N, M) float32 layout, so each
    token's gain is summed in the order of a plain 1-D sum over its column.
    """
    k = _check_k(candidates, k)
    B, N = candidates.shape
    if not isinstance(cover, torch.Tensor) or cover.dim() != 3 or cover.shape[0] != B or cover.shape[2] != N:
        got = tuple(cover.shape) if isinstance(cover, torch.Tensor) else type(cover).__name__
        raise ValueError(
            f"cover must be a (B, M, N) tensor with B={B}, N={N}, got {got}; rows are references, columns tokens."
        )
    if k == 0:
        return _empty(candidates)
    cover_t = cover.to(device=candidates.device, dtype=torch.float32).transpose(1, 2).contiguous()
    return _greedy_coverage_token_major(cover_t, k, candidates)


def coverage_greedy(
    x: torch.Tensor,
    k: int,
    candidates: torch.Tensor,
    ref: torch.Tensor | None = None,
    ref_valid: torch.Tensor | None = None,
    temperature: float | None = None,
) -> torch.Tensor:
    """MMTok (Dong et al., arXiv 2508.18264): greedy coverage (facility-location) maximisation.

    Objective ``f(S) = sum_j max_{i in S} sim(j, i)`` over the reference tokens ``j``, with
    coverage 0 for the empty set. ``ref`` None is MMTok's vision-only term: the references
    are the eligible tokens themselves. With ``ref`` (B, M, D) (e.g. text-token embeddings
    in the same space), ``ref_valid`` (B, M) marks the real reference rows.

    ``sim`` as in MMTok's official code: cosine similarity, scaled by ``1/temperature`` and
    softmax-normalised over the candidate tokens for each reference (each reference spreads
    one unit of mass over the tokens), then divided by the number of references::

        sim(j, i) = softmax_i(cos(ref_j, x_i) / temperature) / M

    Greedy gain (also as in the code): ``gain(i) = sum_j max(0, sim(j, i) - cov(j))`` with
    ``cov(j)`` the best similarity among the tokens selected so far; the argmax is added.
    See :func:`greedy_max_coverage` (each step is one batched op over a (B, N, M) tensor).

    Choices:

    * ``temperature`` None uses MMTok's defaults: 0.2 (its vision-vision temperature) when
      ``ref`` is None and 0.02 (its text-vision temperature) when ``ref`` is given.
    * The softmax runs over the eligible tokens only (non-candidates get no mass; MMTok
      softmaxes over all vision tokens and only excludes padding at selection time).
    * ``M`` is the per-sample count of valid references; invalid rows cover nothing. A
      sample without valid references has all gains 0 and keeps its lowest-index eligible
      tokens.
    * MMTok's multimodal objective adds ``alpha`` times the vision term to the text term;
      this function covers one reference set. Build the sum with
      :func:`greedy_max_coverage` on concatenated coverage blocks.
    """
    k = _check_k(candidates, k)
    _check_features(x, candidates)
    if temperature is None:
        temperature = MMTOK_VISION_TEMPERATURE if ref is None else MMTOK_TEXT_TEMPERATURE
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}; pass e.g. 0.2.")
    B = candidates.shape[0]
    if ref is None:
        if ref_valid is not None:
            raise ValueError("ref_valid was given without ref; pass ref as well, or drop ref_valid.")
        ref_valid = candidates
    else:
        if not isinstance(ref, torch.Tensor) or ref.dim() != 3 or ref.shape[0] != B or ref.shape[2] != x.shape[2]:
            got = tuple(ref.shape) if isinstance(ref, torch.Tensor) else type(ref).__name__
            raise ValueError(
                f"ref must be a (B, M, D) tensor with B={B}, D={x.shape[2]}, got {got}; "
                "pass reference embeddings in the same space as x."
            )
        if ref.device != candidates.device:
            raise ValueError(
                f"ref is on {ref.device} but candidates on {candidates.device}; move both to the same device."
            )
        if ref_valid is None:
            ref_valid = torch.ones(ref.shape[:2], dtype=torch.bool, device=candidates.device)
        elif (
            not isinstance(ref_valid, torch.Tensor)
            or ref_valid.dtype != torch.bool
            or tuple(ref_valid.shape) != tuple(ref.shape[:2])
        ):
            raise ValueError(
                f"ref_valid must be a {tuple(ref.shape[:2])} bool tensor; pass True for every real reference row."
            )
    if k == 0:
        return _empty(candidates)
    ref_valid = ref_valid.to(candidates.device)
    xn = normalize(x)
    rn = xn if ref is None else normalize(ref)
    logits = per_sample_matmul(rn, xn).div_(temperature)  # (B, M, N)
    logits.masked_fill_(~candidates.unsqueeze(1), -math.inf)
    cover = torch.softmax(logits, dim=-1)  # each reference spreads one unit over the eligible tokens
    del logits
    n_ref = ref_valid.sum(dim=1).clamp_min(1).to(torch.float32)  # (B,)
    cover.div_(n_ref.view(B, 1, 1)).masked_fill_(~ref_valid.unsqueeze(-1), 0.0)
    cover_t = cover.transpose(1, 2).contiguous()  # (B, N, M)
    del cover
    return _greedy_coverage_token_major(cover_t, k, candidates)


# --------------------------------------------------------------------------- budgets over groups


def rank_in_groups(score: torch.Tensor, group: torch.Tensor, num_groups: int) -> torch.Tensor:
    """(B, N) rank of every token inside its group (0 = highest score; ties to the lower index)."""
    b, n = score.shape
    order = torch.sort(score, dim=1, descending=True, stable=True).indices
    order = order.gather(1, torch.sort(group.gather(1, order), dim=1, stable=True).indices)
    g_sorted = group.gather(1, order)
    sizes = torch.zeros(b, num_groups, dtype=torch.long, device=score.device)
    sizes.scatter_add_(1, group, torch.ones_like(group))
    start = (sizes.cumsum(1) - sizes).gather(1, g_sorted)
    pos = torch.arange(n, device=score.device).expand(b, n)
    return torch.empty_like(order).scatter_(1, order, pos - start)


def apportion(weight: torch.Tensor, cap: torch.Tensor, k: int) -> torch.Tensor:
    """(B, P) integer budgets summing to ``k``: proportional to ``weight`` (>= 0), at most ``cap`` each.

    Partitions whose share reaches their capacity are filled and the remaining budget is shared among the others
    (repeated until no share overflows; where the others' weights are all zero, by their sizes); the shares are then
    floored and the leftover tokens go, one each, to the partitions with the largest fractional parts (ties to the
    lower partition index). ``sum(cap) >= k`` per sample.
    """
    weight = weight.double()
    cap_f = cap.double()
    share = torch.zeros_like(weight)
    active = torch.ones_like(weight, dtype=torch.bool)
    left = torch.full_like(weight[:, 0], float(k))
    for _ in range(weight.shape[1]):
        w = weight * active
        w = torch.where(w.sum(1, keepdim=True) > 0, w, cap_f * active)  # no signal left: share by size
        q = left.unsqueeze(1) * w / w.sum(1, keepdim=True).clamp_min(1e-300)
        over = active & (q >= cap_f)
        if not bool(over.any()):
            share = torch.where(active, q, share)
            break
        share = torch.where(over, cap_f, share)
        left = left - (cap_f * over).sum(1)
        active = active & ~over
    base = share.floor().long().minimum(cap)
    rest = k - base.sum(1, keepdim=True)  # (B, 1)
    frac = (share - base).masked_fill(base >= cap, -1.0)
    order = torch.sort(frac, dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order).scatter_(
        1, order, torch.arange(order.shape[1], device=order.device).expand_as(order)
    )
    return base + (rank < rest).long()


# --------------------------------------------------------------------------- grids


def _check_positive_int(name: str, value: int) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{name} must be an int >= 1, got {value!r}; pass the grid size in patches.")
    try:
        value = operator.index(value)
    except TypeError:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}; pass the grid size in patches.") from None
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}; pass the grid size in patches.")
    return value


def grid_pool_map(h: int, w: int, out_h: int, out_w: int, device=None) -> torch.Tensor:
    """Cell of an ``out_h x out_w`` grid for every raster-order patch of an ``h x w`` grid.

    Patch ``(r, c)`` (flat index ``r * w + c``) goes to cell
    ``floor(r * out_h / h) * out_w + floor(c * out_w / w)``. The bins do not overlap and are
    contiguous; when ``out_h`` divides ``h`` (and ``out_w`` divides ``w``) they are exactly
    the bins of adaptive average pooling. Every out cell gets at least one patch because
    ``out_h <= h`` and ``out_w <= w`` (required). Returns a ``(h * w,)`` LongTensor.
    """
    h, w = _check_positive_int("h", h), _check_positive_int("w", w)
    out_h, out_w = _check_positive_int("out_h", out_h), _check_positive_int("out_w", out_w)
    if out_h > h or out_w > w:
        raise BudgetError(
            f"out grid {out_h}x{out_w} is larger than the {h}x{w} patch grid; pick out_h <= {h} and "
            f"out_w <= {w} (grid_shape_for_keep does)."
        )
    r = torch.arange(h, device=device).mul_(out_h).div_(h, rounding_mode="floor")
    c = torch.arange(w, device=device).mul_(out_w).div_(w, rounding_mode="floor")
    return (r.unsqueeze(1) * out_w + c.unsqueeze(0)).reshape(-1)


def grid_shape_for_keep(h: int, w: int, k: int) -> tuple[int, int]:
    """Out grid ``(out_h, out_w)`` for keeping about ``k`` of the ``h x w`` patches.

    Rule: the real-valued grid that keeps the aspect ratio exactly with ``k`` cells is
    ``a* x b*`` with ``a* = sqrt(k h / w)``, ``b* = sqrt(k w / h)``. Candidates are
    ``out_h`` in ``{floor(a*), ceil(a*)}`` (clipped to ``[1, h]``) with
    ``out_w = min(w, k // out_h)``, and ``out_w`` in ``{floor(b*), ceil(b*)}`` (clipped to
    ``[1, w]``) with ``out_h = min(h, k // out_w)``. Of these, take the one with the most
    cells (``<= k``), then the smallest aspect error ``|log(out_h / out_w) - log(h / w)|``,
    then the smallest ``out_h``. ``k >= h * w`` gives ``(h, w)``. Raises BudgetError if
    ``k < 1``.
    """
    h, w = _check_positive_int("h", h), _check_positive_int("w", w)
    if isinstance(k, bool):
        raise BudgetError(f"k must be an int >= 1, got {k!r}; pass the number of tokens to keep.")
    try:
        k = operator.index(k)
    except TypeError:
        raise BudgetError(f"k must be an int >= 1, got {k!r}; pass the number of tokens to keep.") from None
    if k < 1:
        raise BudgetError(f"k={k} leaves no pooled token; pass k >= 1.")
    if k >= h * w:
        return h, w
    a_star = math.sqrt(k * h / w)
    b_star = math.sqrt(k * w / h)
    options = set()
    for a in (math.floor(a_star), math.ceil(a_star)):
        a = min(max(a, 1), h)
        options.add((a, min(w, k // a)))
    for b in (math.floor(b_star), math.ceil(b_star)):
        b = min(max(b, 1), w)
        options.add((min(h, k // b), b))

    def rank(shape: tuple[int, int]) -> tuple[int, Fraction, int]:
        a, b = shape
        # exp(|log(a / b) - log(h / w)|) as an exact fraction, so mirrored shapes tie exactly
        return (-(a * b), Fraction(max(a * w, b * h), min(a * w, b * h)), a)

    return min((s for s in options if s[0] >= 1 and s[1] >= 1), key=rank)
