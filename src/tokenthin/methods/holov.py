"""HoloV: Don't Just Chase "Highlighted Tokens" in MLLMs: Revisiting Visual Holistic Context Retention
(Zou et al., NeurIPS 2025), arXiv 2510.02912.

Algorithm (at the encoder output, keeping ``k`` visual tokens):
1. cut the visual tokens into ``P`` spatial crops (partitions);
2. inside each crop, for every token: its [CLS] attention ``a`` and ``v``, the variance of its cosine similarity
   to the crop's other tokens (a token unlike some and like others carries context); the holistic token score is
   ``a + beta * v * mean(a) / mean(v)`` (means over the crop: the variance is brought to the attention's scale);
3. crop score = mean holistic score of its tokens; crop budgets are proportional to ``score ** power``;
4. each crop keeps its budget of tokens with the highest [CLS] attention.

What the official code (obananas/HoloV, ``utils.py`` and ``llava/model/llava_arch.py``) fixes:
* ``P = 16`` crops that are contiguous runs of the visual tokens in the order the language model reads them
  (sizes ``N // P``, one more for the first ``N % P``), on LLaVA-NeXT over base view and unpadded crops together
  (row ends excluded), exactly the candidates the runtime hands us; ``beta = 0.09``, ``power = 1`` (an ``alpha``
  multiplying the whole score cancels out of the shares and is left out here);
* features: the projected visual tokens (what the language model reads, ``inp.x`` here); attention: the [CLS] row
  of LLaVA's feature layer, heads averaged, each AnyRes crop with its own softmax;
* the selection inside a crop is by attention alone (``select="attention"``); the holistic score only moves the
  budget between crops. ``select="holistic"`` ranks inside crops by the holistic score instead.

Where the default differs from the released code (choices left open, and ours):
* budgets are exact: proportional shares, capped at the crop's size with the excess re-shared, largest remainders
  (:func:`~tokenthin.methods.hired.apportion`). The released code floors the shares, gives the remainder to the
  heaviest crops, drops whatever overflows a full crop and pads the output with zero vectors;
* the variance runs over the crop's other tokens only (the released code also counts the zeroed self-similarity,
  adding ``mean**2 / (n - 1)``); a one-token crop has variance 0 and scores its attention (the released code scores
  it with the attention unscaled by its ``1e3``, i.e. about 1000 times lower than every other crop);
* ``split="views"`` uses the AnyRes views as the crops instead (each image's base view and each of its crops: one
  partition each); on a plain LLaVA that is one partition per image (top-k by attention). The default
  ``"sequence"`` is the released code's and also partitions a plain LLaVA image into 16 bands of rows;
* the cosine similarities are one GEMM per sample, so a sample's plan does not depend on the rest of the batch;
  ties go to the lowest token index.
* order: the kept tokens stay in their original (positional) order; the released code hands the language model
  each crop's tokens in descending-attention order (a crop kept whole stays in order), crops in order;
* AnyRes: the released LLaVA-NeXT code has the row-end (``image_newline``) tokens commented out; here the host's
  row ends stay (structure tokens, kept and not counted);
* sites: ``output`` (the paper's place, before the language model) and ``layer:k`` of a ViT-like encoder,
  where there are no AnyRes views and [CLS], registers stay protected.

``official=True`` reproduces the released ``HoloV`` function (``split="sequence"``, ``select="attention"``,
``power=1`` only): the attention scaled by 1e3, the variance with the zeroed self-similarity counted, a one-token
crop scored by its unscaled attention, shares floored with the remainder to the heaviest crops, a crop's overflow
dropped (fewer than ``k`` tokens kept), and the order above (an :class:`~tokenthin.methods.base.OrderedPlan`,
honoured by the vision-language runtime). What it cannot give: the released code pads the output with zero rows up
to ``k`` (the overflow); here the language model reads the kept tokens only.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import TokenThinError
from ..ops.groups import apportion, rank_in_groups
from ..ops.similarity import normalize, per_sample_matmul
from .base import Method, OrderedPlan, Param, Plan, ReduceInput, positive_int, register, uniform_keep


def _nonneg(v: Any) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v >= 0 and math.isfinite(v)
    return None if ok else "must be a finite number >= 0"


def _positive(v: Any) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)
    return None if ok else "must be a finite number > 0"


def _split(v: Any) -> str | None:
    ok = v in ("sequence", "views")
    return None if ok else "must be 'sequence' (contiguous runs of tokens, the paper's code) or 'views' (AnyRes views)"


def _select(v: Any) -> str | None:
    ok = v in ("attention", "holistic")
    return None if ok else "must be 'attention' (the paper's code) or 'holistic' (attention plus similarity variance)"


def _flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be True (the official code's behaviour) or False"


def sequence_partitions(cand: torch.Tensor, p: int) -> torch.Tensor:
    """(B, N) partition of each candidate: ``p`` contiguous runs of the candidates, the first ``n % p`` one longer."""
    r = cand.long().cumsum(1) - 1
    n = cand.sum(1, keepdim=True)
    base, rem = n // p, n % p
    cut = rem * (base + 1)
    return torch.where(r < cut, r // (base + 1), rem + (r - cut) // base.clamp_min(1))


def view_partitions(view: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, N) partition = (image, view) of each token (view -1: not a candidate) and the number of partitions."""
    prev = torch.cat([view.new_full((view.shape[0], 1), -1), view[:, :-1]], 1)
    img = ((view == 0) & (prev != 0)).long().cumsum(1) - 1
    per = int(view.max()) + 1 if view.numel() else 1
    return img.clamp_min(0) * per + view.clamp_min(0), max(int(img.max()) + 1, 1) * per


