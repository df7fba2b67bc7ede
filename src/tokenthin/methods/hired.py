"""HiRED: Attention-Guided Token Dropping for Efficient Inference of High-Resolution Vision-Language Models
(Arif et al., AAAI 2025), arXiv 2408.10945.

Algorithm (one reduction point after encoder layer ``l``, keeping ``k`` patch tokens of an image cut into
partitions):
1. visual content: score every partition by the [CLS] attention its patch tokens get in an early encoder layer
   (``l_init``, heads averaged), summed over the partition;
2. budget distribution: split ``k`` over the partitions in proportion to their content scores (a partition never
   gets more tokens than it has);
3. token selection: in every partition keep its budget of patch tokens with the highest [CLS] attention in the
   layer at the site (``l_final``, heads averaged), in their original order; drop the rest.

What the paper and its official code (hasanar1f/HiRED, ``modeling_llava_next.py``) fix:
* the layers: the first encoder layer (``vit_top_layer = 0``) for the budget and LLaVA's feature layer, the
  penultimate one (``vit_bottom_layer = 22`` of CLIP ViT-L/14's 24), for the selection. Here: ``early_layer=0``
  and the layer at the site (``site="layer:-2"`` on a plain ViT reproduces LLaVA);
* [CLS] attention with the heads summed (the same ranking as their mean), the [CLS] row restricted to patches.

Partitions. On LLaVA-NeXT the partitions are the base (full) image and its AnyRes crops: the base image gets a
fixed share ``alpha`` of the budget and the crops share the rest by the base image's early attention over the
region each crop covers. A plain LLaVA or ViT sees one image per sample, so here each sample's patch grid is cut
into ``partitions x partitions`` sub-images (row and column bands of near-equal size; default 1: the whole image
is one partition and HiRED is plain top-k by final-layer [CLS] attention, like FasterVLM); the parameter exists to
exercise the budget distribution on single-image hosts. On LLaVA-NeXT (``ReduceInput.view`` holds crops) the
partitions are the base view and its crops: the base view keeps ``round(base_share * k)`` tokens and the crops
share the rest by the base view's early-layer [CLS] attention summed over the base cells whose centres fall inside
the part of the image each crop covers (a crop's place is its tokens' rows and columns in the unpadded AnyRes
grid, ``ReduceInput.rows`` / ``cols``, as the host lays them out). ``base_share=0.5`` is our default.

Choices left open, and ours:
* the content score is the sum of the early layer's [CLS] attention over the partition's tokens; the released
  code instead counts how many of the base image's top ``(1 - alpha) * N`` early-attention tokens fall in each
  crop's part of the base view (a thresholded version of the same sum);
* which part of the base view weights a crop: here the base cells whose centres fall inside the crop's region of
  the unpadded image (its tokens' rows and columns). The released code cuts the base view's flattened (row-major)
  attention into ``nph * npw`` equal consecutive chunks (``reshape(nph, npw, -1)``), i.e. bands of whole rows, not
  the crops' regions: with a 2 x 2 grid each "crop" reads a quarter of the rows, and with 1 x 2 crops (a wide image)
  it splits the base view top / bottom instead of left / right, an official bug. No ``official`` mode here
  (not reproduced);
* budgets are exact: proportional shares, partitions that would overflow are filled and the rest re-shared among
  the others, then largest-remainder rounding (ties to the lower partition index), so exactly ``k`` tokens are
  kept. The released code floors each share and may keep fewer than the budget;
* an all-zero content score (only possible with hand-made scores) shares the budget by partition size;
* ``score="mean"`` (attention received, averaged over queries and heads) serves encoders without [CLS] such as
  SigLIP; the default ``"cls"`` refuses them with a message naming that option;
* protected tokens ([CLS], registers) are kept on top of ``k``; the method acts only on an unreduced full patch
  grid (``inp.pristine``); ties go to the lowest token index.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import TokenThinError
from ..ops.groups import apportion, rank_in_groups
from .base import Method, Param, Plan, ReduceInput, positive_int, register, uniform_keep


def _score_kind(v: Any) -> str | None:
    return None if v in ("cls", "mean") else "must be 'cls' ([CLS] attention) or 'mean' (attention received)"


def _share(v: Any) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and 0 <= v <= 1
    return None if ok else "must be a fraction in [0, 1]"


def _layer_index(v: Any) -> str | None:
    ok = isinstance(v, int) and not isinstance(v, bool)
    return None if ok else "must be an int: an encoder layer index (negative counts from the last layer)"


def resolve_layer(name: str, what: str, layer: int, point_layer: int, num_layers: int) -> int:
    """An encoder layer index (negative from the end) checked to run no later than the reduction point."""
    if not -num_layers <= layer < num_layers:
        raise TokenThinError(f"'{name}': {what}={layer} is outside the encoder's {num_layers} layers")
    layer %= num_layers
    if layer > point_layer:
        raise TokenThinError(
            f"'{name}': {what}={layer} runs after the reduction point (layer {point_layer}); choose a layer "
            f"<= {point_layer} or a later site"
        )
    return layer


def patch_grid(inp: ReduceInput, name: str) -> tuple[int, int]:
    """(h, w) of the sample's image, checking that the candidates are exactly its full patch grid, row-major."""
    h, w = inp.grid
    n = inp.valid.shape[1] - inp.num_protected
    all_valid = inp.fixed is not None or bool(inp.valid.all())  # fixed count: no padding, known from the shapes
    if not inp.pristine or h * w == 0 or h * w != n or not all_valid:
        raise TokenThinError(
            f"'{name}' needs every sample's tokens to be one image's full patch grid ({n} tokens for grid {h}x{w}): "
            "it works on one image per prompt (LLaVA) and on ViT encoders before any other reduction, not on "
            "several images per prompt or AnyRes crops (LLaVA-NeXT), nor after another reduction"
        )
    return h, w


