"""GlobalCom^2: Global Compression Commander for Plug-and-Play Inference Acceleration of High-Resolution Large
Vision-Language Models (Liu et al., AAAI 2026), arXiv 2501.05179 (v1 titled "Compression with Global Guidance:
Towards Training-free High-Resolution MLLMs Acceleration").

Algorithm (at the encoder output of an AnyRes model, each image = a thumbnail (base view) + crops, keep ratio R):
1. thumbnail: keep its ``R * n_0`` tokens with the highest [CLS] attention of the thumbnail itself;
2. crop importance: every crop scores the thumbnail's [CLS] attention summed over the region of the thumbnail it
   covers; ``sigma = softmax(score / temperature)`` over the image's crops;
3. crop budgets: crop ``c`` keeps the fraction ``R * (1 + sigma_c - mean(sigma))`` (at most 1) of its tokens;
4. token importance inside a crop: its own [CLS] attention (local, the crop's own softmax) L2-normalised over the
   crop, plus the thumbnail's attention map bilinearly resized to the image's (unpadded) high-resolution token grid
   at the token's place (global), L2-normalised over the crop; each crop keeps its budget of top tokens.

What the official code (xuyang-liu16/GlobalCom2, ``llava/model/llava_arch.py``) fixes: ``temperature = 10``, one
retention ratio shared by thumbnail and crops, the global map resized with ``F.interpolate(mode="bilinear",
align_corners=False)`` to the unpadded grid, [CLS] attention of the LLaVA feature layer with heads averaged.

Where the default differs from the released code (choices left open, and ours):
* ``R = k / N`` (the sample's keep count over its visual tokens); the per-view counts of steps 1 and 3 are then
  shared out so that exactly ``k`` tokens are kept (:func:`~tokenthin.methods.hired.apportion`: proportional to
  those counts, capped by each view's size, largest remainders; ties to the lower view). The released code floors
  every count (``int(N * scale)``) and keeps a little less than the budget;
* where a crop lies: the host gives each token's view (``ReduceInput.view``) and, for a crop token, its row and
  column in the image's unpadded grid (``ReduceInput.rows`` / ``cols``; on LLaVA-NeXT the number of row ends
  before it since its image began, and its place inside that row). The crop's thumbnail region (step 2) is the set of
  thumbnail cells whose centres fall on that crop's tokens once the thumbnail is stretched over the unpadded grid.
  The released code splits the thumbnail into equal blocks of the *padded* crop grid; ours follows the unpadding,
  which is what the thumbnail shows (it is the whole image, unpadded);
* on a host without AnyRes views (plain LLaVA, every token has view 0) there are no crops: each image is one
  thumbnail and the method is top-k by [CLS] attention (FasterVLM). We do not invent a partition grid there: the
  paper's budgets come from a thumbnail that looks at crops, which such an image does not have;
* ties go to the lowest token index;
* order: the kept tokens stay in their original (positional) order; the released code hands the language model
  the thumbnail's kept tokens in descending-attention order (the crops' in positional order, scattered back);
* the released code writes a row end after every row of the *padded* crop grid (zero rows removed by unpadding
  still get one); the host's row ends (one per unpadded row) stay here. Its batch code reads the first image's
  thumbnail attention for every image of a batch (``cls_attn_scores[0]``), a bug for batches of several images;
  every image here reads its own (the official evaluation runs one image per batch, where both agree);
* the released code reduces AnyRes images only: on a plain LLaVA image it keeps every token;
* sites: ``output`` (the paper's place, before the language model) and ``layer:k`` of a ViT-like encoder,
  where there are no AnyRes views and [CLS], registers stay protected.

``official=True`` reproduces the released selection and order on LLaVA-NeXT: ``R = k / N``; the thumbnail keeps
``floor(n_0 * R)`` tokens by its [CLS] attention, read in descending-attention order; crop ``c`` (of the
``nph x npw`` crop grid) scores the thumbnail cells of the equal block ``(y // (s // nph), x // (s // npw))``
(clamped to the last block, the padded crop grid, unpadding ignored), ``softmax`` with the released ``+ 1e-8``,
keeps ``floor(n_c * scale_c)`` tokens by local plus global score, read in positional order (an
:class:`~tokenthin.methods.base.OrderedPlan`, honoured by the vision-language runtime). Every count is floored, so
fewer than ``k`` tokens are kept. It needs every crop present after unpadding (crops 1..n on a full grid) and
refuses other layouts; on hosts without crops it is the thumbnail rule alone (top ``floor(n * R)`` by attention,
descending order). Not reproduced: the padded-grid row ends and the batch bug above (structure and batching are
the host's).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import TokenThinError
from ..ops.groups import apportion, rank_in_groups
from ..ops.select import topk_by_score
from .base import Method, OrderedPlan, Param, Plan, ReduceInput, keep_indices, register, uniform_keep


def _positive(v: Any) -> str | None:
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 and math.isfinite(v)
    return None if ok else "must be a positive number (the paper's code: 10)"


def _flag(v: Any) -> str | None:
    return None if isinstance(v, bool) else "must be True (the official code's behaviour) or False"


def image_starts(view: torch.Tensor) -> torch.Tensor:
    """(N,) image index of each token of one sample (views in prompt order; -1 = padding, image -1)."""
    prev = torch.cat([view.new_full((1,), -1), view[:-1]])
    start = (view == 0) & (prev != 0)
    return torch.where(view >= 0, start.long().cumsum(0) - 1, torch.full_like(view, -1))


def crop_grid(
    rows: torch.Tensor | None, cols: torch.Tensor | None, name: str
) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """Row and column of each crop token of one image in the image's unpadded grid (``ReduceInput.rows`` /
    ``cols`` of those tokens, as the host lays them out), and the grid's (H, W), checked to be full rows."""
    if rows is None or cols is None:
        raise TokenThinError(
            f"'{name}': the host gives no row and column of the AnyRes crops' tokens; the method needs LLaVA-NeXT's "
            "AnyRes layout at site 'output'"
        )
    h = int(rows.max()) + 1
    lengths = torch.bincount(rows.clamp(min=0), minlength=h)
    w = int(lengths[0])
    if not bool((rows >= 0).all() & (lengths == w).all() & (cols >= 0).all() & (cols < w).all()):
        raise TokenThinError(
            f"'{name}': the crops' tokens do not form full rows of one grid; the method needs LLaVA-NeXT's "
            "unreduced AnyRes layout (site 'output', nothing reduced before)"
        )
    return rows, cols, h, w


