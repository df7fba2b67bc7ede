"""DToMe, the dynamic token merging of DyMU: Dynamic Merging and Virtual Unmerging for Efficient VLMs
(Wang et al., 2025), arXiv 2504.17040.

Per-layer similarity thresholds replace ToMe's fixed ``r``, so simple images keep fewer tokens than busy ones.
As in the official code (MikeWangWZHL/dymu, ``src/open_clip/tome.py``: ``batch_level_bipartite_soft_matching``,
``ToMEBlock.threshold_running_avg``):

Calibration (``apply(..., r=..., calibration=pixel_values)``), at every layer ``l`` with ``r_l > 0``:
1. ToMe's bipartite edges: alternate split of the tokens into A/B, every A candidate's best cosine match in B
   (keys averaged over heads);
2. batch-level merging: the ``B * r_l`` strongest edges of the whole calibration batch are merged, so images
   lose different numbers of tokens and the next layers calibrate on those dynamic lengths;
3. the batch's threshold is the strongest edge that was *not* merged, clamped at 0 (official:
   ``node_max[edge_idx[rb]]``, ``max(., 0)``); ``tau_l`` is the mean of the batch thresholds over every
   calibration batch (a running mean in the official code).

Inference: every sample merges all of its A->B edges with similarity strictly above ``tau_l`` (one bipartite
round, at most half of its candidates); samples keep different counts, the runtime pads and masks.

Choices the paper leaves open or that differ from the official code:
* Layers with ``r_l = 0`` are no reduction point, so they neither calibrate nor merge (the official threshold
  buffer starts at 1.0: no merging). Calling ``apply`` again re-calibrates from scratch.
* Tokens keep their original order after a merge (the official code moves them to [unmerged A, B]); the
  alternate split of the next layer therefore pairs different tokens than upstream DyMU would.
* The merge happens at the layer boundary (after the MLP) instead of between attention and MLP, as for ToMe here.
* Per-sample merges are capped at half of the sample's candidates, in calibration and at inference.
* ``flops=t`` (ours; DyMU has no FLOPs target): the ``r`` schedule the FLOPs solver picks for ``t`` (rule
  ``smooth``) is calibrated as above, and then one shared offset is added to every calibrated threshold, found by
  bisection so that the FLOPs the thresholds *realise* on the calibration images (mean over images, each at its own
  token counts, :attr:`tokenthin.runtime.TokenInfo.flops_fraction`) are at most ``t`` and as close to it as the
  search finds (within ``FIT_TOL``). Measured on the real DINOv2-S (``tokenthin bench``, 16 calibration images):
  the batch-level calibration already realises close to its schedule on the images it calibrated on (0.498 for
  ``flops=0.5``; offset below 1e-3), but other images realise other FLOPs (the 16 evaluation images 0.56,
  Fashion-MNIST 0.29): a target is met on the calibration images only. The ``r=`` path is the official
  calibration, offset 0.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import BudgetError, TokenThinError
from ..ops.matching import alternate_split, edge_scores, match
from .base import Method, Plan, ReduceInput, register


@register
class DToMe(Method):
    name = "dtome"
    title = "DyMU: Dynamic Merging and Virtual Unmerging for Efficient VLMs (DToMe)"
    arxiv = "2504.17040"
    summary = "merge every bipartite edge above a per-layer similarity threshold calibrated on images (dynamic r)"
    kind = "merge"
    sites = ("layers",)
    dynamic = True
    default_site = "layers"
    signals = frozenset({"keys"})

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.thresholds: dict[int, float] = {}
        self.calibrated = False
        self._sum: dict[int, float] = {}
        self._batches: dict[int, int] = {}
        self.offset = 0.0  # added to every threshold at inference (flops=: fitted by fit_flops)
        self.flops_target: float | None = None
        self.flops_realised: float | None = None  # mean realised FLOPs fraction on the calibration images

    FIT_TOL = 0.002  # stop bisecting once the realised FLOPs are this close below the target
    FIT_STEPS = 20
    LOW, HIGH = -2.0, 1.0  # offsets at which every edge merges (up to the cap) / none does (cosine <= 1)

    def calibrate(self, run: Callable[[], None]) -> None:
        """Run the calibration forward pass(es) and set ``thresholds`` (layer -> tau) from them."""
        self._sum, self._batches = {}, {}
        self.calibrated = False
        run()
        self.thresholds = {layer: self._sum[layer] / self._batches[layer] for layer in sorted(self._sum)}
        self.calibrated = True
        self.offset, self.flops_target, self.flops_realised = 0.0, None, None

    def fit_flops(self, target: float, realised: Callable[[], float]) -> None:
        """Set ``offset`` (shared by every layer's threshold) so that ``realised()`` (the mean FLOPs fraction of an
        inference pass over the calibration images with the current thresholds) is at most ``target`` and as close
        as bisection finds. Raises when even merging every edge (up to half per layer) stays above ``target``."""

        def at(offset: float) -> float:
            self.offset = offset
            return realised()

        self.flops_target = float(target)
        best, f_best = 0.0, at(0.0)
        if f_best > target:
            lo, hi = self.LOW, 0.0
            f_lo = at(lo)
            if f_lo > target:
                self.offset, self.flops_realised = 0.0, f_best
                raise BudgetError(
                    f"flops={target} is unreachable for 'dtome' on the calibration images: merging every edge its "
                    f"calibrated layers allow realises {f_lo:.3f}; give a larger target (or r=)"
                )
            best, f_best = lo, f_lo
        else:
            lo, hi = 0.0, self.HIGH
        for _ in range(self.FIT_STEPS):
            if target - f_best <= self.FIT_TOL:
                break
            mid = (lo + hi) / 2
            f = at(mid)
            if f <= target:
                lo = mid
                if f >= f_best:
                    best, f_best = mid, f
            else:
                hi = mid
        self.offset, self.flops_realised = best, f_best

    def calibration_info(self) -> dict[str, object]:
        """The calibrated thresholds, the fitted offset and the FLOPs target and realised share (explain())."""
        return {
            "thresholds": dict(self.thresholds),
            "offset": self.offset,
            "flops_target": self.flops_target,
            "flops_realised_calibration": self.flops_realised,
        }

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        metric, cand = inp.keys(), inp.candidates
        cap = cand.sum(1) // 2
        if inp.calibrating:
            return self._calibration_merge(inp, metric, cand, int((cand.sum(1) - keep).sum()), cap)
        if not self.calibrated:
            raise TokenThinError(
                "'dtome' merges by thresholds found on calibration images; apply it with "
                "tokenthin.apply(model, 'dtome', r=..., calibration=pixel_values)"
            )
        tau = self.thresholds.get(inp.layer)
        if tau is None:  # calibration never merged here
            return torch.ones_like(cand), None
        return match(metric, cap, cand, threshold=tau + self.offset)

    def _calibration_merge(
        self, inp: ReduceInput, metric: torch.Tensor, cand: torch.Tensor, total: int, cap: torch.Tensor
    ) -> Plan:
        b, n = cand.shape
        a1, b1 = alternate_split(n, cand.device)
        a_idx, b_idx = a1.expand(b, -1), b1.expand(b, -1)
        best, _ = edge_scores(metric, a_idx, b_idx, cand.gather(1, a_idx), cand.gather(1, b_idx))
        flat = best.flatten()
        order = flat.argsort(descending=True, stable=True)  # all edges of the batch, strongest first
        rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
        chosen = (rank < total).view_as(best) & torch.isfinite(best)
        r = torch.minimum(chosen.sum(1), cap)
        nxt = flat[order[total]] if total < flat.numel() else flat.new_tensor(-torch.inf)
        tau = max(float(nxt), 0.0) if torch.isfinite(nxt) else 0.0
        self._sum[inp.layer] = self._sum.get(inp.layer, 0.0) + tau
        self._batches[inp.layer] = self._batches.get(inp.layer, 0) + 1
        return match(metric, r, cand)
