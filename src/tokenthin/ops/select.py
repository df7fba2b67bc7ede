"""Batched token selection: the contract every selector follows, and the score-based selectors.

Every selector (here, in :mod:`tokenthin.ops.diversity` and in :mod:`tokenthin.ops.coverage`) takes
``candidates``, a ``(B, N)`` bool tensor (True = the token may be chosen; False for protected tokens
such as CLS and for padding), and an int ``k`` shared by the whole batch. It returns a ``(B, k)``
LongTensor of token indices that are sorted ascending, unique and all eligible. ``k == 0`` gives shape
``(B, 0)``; ``k < 0`` or ``k`` larger than the smallest per-sample eligible count raises
:class:`BudgetError`. The checks that enforce this live here (:func:`check_k` and friends).

Conventions shared by the greedy selectors (diversity, coverage):

* Features may have any float dtype and live on any device; similarities are computed in
  float32 on the features' device.
* The pairwise similarity matrix is built sample by sample
  (:func:`tokenthin.ops.similarity.per_sample_matmul`): one GEMM per sample on 64-byte-aligned
  contiguous operands (a slice of the batch is copied only when it is not aligned), not one batched
  GEMM. BLAS may add up the dot products in a different order for a batched call or for operands at
  another memory alignment, so two duplicate tokens could tie when a sample runs alone and not inside
  a batch. Built this way a sample's selection is bitwise independent of the rest of the batch
  (checked by the tests).
* Every selection step is a few batched tensor ops over ``(B, N)`` (the lazy coverage greedy adds
  a short inner loop that recomputes slabs of stale gains); the Python loop runs over the ``k``
  steps, never over tokens.
* Ties are broken by the lowest token index (``torch.argmax`` returns the first maximum).
* Memory is ``O(B * N * N)`` float32 for the diversity selectors and ``O(B * M * N)`` for
  the coverage selector (about 33 MB per sample at N = M = 2880).
"""

from __future__ import annotations

import math
import operator

import torch

from tokenthin.errors import BudgetError

__all__ = [
    "ascending",
    "check_candidates",
    "check_features",
    "check_k",
    "empty_selection",
    "random_subset",
    "topk_by_score",
]


# --------------------------------------------------------------------------- the contract's checks


def check_candidates(candidates: torch.Tensor) -> None:
    """Raise unless ``candidates`` is a (B, N) bool tensor."""
    if not isinstance(candidates, torch.Tensor) or candidates.dtype != torch.bool or candidates.dim() != 2:
        got = (
            f"{tuple(candidates.shape)} {candidates.dtype}"
            if isinstance(candidates, torch.Tensor)
            else type(candidates).__name__
        )
        raise ValueError(
            f"candidates must be a (B, N) bool tensor, got {got}; pass e.g. `mask.bool()` with one row per sample."
        )


def check_k(candidates: torch.Tensor, k: int) -> int:
    """Validate ``k`` against the eligible counts; return it as a Python int."""
    check_candidates(candidates)
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
    if k == 0 or candidates.shape[0] == 0 or torch.compiler.is_compiling():  # a trace reads no counts back
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


def check_features(x: torch.Tensor, candidates: torch.Tensor, name: str = "x") -> None:
    """Raise unless ``x`` is a (B, N, D) tensor matching ``candidates`` and on its device."""
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


def empty_selection(candidates: torch.Tensor, k: int = 0) -> torch.Tensor:
    """An uninitialised (B, k) LongTensor on ``candidates``' device (``k == 0``: the empty selection)."""
    return torch.empty(candidates.shape[0], k, dtype=torch.long, device=candidates.device)


def ascending(idx: torch.Tensor) -> torch.Tensor:
    """Selected indices (B, k) sorted ascending per sample, as every selector returns them."""
    return idx.sort(dim=1).values


# --------------------------------------------------------------------------- by score, at random


def _top_k_keys(key: torch.Tensor, k: int, candidates: torch.Tensor) -> torch.Tensor:
    """Indices of the k largest keys among candidates (lowest index first on ties)."""
    # Two stable sorts: by key descending, then by eligibility. Eligible tokens therefore
    # always rank above non-eligible ones (even at -inf), and equal keys keep index order.
    order = torch.sort(key, dim=1, descending=True, stable=True).indices
    eligible = candidates.gather(1, order).to(torch.int8)
    order = order.gather(1, torch.sort(eligible, dim=1, descending=True, stable=True).indices)
    return ascending(order[:, :k])


def topk_by_score(score: torch.Tensor, k: int, candidates: torch.Tensor) -> torch.Tensor:
    """The ``k`` eligible tokens with the highest ``score`` (B, N), sorted by index.

    Ties go to the lowest index. NaN scores rank as -inf; an eligible token always ranks
    above a non-eligible one.
    """
    k = check_k(candidates, k)
    if not isinstance(score, torch.Tensor) or tuple(score.shape) != tuple(candidates.shape):
        got = tuple(score.shape) if isinstance(score, torch.Tensor) else type(score).__name__
        raise ValueError(
            f"score must be a (B, N) tensor matching candidates {tuple(candidates.shape)}, got {got}; "
            "pass one score per token."
        )
    if k == 0:
        return empty_selection(candidates)
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
    k = check_k(candidates, k)
    if k == 0:
        return empty_selection(candidates)
    device = generator.device if generator is not None else candidates.device
    keys = torch.rand(candidates.shape, generator=generator, device=device, dtype=torch.float64)
    return _top_k_keys(keys.to(candidates.device), k, candidates)