@register
class GlobalCom2(Method):
    name = "globalcom2"
    title = (
        "GlobalCom^2: Global Compression Commander for Plug-and-Play Inference Acceleration of High-Resolution "
        "Large Vision-Language Models"
    )
    arxiv = "2501.05179"
    summary = (
        "AnyRes: the thumbnail's [CLS] attention shares the budget over the crops; crops keep their top tokens by "
        "local plus thumbnail-guided [CLS] attention, the thumbnail its own top tokens"
    )
    kind = "prune"
    sites = ("layer", "output")
    default_site = "output"
    signals = frozenset({"cls_attn"})
    params = {
        "temperature": Param(
            10.0,
            "softmax temperature over the crops' thumbnail attention (larger: budgets closer to uniform)",
            _positive,
        ),
        "official": Param(
            False,
            "reproduce the released code: floored counts, crop regions as equal blocks of the padded crop grid, "
            "the thumbnail's tokens in descending-attention order",
            _flag,
        ),
    }

    def _one(
        self, att: torch.Tensor, view: torch.Tensor, rows: torch.Tensor | None, cols: torch.Tensor | None, ratio: float
    ):
        """One sample: (group (N,) with -1 for non-candidates, selection score (N,), per-group target counts)."""
        group = torch.full_like(view, -1)
        score = att.clone()
        targets: list[float] = []
        img = image_starts(view)
        for m in range(int(img.max()) + 1 if bool((img >= 0).any()) else 0):
            thumb = ((img == m) & (view == 0)).nonzero().flatten()
            crops = ((img == m) & (view >= 1)).nonzero().flatten()
            group[thumb] = len(targets)
            targets.append(ratio * thumb.numel())
            if crops.numel() == 0:
                continue
            s = math.isqrt(thumb.numel())
            if s * s != thumb.numel():
                raise TokenThinError(f"'globalcom2': a thumbnail of {thumb.numel()} tokens is not a square grid")
            row, col, h, w = crop_grid(
                None if rows is None else rows[crops], None if cols is None else cols[crops], self.name
            )
            a0 = att[thumb].view(s, s)
            glob = F.interpolate(a0[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0][row, col]
            cview = view[crops]
            cmap = torch.full((h, w), -1, dtype=torch.long, device=att.device)
            cmap[row, col] = cview
            centre = torch.arange(s, device=att.device, dtype=torch.float64) + 0.5
            ry = (centre * h / s).long().clamp(max=h - 1)
            rx = (centre * w / s).long().clamp(max=w - 1)
            owner = cmap[ry][:, rx].flatten()  # the crop under each thumbnail cell's centre
            ids = torch.unique(cview)  # sorted crop numbers present
            mass = torch.zeros(ids.numel(), dtype=torch.float64, device=att.device)
            hit = torch.searchsorted(ids, owner.clamp(min=0))
            ok = (owner >= 0) & (hit < ids.numel())
            mass.index_add_(0, hit[ok], a0.flatten()[ok].double())
            sigma = torch.softmax(mass / self.p["temperature"], 0)
            scale = (ratio * (1 + sigma - sigma.mean())).clamp(max=1.0)
            for j, c in enumerate(ids.tolist()):
                sel = cview == c
                tok = crops[sel]
                group[tok] = len(targets)
                targets.append(float(scale[j]) * tok.numel())
                score[tok] = F.normalize(att[tok], dim=0) + F.normalize(glob[sel], dim=0)
        return group, score, targets

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> Plan:
        k = uniform_keep(keep, self.name)
        cand = inp.candidates
        b = cand.shape[0]
        att = inp.cls_attention().float().nan_to_num(nan=0.0)
        if att.shape != cand.shape:
            raise TokenThinError("'globalcom2' needs the [CLS] attention of the unreduced tokens (site 'output')")
        if self.p["official"]:
            return self._official(inp, k, att)
        if inp.view is None and inp.fixed is not None:  # an encoder, no padding: one thumbnail, no crops
            return keep_indices(inp, topk_by_score(att, k, cand)), None  # what the general path gives, traceable
        view = inp.view
        view = torch.zeros_like(cand, dtype=torch.long) if view is None else view.long()
        view = view.masked_fill(~cand, -1)
        rows, cols = inp.rows, inp.cols
        counts = cand.sum(1)
        plans = [
            self._one(
                att[i],
                view[i],
                None if rows is None else rows[i],
                None if cols is None else cols[i],
                k / max(int(counts[i]), 1),
            )
            for i in range(b)
        ]
        g = max(len(t) for _, _, t in plans) + 1  # the last group holds the non-candidates, with no budget
        weight = torch.zeros(b, g, dtype=torch.float64, device=cand.device)
        group = torch.stack([gr.masked_fill(gr < 0, g - 1) for gr, _, _ in plans])
        for i, (_, _, t) in enumerate(plans):
            weight[i, : len(t)] = torch.tensor(t, dtype=torch.float64)
        cap = torch.zeros(b, g, dtype=torch.long, device=cand.device).scatter_add_(1, group, cand.long())
        budget = apportion(weight, cap, k)
        score = torch.stack([s for _, s, _ in plans])
        chosen = rank_in_groups(score, group, g) < budget.gather(1, group)
        out = (chosen & cand) | (inp.valid & ~cand)  # protected tokens are kept
        return out & inp.valid, None

    def _official(self, inp: ReduceInput, k: int, att: torch.Tensor) -> OrderedPlan:
        """The released ``compress_thumbnail`` / ``generate_scale_for_crop_features`` / ``compress_crops``, one
        image at a time (see the module docstring)."""
        cand = inp.candidates
        b, n = cand.shape
        view = torch.zeros_like(cand, dtype=torch.long) if inp.view is None else inp.view.long()
        view = view.masked_fill(~cand, -1)
        keep = inp.valid & ~cand  # protected tokens stay
        order = torch.arange(n, dtype=torch.float64, device=cand.device).expand(b, n).clone()
        temp = float(self.p["temperature"])
        for i in range(b):
            total = int(cand[i].sum())
            ratio = k / max(total, 1)
            img = image_starts(view[i])
            for m in range(int(img.max()) + 1 if bool((img >= 0).any()) else 0):
                thumb = ((img == m) & (view[i] == 0)).nonzero().flatten()
                crops = ((img == m) & (view[i] >= 1)).nonzero().flatten()
                top = torch.argsort(att[i, thumb], descending=True)[: thumb.numel() * k // max(total, 1)]
                keep[i, thumb[top]] = True
                order[i, thumb[top]] = float(thumb[0]) + torch.arange(
                    top.numel(), dtype=torch.float64, device=cand.device
                )
                if crops.numel() == 0:
                    continue
                self._official_crops(inp, i, att[i], thumb, crops, view[i, crops], ratio, temp, keep)
        return OrderedPlan(keep & inp.valid, None, order)

    def _official_crops(
        self,
        inp: ReduceInput,
        i: int,
        att: torch.Tensor,
        thumb: torch.Tensor,
        crops: torch.Tensor,
        cview: torch.Tensor,
        ratio: float,
        temp: float,
        keep: torch.Tensor,
    ) -> None:
        """Sample ``i``'s crops of one image: the crop budgets from the thumbnail and each crop's top tokens."""
        s = math.isqrt(thumb.numel())
        rows, cols = inp.rows, inp.cols
        row, col, h, w = crop_grid(
            None if rows is None else rows[i, crops], None if cols is None else cols[i, crops], self.name
        )
        ids = torch.unique(cview)
        npw = int(torch.unique(cview[row == 0]).numel())
        nph = ids.numel() // max(npw, 1)
        if (
            s * s != thumb.numel()
            or nph * npw != ids.numel()
            or not torch.equal(ids.cpu(), torch.arange(1, 1 + ids.numel()))
        ):
            raise TokenThinError(
                "'globalcom2' with official=True needs LLaVA-NeXT's AnyRes layout with every crop present after "
                "unpadding (a square thumbnail, crops 1..n on a full grid); use the default official=False"
            )
        a0 = att[thumb].view(s, s)
        ph, pw = max(s // nph, 1), max(s // npw, 1)
        cy = (torch.arange(s, device=att.device) // ph).clamp(max=nph - 1)
        cx = (torch.arange(s, device=att.device) // pw).clamp(max=npw - 1)
        block = (cy.unsqueeze(1) * npw + cx.unsqueeze(0)).flatten()  # the crop each thumbnail cell is counted for
        mass = torch.zeros(nph * npw, dtype=torch.float64, device=att.device).index_add_(
            0, block, a0.flatten().double()
        )
        e = torch.exp((mass - mass.max()) / temp)
        sm = e / (e.sum() + 1e-8)
        scale = (ratio * (1 + sm - sm.mean())).clamp(max=1.0)
        glob = F.interpolate(a0[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0][row, col]
        for c in range(1, nph * npw + 1):
            sel = cview == c
            tok = crops[sel]
            top_k = int(tok.numel() * float(scale[c - 1]))
            combined = F.normalize(att[tok], dim=0) + F.normalize(glob[sel], dim=0)
            keep[i, tok[torch.topk(combined, top_k).indices]] = True  # read in positional order