@register
class HoloV(Method):
    name = "holov"
    title = 'Don\'t Just Chase "Highlighted Tokens" in MLLMs: Revisiting Visual Holistic Context Retention'
    arxiv = "2510.02912"
    summary = (
        "share the budget over spatial crops by a holistic score ([CLS] attention plus similarity variance), then "
        "keep each crop's top tokens by [CLS] attention"
    )
    kind = "prune"
    sites = ("layer", "output")
    default_site = "output"
    signals = frozenset({"cls_attn"})
    params = {
        "partitions": Param(16, "number of crops for split='sequence' (the paper's code: 16)", positive_int),
        "split": Param("sequence", "'sequence' (contiguous runs of tokens) or 'views' (AnyRes views)", _split),
        "beta": Param(0.09, "weight of the similarity variance in the holistic score", _nonneg),
        "power": Param(1.0, "crop budgets are proportional to crop score ** power", _positive),
        "select": Param("attention", "rank inside a crop by 'attention' or by the 'holistic' score", _select),
        "official": Param(
            False,
            "reproduce the released code: floored budgets, overflow dropped, the 1e3 attention scale, partition "
            "tokens in descending-attention order",
            _flag,
        ),
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        p = self.p
        if p["official"] and (p["split"] != "sequence" or p["select"] != "attention" or p["power"] != 1.0):
            raise TokenThinError(
                "method 'holov': official=True reproduces the released code, which has split='sequence', "
                "select='attention' and power=1; leave those at their defaults"
            )

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        k = uniform_keep(keep, self.name)
        if self.p["official"]:
            return self._official(inp, k)
        cand = inp.candidates
        att = inp.cls_attention().float().nan_to_num(nan=0.0).clamp_min(0.0)
        if att.shape != cand.shape:
            raise TokenThinError("'holov' needs the [CLS] attention of the unreduced tokens (site 'output')")
        att = att.masked_fill(~cand, 0.0)
        if self.p["split"] == "views":
            view = inp.view
            view = torch.zeros_like(cand, dtype=torch.long) if view is None else view.long()
            part, g = view_partitions(view.masked_fill(~cand, -1))
        else:
            g = self.p["partitions"]
            part = sequence_partitions(cand, g)
        part = part.masked_fill(~cand, g)  # group g: non-candidates, no budget
        xn = normalize(inp.x.float())
        sim = per_sample_matmul(xn, xn)  # (B, N, N) cosine similarity
        n = cand.shape[1]
        same = (part.unsqueeze(2) == part.unsqueeze(1)) & cand.unsqueeze(2) & cand.unsqueeze(1)
        same &= ~torch.eye(n, dtype=torch.bool, device=cand.device)
        others = same.sum(2).clamp_min(1)
        mean = (sim * same).sum(2) / others
        var = ((sim - mean.unsqueeze(2)).square() * same).sum(2) / others
        var = var.masked_fill(~cand, 0.0)

        def per_part(t: torch.Tensor) -> torch.Tensor:  # (B, g + 1) sums over each partition
            return torch.zeros(t.shape[0], g + 1, dtype=torch.float64, device=t.device).scatter_add_(
                1, part, t.double()
            )

        size = per_part(cand.float())
        scale = per_part(att) / (per_part(var) + 1e-6 * size)  # mean(a) / (mean(v) + 1e-6)
        holistic = att.double() + self.p["beta"] * var.double() * scale.gather(1, part)
        crop_score = per_part(holistic) / size.clamp_min(1)
        weight = crop_score.clamp_min(0.0).pow(self.p["power"]).masked_fill(size == 0, 0.0)
        weight[:, g] = 0.0
        budget = apportion(weight, size.long(), k)
        sel = att.double() if self.p["select"] == "attention" else holistic
        chosen = rank_in_groups(sel, part, g + 1) < budget.gather(1, part)
        out = (chosen & cand) | (inp.valid & ~cand)
        return out & inp.valid, None

    def _official(self, inp: ReduceInput, k: int) -> OrderedPlan:
        """The released ``HoloV`` function, one sample at a time (see the module docstring)."""
        cand = inp.candidates
        att = inp.cls_attention().float()
        if att.shape != cand.shape:
            raise TokenThinError("'holov' needs the [CLS] attention of the unreduced tokens (site 'output')")
        b, n = cand.shape
        keep = inp.valid & ~cand  # protected tokens stay
        order = torch.arange(n, dtype=torch.float64, device=cand.device).expand(b, n).clone()
        beta, parts, eps = float(self.p["beta"]), self.p["partitions"], 1e-6
        for i in range(b):
            idx = cand[i].nonzero().flatten()
            a, f = att[i, idx], inp.x[i, idx].float()
            base, rem = divmod(idx.numel(), parts)
            spans = [(p * base + min(p, rem), base + (p < rem)) for p in range(parts) if base + (p < rem) > 0]
            scores = []
            for start, size in spans:
                ap = a[start : start + size]
                if size == 1:  # the released code scores a one-token crop by its attention, without the 1e3
                    scores.append(ap.mean())
                    continue
                fn = f[start : start + size]
                fn = fn / (fn.norm(dim=1, keepdim=True) + eps)
                sim = (fn @ fn.T) * (1 - torch.eye(size, device=f.device))  # the zeroed diagonal stays in the sums
                mean = sim.sum(1) / (size - 1)
                var = (sim - mean.unsqueeze(1)).square().sum(1) / (size - 1)
                a3 = ap * 1e3
                scores.append((a3 + beta * var * (a3.abs().mean() / (var.abs().mean() + eps))).mean())
            w = torch.stack(scores)
            w = w / (w.sum() + eps)
            alloc = (w * k).floor().long()
            left = k - int(alloc.sum())
            if left > 0:
                alloc[torch.topk(w, min(left, w.numel())).indices[:left]] += 1
            for (start, size), m in zip(spans, alloc.tolist()):
                if m <= 0:
                    continue
                if m >= size:  # a full crop keeps all its tokens in order; the overflow is dropped
                    keep[i, idx[start : start + size]] = True
                    continue
                top = torch.topk(a[start : start + size], m).indices  # descending attention
                pos = idx[start + top]
                keep[i, pos] = True
                order[i, pos] = float(idx[start]) + torch.arange(m, dtype=torch.float64, device=cand.device)
        return OrderedPlan(keep & inp.valid, None, order)
