"""Coverage selectors: greedy (facility-location) coverage maximisation, MMTok's selection step.

Both follow the selection contract and conventions of :mod:`tokenthin.ops.select`; memory is ``O(B * M * N)``
float32 (M references x N tokens; about 33 MB per sample at N = M = 2880). The greedy is lazy (Minoux): a gain
computed earlier bounds the current one, so each step recomputes a few slabs of rows, not all N x M. Under
``torch.compile`` it recomputes every gain at every step instead (the same picks, no data-dependent loop).
"""

from __future__ import annotations

import math

import torch

from tokenthin.ops.select import ascending, check_features, check_k, empty_selection
from tokenthin.ops.similarity import normalize, per_sample_matmul

__all__ = ["MMTOK_TEXT_TEMPERATURE", "MMTOK_VISION_TEMPERATURE", "coverage_greedy", "greedy_max_coverage"]

# MMTok's default softmax temperatures (MMTokCore): vision-vision 0.2, text-vision 0.02.
MMTOK_VISION_TEMPERATURE = 0.2
MMTOK_TEXT_TEMPERATURE = 0.02


def _gains(rows: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """Marginal gains ``sum_m max(0, rows[..., m] - covered[..., m])`` of token rows (B, L, M) -> (B, L).

    Each gain is a contiguous row sum over the M references, so it comes out bit for bit the
    same whichever rows share the call (a slab of L rows or all N)."""
    return torch.sub(rows, covered).clamp_(min=0).sum(dim=-1)


def _greedy_coverage_token_major(cover_t: torch.Tensor, k: int, candidates: torch.Tensor) -> torch.Tensor:
    """Greedy coverage on ``cover_t`` laid out (B, N, M): token-major, references contiguous.

    Lazy greedy (Minoux's accelerated greedy): a token's gain only falls as coverage rises
    (submodularity; in float32 too, since ``max(0, c - cov)`` falls elementwise and the row
    sum adds the same positions in the same order), so a gain computed at an earlier step is
    an upper bound ``ub``. Each step takes the argmax of ``ub`` over the available tokens
    (lowest index first). While that bound is stale, the highest stale bounds are recomputed
    (16 of them, then 64, 256, ...: a few slabs of rows, not one token at a time). An argmax
    whose gain is fresh is the exact greedy pick, ties included: every lower-index token has
    a strictly smaller bound, every other one at most an equal bound. So the picks are those
    of recomputing every gain at every step (``k * N * M`` work), at a small fraction of it
    on real features.
    """
    B, N, M = cover_t.shape
    dev = candidates.device
    rows = torch.arange(B, device=dev)
    ub = torch.empty(B, N, dtype=cover_t.dtype, device=cover_t.device)
    covered = torch.zeros(B, 1, M, dtype=cover_t.dtype, device=cover_t.device)
    step = max(1, (1 << 20) // max(M, 1))  # tokens per block of the first, full pass (about 4 MB)
    for s in range(0, N, step):
        ub[:, s : s + step] = _gains(cover_t[:, s : s + step], covered)
    ub.masked_fill_(~candidates, -math.inf)  # -inf: never picked (not a candidate, or picked already)
    fresh = torch.ones(B, N, dtype=torch.bool, device=dev)
    flat = cover_t.view(B * N, M)
    base = (rows * N).unsqueeze(1)  # (B, 1): where each sample's rows start in ``flat``
    out = torch.empty(B, k, dtype=torch.long, device=dev)

    def refresh(s: torch.Tensor | None, width: int) -> None:
        """Recompute the ``width`` highest stale bounds of samples ``s`` (None: all); -inf (picked) stays."""
        u, f = (ub, fresh) if s is None else (ub[s], fresh[s])
        idx = u.masked_fill(f, -math.inf).topk(min(width, N), dim=1).indices  # (S, width); pads with fresh ones
        old = u.gather(1, idx)
        at = (base if s is None else base[s]) + idx
        cov = covered if s is None else covered[s]
        g = _gains(flat.index_select(0, at.view(-1)).view(idx.shape[0], -1, M), cov)  # (S, width)
        u.scatter_(1, idx, torch.where(old == -math.inf, old, g))  # a fresh gain recomputes to itself
        f.scatter_(1, idx, True)
        if s is not None:
            ub[s], fresh[s] = u, f

    for t in range(k):
        if t:
            fresh = ub <= 0  # a bound of 0 is exact (gains are >= 0); -inf never moves
            refresh(None, 16)  # after a pick the top bound is almost always stale: refresh the top 16 at once
        pick = ub.argmax(dim=1)
        todo = ~fresh.gather(1, pick.unsqueeze(1)).squeeze(1)  # (B,) samples whose argmax bound is still stale
        width = 64
        while bool(todo.any()):  # rare: 64, then 256, 1024, ... more of the highest stale bounds
            refresh(None if B == 1 else todo.nonzero().squeeze(1), width)
            width *= 4
            pick = ub.argmax(dim=1)
            todo = ~fresh.gather(1, pick.unsqueeze(1)).squeeze(1)
        out[:, t] = pick
        ub.scatter_(1, pick.unsqueeze(1), -math.inf)
        covered = torch.maximum(covered, flat.index_select(0, base.squeeze(1) + pick).unsqueeze(1))  # (B, 1, M)
    return ascending(out)


def _greedy_coverage_plain(cover_t: torch.Tensor, k: int, candidates: torch.Tensor) -> torch.Tensor:
    """Greedy coverage recomputing every gain at every step (``k * N * M`` work): the picks of the lazy greedy,
    without its data-dependent loop, for ``torch.compile`` (a fixed number of steps, no count read back)."""
    B, N, M = cover_t.shape
    covered = torch.zeros(B, 1, M, dtype=cover_t.dtype, device=cover_t.device)
    avail = candidates.clone()
    flat = cover_t.view(B * N, M)
    base = torch.arange(B, device=candidates.device) * N
    out = torch.empty(B, k, dtype=torch.long, device=candidates.device)
    for t in range(k):
        pick = _gains(cover_t, covered).masked_fill(~avail, -math.inf).argmax(dim=1)  # lowest index among ties
        out[:, t] = pick
        avail = avail.scatter(1, pick.unsqueeze(1), False)
        covered = torch.maximum(covered, flat.index_select(0, base + pick).unsqueeze(1))
    return ascending(out)


def _greedy(cover_t: torch.Tensor, k: int, candidates: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_compiling():
        return _greedy_coverage_plain(cover_t, k, candidates)
    return _greedy_coverage_token_major(cover_t, k, candidates)


def greedy_max_coverage(cover: torch.Tensor, k: int, candidates: torch.Tensor) -> torch.Tensor:
    """Greedy maximisation of ``f(S) = sum_j max(0, max_{i in S} cover[b, j, i])``.

    ``cover`` is a (B, M, N) float tensor: how well candidate token ``i`` covers reference
    ``j``. Coverage starts at 0; each step adds the eligible, not yet selected token with the
    largest gain ``sum_j max(0, cover[j, i] - cov[j])`` (ties: lowest index) and raises ``cov``
    to ``max(cov, cover[:, i])``. The gains are evaluated lazily (see
    :func:`_greedy_coverage_token_major`): the picks are exactly those of recomputing every
    gain at every step, for a few full passes' work instead of ``k``. This is MMTok's greedy
    step; use it directly to build MMTok's multimodal objective by concatenating weighted coverage blocks along M, e.g.
    ``torch.cat([text_block, alpha * vision_block], dim=1)``.

    Internally the matrix is copied to a token-major (B, N, M) float32 layout, so each
    token's gain is summed in the order of a plain 1-D sum over its column.
    """
    k = check_k(candidates, k)
    B, N = candidates.shape
    if not isinstance(cover, torch.Tensor) or cover.dim() != 3 or cover.shape[0] != B or cover.shape[2] != N:
        got = tuple(cover.shape) if isinstance(cover, torch.Tensor) else type(cover).__name__
        raise ValueError(
            f"cover must be a (B, M, N) tensor with B={B}, N={N}, got {got}; rows are references, columns tokens."
        )
    if k == 0:
        return empty_selection(candidates)
    cover_t = cover.to(device=candidates.device, dtype=torch.float32).transpose(1, 2).contiguous()
    return _greedy(cover_t, k, candidates)


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
    See :func:`greedy_max_coverage` (lazy greedy over a (B, N, M) tensor, the same picks as
    recomputing every gain at every step).

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
    k = check_k(candidates, k)
    check_features(x, candidates)
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
        return empty_selection(candidates)
    ref_valid = ref_valid.to(candidates.device)
    xn = normalize(x)
    rn = xn if ref is None else normalize(ref)
    logits = per_sample_matmul(rn, xn).div_(temperature)  # (B, M, N)
    if torch.compiler.is_compiling() or not bool(candidates.all()):  # no count read back under torch.compile
        logits.masked_fill_(~candidates.unsqueeze(1), -math.inf)
    cover = torch.softmax(logits, dim=-1)  # each reference spreads one unit over the eligible tokens
    del logits
    n_ref = ref_valid.sum(dim=1).clamp_min(1).to(torch.float32)  # (B,)
    cover_t = torch.empty(B, x.shape[1], cover.shape[1], dtype=torch.float32, device=cover.device)  # (B, N, M)
    torch.div(cover.transpose(1, 2), n_ref.view(B, 1, 1), out=cover_t)  # token-major in the same pass
    del cover
    if torch.compiler.is_compiling() or not bool(ref_valid.all()):
        cover_t.masked_fill_(~ref_valid.unsqueeze(1), 0.0)
    return _greedy(cover_t, k, candidates)
