"""Sites inside a vision-language model's vision tower (``layers`` / ``layer:k``): the tower runs the encoder
runtime (:mod:`tokenthin.runtime`); its reduced features are scattered back over every patch before the projector
(:func:`unmerge_features`, so the host's image-token count still matches) and collapsed again before the language
model, one token per reduced slot (:class:`CollapseSlots`, fed :func:`tower_groups`)."""

from __future__ import annotations

from typing import Any

import torch

from ..methods.base import ReduceInput
from ..ops import assign


class CollapseSlots:
    """The language model's side of a reduction inside the vision tower: one token per reduced slot."""

    name = "collapse"
    kind = "prune"
    sites = ("output",)
    signals: frozenset[str] = frozenset()
    dynamic = False
    p: dict[str, Any] = {}

    def signal_layers(self, point_layer: int, num_layers: int) -> list[int]:
        return []

    def reduce(self, inp: ReduceInput, keep: torch.Tensor) -> tuple[torch.Tensor, None]:
        group = inp.tower_slot  # (B, N) reduced slot of every visual token, -1 dropped
        if group is None:  # nothing was reduced in the tower
            return inp.valid.clone(), None
        b, n = group.shape
        first = torch.full((b, int(group.max()) + 2), n, dtype=torch.long, device=group.device)
        pos = torch.arange(n, device=group.device).expand(b, n)
        first.scatter_reduce_(1, group + 1, pos, "amin")
        keep_mask = (first.gather(1, group + 1) == pos) & (group >= 0) & inp.valid
        return keep_mask, None


def unmerge_features(feats: torch.Tensor, source: torch.Tensor, drop: int) -> torch.Tensor:
    """The tower's reduced features ``feats`` (B_img, n_reduced - drop, D; the host dropped ``drop`` leading
    tokens) scattered back over every patch through ``source`` (B_img, N0, the reduced slot of every original
    token, -1 dropped): merged patches share their slot's features, dropped ones are zero."""
    src = source[:, drop:]  # (B_img, N0 - drop)
    idx = (src - drop).clamp(min=0)
    return assign.rows(feats, idx).masked_fill((src < 0).unsqueeze(-1), 0)


def tower_groups(source: torch.Tensor, drop: int, flat: torch.Tensor, vvalid: torch.Tensor) -> torch.Tensor:
    """(B, N) tower slot of each visual token (``flat``: its index into the tower's image-major tokens), unique
    per image (-1: dropped in the tower or padding)."""
    n_img, n0 = source.shape
    per_img = n0 - drop
    slot = source[:, drop:].reshape(-1)[flat.clamp(max=n_img * per_img - 1)]
    image = flat // per_img
    return torch.where((slot >= 0) & vvalid, image * n0 + slot, torch.full_like(slot, -1))
