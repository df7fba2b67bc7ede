"""Diversity selectors: greedy Max-Min diversity (DivPrune) and greedy k-center (farthest-first traversal).

Both follow the selection contract and conventions of :mod:`tokenthin.ops.select`; memory is ``O(B * N * N)``
float32 (the pairwise cosine distances).
"""

from __future__ import annotations

import math

import torch

from tokenthin.ops.select import ascending, check_features, check_k, empty_selection
from tokenthin.ops.similarity import cosine_distance, normalize

__all__ = ["k_center_greedy", "max_min_diversity"]


def _farthest_first(dist: torch.Tensor, avail: torch.Tensor, first: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy farthest-first traversal shared by DivPrune and k-center.

    ``dist[b, s, j]`` is the distance from selected token ``s`` to token ``j``. Starting from
    ``first`` (B,), each step keeps, per token, its distance to the nearest selected token
    and adds the available token that maximises it. One row of ``dist`` is read per pick
    (``O(k * N)`` in all); tokens that cannot be picked (not candidates, or picked already)
    hold ``-inf``, which the running minimum never raises, so a step is a row gather, one
    in-place minimum and one argmax.
    """
    B, N = avail.shape
    flat = dist.view(B * N, N)
    base = torch.arange(B, device=avail.device) * N
    out = torch.empty(B, k, dtype=torch.long, device=avail.device)
    nearest = torch.full((B, N), math.inf, dtype=dist.dtype, device=dist.device).masked_fill_(~avail, -math.inf)
    cur = first
    for t in range(k):
        out[:, t] = cur
        nearest.view(-1).index_fill_(0, base + cur, -math.inf)
        if t + 1 == k:
            break
        torch.minimum(nearest, flat.index_select(0, base + cur), out=nearest)  # row of the newest pick
        cur = nearest.argmax(dim=1)
    return ascending(out)


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
    k = check_k(candidates, k)
    check_features(x, candidates)
    if k == 0:
        return empty_selection(candidates)
    dist = cosine_distance(x)
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
    k = check_k(candidates, k)
    check_features(x, candidates)
    if k == 0:
        return empty_selection(candidates)
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
    return _farthest_first(cosine_distance(x), candidates, first, k)