def attention_score(inp: ReduceInput, kind: str, layer: int, name: str) -> torch.Tensor:
    """(B, N) [CLS] attention or attention received in ``layer``, checked against the tokens at the site."""
    if kind == "cls":
        if not inp.has_cls:
            raise TokenThinError(
                f"this model has no [CLS] token; '{name}' can score by the attention each token receives "
                "(averaged over queries and heads) instead: pass score='mean'"
            )
        s = inp.cls_attention(layer)
    else:
        s = inp.mean_attention(layer)
    if s.shape != inp.valid.shape:
        raise TokenThinError(
            f"'{name}': layer {layer} saw {s.shape[1]} tokens but layer {inp.layer} has {inp.valid.shape[1]}; "
            "the method needs an unreduced token sequence"
        )
    return s.float().nan_to_num(nan=-math.inf)


@register
class HiRED(Method):
    name = "hired"
    title = "HiRED: Attention-Guided Token Dropping for Efficient Inference of High-Resolution Vision-Language Models"
    arxiv = "2408.10945"
    summary = (
        "share the budget over image partitions by early-layer [CLS] attention, then keep each partition's top "
        "tokens by [CLS] attention of the layer at the site"
    )
    kind = "prune"
    sites = ("layer", "output")
    default_site = "output"
    signals = frozenset({"cls_attn"})  # what the default score reads; score="mean" reads "mean_attn" instead
    params = {
        "partitions": Param(
            1,
            "cut each image's patch grid into partitions x partitions sub-images that share the budget by content "
            "(1: the whole image is one partition)",
            positive_int,
        ),
        "base_share": Param(
            0.5, "AnyRes (LLaVA-NeXT): fraction of the budget the base view keeps; the crops share the rest", _share
        ),
        "early_layer": Param(
            0,
            "encoder layer whose attention scores each partition's visual content (the paper: the first layer)",
            _layer_index,
        ),
        "score": Param(
            "cls",
            "'cls' ([CLS] attention, the paper) or 'mean' (attention received; for encoders without [CLS])",
            _score_kind,
        ),
    }

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if self.p["score"] == "mean":
            self.signals = frozenset({"mean_attn"})

    def signal_layers(self, point_layer: int, num_layers: int) -> list[int]:
        early = resolve_layer(self.name, "early_layer", self.p["early_layer"], point_layer, num_layers)
        return sorted({early, point_layer})

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        k = uniform_keep(keep, self.name)
        view = inp.view
        if view is not None and bool((view > 0).any()):  # (encoder hosts have no views: no read-back there)
            return self._anyres(inp, k, view)
        h, w = patch_grid(inp, self.name)
        g = self.p["partitions"]
        if g > min(h, w):
            raise TokenThinError(f"'hired': partitions={g} exceeds the {h}x{w} patch grid; use at most {min(h, w)}")
        P = inp.num_protected
        early = resolve_layer(self.name, "early_layer", self.p["early_layer"], inp.layer, inp.num_layers)
        content = attention_score(inp, self.p["score"], early, self.name)[:, P:]
        final = attention_score(inp, self.p["score"], inp.layer, self.name)[:, P:]
        dev = final.device
        rows = torch.arange(h, device=dev) * g // h
        cols = torch.arange(w, device=dev) * g // w
        part = (rows.unsqueeze(1) * g + cols.unsqueeze(0)).flatten().expand_as(final)  # (B, h*w)
        b = final.shape[0]
        weight = torch.zeros(b, g * g, dtype=torch.float64, device=dev)
        weight.scatter_add_(1, part, content.double().clamp_min(0.0))
        cap = torch.zeros(b, g * g, dtype=torch.long, device=dev).scatter_add_(1, part, torch.ones_like(part))
        budget = apportion(weight, cap, k)  # (B, g*g)
        chosen = rank_in_groups(final, part, g * g) < budget.gather(1, part)
        out = torch.ones_like(inp.valid)
        out[:, P:] = chosen
        return out & inp.valid, None

    def _anyres(self, inp: ReduceInput, k: int, view: torch.Tensor) -> Plan:
        """LLaVA-NeXT: partitions = the base view and its crops (see the module docstring)."""
        from .globalcom2 import crop_grid, image_starts

        early = resolve_layer(self.name, "early_layer", self.p["early_layer"], inp.layer, inp.num_layers)
        content = attention_score(inp, self.p["score"], early, self.name)
        final = attention_score(inp, self.p["score"], inp.layer, self.name)
        out = torch.zeros_like(inp.valid)
        for b in range(view.shape[0]):
            v = view[b].masked_fill(~inp.valid[b], -1)
            if int(image_starts(v).max()) > 0:
                raise TokenThinError("'hired' on AnyRes views takes one image per prompt")
            base, crops = v == 0, v > 0
            n_base, n_views = int(base.sum()), int(v.max()) + 1
            g = math.isqrt(n_base)
            if g * g != n_base:
                raise TokenThinError(f"'hired': the base view's {n_base} tokens are not a square grid")
            e = content[b][base].double().clamp_min(0.0).view(g, g)
            rows = None if inp.rows is None else inp.rows[b][crops]
            row, col, hh, ww = crop_grid(rows, None if inp.cols is None else inp.cols[b][crops], self.name)
            centre = (torch.arange(g, device=e.device, dtype=torch.float64) + 0.5) / g
            weight = torch.zeros(n_views, dtype=torch.float64, device=e.device)
            vc = v[crops]
            for c in range(1, n_views):
                m = vc == c
                if not bool(m.any()):
                    continue
                r_in = (centre >= int(row[m].min()) / hh) & (centre < (int(row[m].max()) + 1) / hh)
                c_in = (centre >= int(col[m].min()) / ww) & (centre < (int(col[m].max()) + 1) / ww)
                weight[c] = e[r_in][:, c_in].sum()
            cap = torch.bincount(v[v >= 0], minlength=n_views)
            k_base = min(n_base, round(self.p["base_share"] * k))
            crops_budget = apportion(weight[None, 1:], cap[None, 1:], k - k_base)[0]
            budget = torch.cat([torch.tensor([k_base], device=cap.device), crops_budget])
            group = v.clamp(min=0)
            score = final[b].masked_fill(v < 0, -math.inf)
            chosen = rank_in_groups(score[None], group[None], n_views)[0] < budget[group]
            out[b] = chosen & (v >= 0)
        return out, None
