"""PiToMe: Accelerating Transformers with Spectrum-Preserving Token Merging (Tran et al., NeurIPS 2024),
arXiv 2405.16148.

Algorithm (per reduction point, ``r`` tokens to merge), as in the official code (hchautran/PiToMe,
``algo/pitome/merge.py::pitome_vision`` with ``patch/timm.py``):
1. metric = the layer's keys averaged over heads (as ToMe);
2. energy of every candidate token = mean over all candidates j (itself included) of ``ELU(cos(k_i, k_j) - m, alpha)``
   (see :func:`tokenthin.scores.energy.energy`), with ``alpha = 1``;
3. the margin shrinks with depth: ``m_l = margin * (1 - l / L)`` for layer ``l`` (0-based) of ``L``, ``margin = 0.9``
   (official ``apply_patch``: ``margins = [.9 - .9 * (i / num_layers)]``), so deep layers merge more freely;
4. the ``2r`` highest-energy tokens are mergeable; the rest (low energy: isolated, informative) are protected;
5. the mergeable tokens, in descending energy order, are split alternately: ranks 0, 2, 4, ... form A, ranks
   1, 3, 5, ... form B; every A token merges into its most similar B token (cosine), i.e. exactly ``r`` merges.

Choices the paper leaves open or that differ from the official code:
* As for ToMe here, the merge happens at the layer boundary (after the MLP) with that layer's keys, not between
  attention and MLP; merged tokens are size-weighted means and proportional attention follows ``apply()``'s
  ``prop_attn`` (the official ViT patch defaults to it off in its cleaned release, on in earlier ones).
* Protected tokens ([CLS], registers, distillation token) and padding are left out of the energy graph; the
  official code leaves out [CLS] only (it has no registers or padding).
* Ties in energy are broken by token position (stable sort); the official code uses an unstable sort.
* At a single site (``layer:k`` / ``output``) a keep count below half of the candidates is reached by repeating
  the round on the surviving tokens (energies recomputed, each survivor keeps its own key), like ToMe here.
"""

from __future__ import annotations

from typing import Any

import torch

from ..ops.matching import match, merge_in_rounds
from ..scores.energy import energy
from .base import Method, Param, Plan, ReduceInput, register


def pitome_round(metric: torch.Tensor, r: torch.Tensor, cand: torch.Tensor, margin: float, alpha: float) -> Plan:
    """One PiToMe merge of ``r`` (B,) tokens among ``cand`` (B, N); needs ``r <= cand.sum(1) // 2``."""
    b, n, _ = metric.shape
    big = int(r.max())
    if big == 0:
        return torch.ones(b, n, dtype=torch.bool, device=cand.device), None
    e = energy(metric, margin, alpha, cand)
    order = e.argsort(dim=1, descending=True, stable=True)  # candidates by falling energy, the others last
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=order.device).expand(b, n))
    mergeable = cand & (rank < 2 * r.unsqueeze(1))  # each sample's own top-2r
    top = order[:, : 2 * big]
    return match(metric, r, mergeable, a_idx=top[:, 0::2], b_idx=top[:, 1::2])


def _number(lo: float, hi: float) -> Any:
    def check(v: Any) -> str | None:
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v <= hi
        return None if ok else f"must be a number in [{lo}, {hi}]"

    return check


@register
class PiToMe(Method):
    name = "pitome"
    title = "Accelerating Transformers with Spectrum-Preserving Token Merging"
    arxiv = "2405.16148"
    summary = "merge only high-energy (redundant) tokens by bipartite matching; protect isolated low-energy tokens"
    kind = "merge"
    sites = ("layers", "layer", "output")
    default_site = "layers"
    signals = frozenset({"keys"})
    params = {
        "margin": Param(0.9, "energy margin at layer 0; layer l of L uses margin * (1 - l / L)", _number(-1.0, 1.0)),
        "alpha": Param(1.0, "ELU alpha: weight of similarities below the margin", _number(0.0, 1e3)),
    }

    def margin_at(self, layer: int, num_layers: int) -> float:
        return float(self.p["margin"]) * (1.0 - layer / num_layers)

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        metric = inp.keys()
        m, alpha = self.margin_at(inp.layer, inp.num_layers), float(self.p["alpha"])
        cand = inp.candidates
        r = cand.sum(1) - keep
        if bool((r <= cand.sum(1) // 2).all()):
            return pitome_round(metric, r, cand, m, alpha)
        # several rounds on the survivors (energy recomputed each round), composed into one plan
        return merge_in_rounds(inp.valid, cand, r, lambda cur, step, _alive: pitome_round(metric, step, cur, m, alpha))
