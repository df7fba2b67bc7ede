"""Calibrated per-layer schedules: :func:`calibrate` searches a method's budget per layer on calibration images
with the frozen model, under a FLOPs target; the :class:`CalibratedSchedule` it returns is reused by
``tokenthin.apply(model, method, schedule=sched)`` and saves to / loads from JSON.

Paper ideas reproduced, and every deviation:

* DiffRate (Chen et al., ICCV 2023, arXiv 2305.17997, github.com/OpenGVLab/DiffRate): per-layer reduction rates
  found on calibration images with the frozen model, under a FLOPs constraint, maximising fidelity. DiffRate's
  search is *differentiable*: it relaxes the per-layer prune and merge rates and trains them by gradient descent
  on a task loss plus a FLOPs penalty for a few epochs on ImageNet training images. Ours is gradient-free (greedy or a
  parametric curve, below), searches only the method's own budget (``r`` of a merging method, or the site and
  keep of a pruning method; not DiffRate's joint prune + merge rates), and its objective is label-free fidelity to
  the unreduced model (cosine of the pooled / [CLS] output, or of the unmerged patch tokens) on a few images.
* G-Search ("Accelerating Multimodal Large Language Models by Searching Optimal Vision Token Reduction", Zhao et
  al., CVPR 2025, arXiv 2412.00556): a greedy search of the tokens kept at each layer, shallow to deep, under the
  assumption that the number of essential tokens does not increase along layers. The paper searches the keep rate of
  each language-model layer of an MLLM for the least tokens that keep benchmark performance (its scenario I); only
  its abstract could be read here, not its algorithm box. Ours (:func:`~tokenthin.calibration.search.greedy_layers`)
  answers its scenario II instead (best fidelity at a given FLOPs target), on a vision encoder's merging schedule:
  from no reduction, each step tries more merging after every layer (each candidate saving the same share of the
  FLOPs) and keeps the one that costs the least fidelity per FLOP saved, until the target. Token counts are
  non-increasing by construction (merging only removes tokens), as G-Search assumes.
* P-Sigmoid (same paper): the keep rate per layer follows a parametric sigmoid whose parameters the paper optimises
  by Bayesian optimisation under the budget. Ours (:func:`~tokenthin.calibration.search.sigmoid_layers`): tokens
  left after boundary ``j`` are ``N * (floor + (1 - floor) * h(j / (L-1)))``, ``h`` a logistic step (slope,
  center) rescaled to fall from 1 to 0; ``floor`` is solved for the FLOPs target, (slope, center) searched on a
  5 x 5 grid plus two rounds of coordinate search instead of Bayesian optimisation.
* Single-site pruning methods: every site ``layer:k`` is tried with the keep that meets the target there (replacing
  the fixed rule of :mod:`tokenthin.budget`, ``k = round(L * flops / 2) - 1``, which is one of the candidates).
* Resize and merge (``resize-tome``, ours; no paper searches both): a joint search over the input size and the
  merge schedule (:mod:`~tokenthin.calibration.joint`): the image as given and every smaller size of the
  ``downsample`` baseline that costs at least the target unreduced, each with ToMe's ``smooth`` merge schedule for
  the target at that size, plus the largest smaller size meeting the target with no merging; every candidate is
  scored on the calibration images and the most faithful kept. The schedule records the input share
  (``input_keep``, re-solved for other input sizes) and the per-layer ``r`` at the resized size. ``search`` and
  ``steps`` do not apply (the merge schedule at each size is the solver's, not searched per layer).
* Both searches also evaluate the method's default solve of ``flops=`` (e.g. ToMe's constant ``r``) and return it
  where it is more faithful: the result is never less faithful than the default on the calibration images.

* Vision-language models (:mod:`tokenthin.calibration.vlm`, ``samples=`` processor outputs instead of
  ``images=``): under a fraction of the language model's prefill FLOPs (FastV's count, :mod:`tokenthin.vlm.cost`),
  the site (``output`` or ``llm:k``, every one the method takes) and the keep it allows (FastV, and pruning methods
  that also work inside the language model), or a two-stage method's in-LLM schedule (AIM's ``start`` / ``step``,
  ToDRE's ``llm_layer`` / ``llm_keep``, on a grid, the output keep solved for the target); methods that only work
  before the language model get the keep that meets the target (nothing else to search). Objective: cosine of the
  last-position logits (or ``exp(-KL)`` of the next-token distributions, or the final hidden state's cosine).
  G-Search's own question, a keep rate for every language-model layer, is not searched: one reduction point, or the
  method's own schedule.

Not covered yet: sites inside a VLM's vision tower (``layers`` / ``layer:k`` on LLaVA), the block site of diffusion
denoisers, dynamic methods (``dtome`` calibrates its own thresholds); quality of the VLM searches on real weights is
not measured (no VLM weights on this project's machines).
"""

from .run import OBJECTIVES, SEARCHES, calibrate
from .schedule import CalibratedSchedule
from .vlm import VLM_OBJECTIVES

__all__ = ["OBJECTIVES", "SEARCHES", "VLM_OBJECTIVES", "CalibratedSchedule", "calibrate"]
