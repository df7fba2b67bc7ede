"""Budgets: parse ``r`` / ``keep`` / ``flops`` into a schedule, and solve FLOPs targets.

Sites:
* ``"layers"``: a reduction after every encoder layer but the last (merging methods), ``r`` tokens each;
* ``"layer:k"``: one reduction after encoder layer k (0-based); ``"output"`` is ``"layer:<last>"``;
* ``"input"``: the image itself is made smaller (the downsampling baseline).

``keep`` counts patch tokens only (protected tokens such as [CLS] are always kept on top): a float in (0, 1] is a
fraction of the image's patches, an int is a count. ``flops`` is a target fraction of the unreduced encoder's
analytic FLOPs (see :mod:`tokenthin.flops`), solved into ``r`` or ``keep`` for each input shape the model is fed
(the runtime caches one plan per shape; ``image_size=`` only sets the size ``explain()`` and apply-time checks use).

For site ``layers`` a ``flops`` target is solved by :mod:`tokenthin.solver`: several schedule families, and the
rule ``smooth`` (the smallest largest share of a layer's tokens merged; measured best on DINOv2-S, see there). A
schedule may also carry ``input_keep`` (the image made smaller first: ``resize-tome``).

Where ``flops`` is given for a single-site method without a site, the reduction point is placed after layer
``k = max(0, round(L * flops / 2) - 1)``: about half of the FLOPs budget is spent on full-resolution layers, the
rest on the kept tokens. This is our rule, not a paper's; pass ``site="layer:k"`` to choose.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import solver
from .errors import BudgetError, SiteError
from .flops import EncoderDims, encoder_flops


@dataclass(frozen=True)
class Schedule:
    site: str  # "layers" | "layer" | "input" | "block"
    num_layers: int
    r: tuple[int, ...] | None = None  # site "layers": tokens removed after layers 0 .. L-2
    layer: int | None = None  # site "layer": the reduction point
    keep: float | int | None = None  # site "layer"/"input"/"block": fraction (float) or count (int) of patches kept
    blocks: tuple[int, ...] = ()  # site "block": layers computing on reduced tokens (merge -> compute -> unmerge)
    # site "layers": the image is first resized to about this fraction of its patches (a method that chooses the
    # input size and the merge schedule together, ``resize-tome``); None: the image as given
    input_keep: float | None = None

    @property
    def input_fraction(self) -> float | None:
        """The fraction of the patches the resized input image has (site ``input``, or ``input_keep``); None: the
        image is not resized."""
        if self.site == "input":
            return float(self.keep)  # type: ignore[arg-type]
        return self.input_keep

    @property
    def points(self) -> list[int]:
        if self.site == "layers":
            assert self.r is not None
            return [i for i, r in enumerate(self.r) if r > 0]
        if self.site == "layer":
            assert self.layer is not None
            return [self.layer]
        if self.site == "block":
            return list(self.blocks)
        return []

    def keep_at(
        self, layer: int, counts: torch.Tensor, n_patches: int | torch.Tensor, dynamic: bool = False
    ) -> torch.Tensor:
        """(B,) candidates each sample keeps at a reduction point, given its current candidate counts.

        ``n_patches``: the content tokens of the input (per sample (B,) where the caller padded, so that a ``keep``
        fraction is of each sample's own tokens). ``dynamic``: samples arrive with different counts (a dynamic
        method); ``r`` is then capped per sample at what one bipartite round can merge instead of raising.
        """
        if self.site == "layers":
            assert self.r is not None
            r = self.r[layer]
            if dynamic:
                return counts - torch.clamp(counts // 2, max=r)
            if r > int(counts.min()) // 2:
                raise BudgetError(
                    f"r={r} after layer {layer} is too large for this input: {int(counts.min())} mergeable tokens "
                    f"are left there (of {_first(n_patches)} in the input) and one layer merges at most half; use a "
                    "smaller r, a decreasing schedule r=(r, -0.5), or flops= (solved for each input size)"
                )
            return counts - r
        if isinstance(n_patches, torch.Tensor):  # keep_count per sample, batched (round half to even, as round())
            n = n_patches.to(counts.device)
            if isinstance(self.keep, float):
                k = torch.minimum((n.double() * self.keep).round().long().clamp(min=1).minimum(n), counts)
            else:
                k = torch.full_like(counts, int(self.keep))  # type: ignore[arg-type]  # a count is a count
        else:
            k = torch.full_like(counts, keep_count(self.keep, n_patches))
        if bool((k > counts).any()):
            raise BudgetError(
                f"keep={self.keep} asks for {int(k.max())} tokens but only {int(counts.min())} are left at layer "
                f"{layer} for this input ({_first(n_patches)} content tokens); use a smaller keep or a fraction"
            )
        return k

    def keep_fixed(self, layer: int, count: int, n_patches: int) -> int:
        """:meth:`keep_at` for the fixed-count case: every sample has ``count`` candidates (known from the shapes,
        no padding) and ``n_patches`` content tokens; the same checks, in Python ints only."""
        if self.site == "layers":
            assert self.r is not None
            r = self.r[layer]
            if r > count // 2:
                raise BudgetError(
                    f"r={r} after layer {layer} is too large for this input: {count} mergeable tokens are left there "
                    f"(of {n_patches} in the input) and one layer merges at most half; use a smaller r, a decreasing "
                    "schedule r=(r, -0.5), or flops= (solved for each input size)"
                )
            return count - r
        k = keep_count(self.keep, n_patches)
        if k > count:
            raise BudgetError(
                f"keep={self.keep} asks for {k} tokens but only {count} are left at layer {layer} for this input "
                f"({n_patches} content tokens); use a smaller keep or a fraction"
            )
        return k

    def describe(self) -> str:
        if self.site == "layers":
            resize = "" if self.input_keep is None else f" input_keep={self.input_keep}"
            return f"site=layers r={list(self.r or ())}{resize}"
        if self.site == "input":
            return f"site=input keep={self.keep}"
        if self.site == "block":
            which = "" if len(self.blocks) == self.num_layers else ":" + ",".join(map(str, self.blocks))
            return f"site=block{which} keep={self.keep}"
        return f"site=layer:{self.layer} keep={self.keep}"


def _first(n: int | torch.Tensor) -> int:
    return int(n.max()) if isinstance(n, torch.Tensor) else int(n)


def keep_count(keep: float | int | None, n_patches: int) -> int:
    if keep is None:
        raise BudgetError("no keep budget")
    if isinstance(keep, float):
        return max(1, min(n_patches, round(keep * n_patches)))
    return int(keep)


def _site_layer(site: str, index: str, num_layers: int) -> int:
    try:
        k = int(index)
    except ValueError:
        k = -(10**9)
    if k < 0:
        k += num_layers
    if not 0 <= k < num_layers:
        raise SiteError(f"site '{site}': layer index must be in 0..{num_layers - 1} for this model")
    return k


def parse_site(site: str | None, num_layers: int) -> tuple[str, int | None]:
    if site is None:
        return "", None
    s = site.strip().lower()
    if s in ("layers", "input", "block"):
        return s, None
    if s == "output":
        return "layer", num_layers - 1
    kind, _, index = s.partition(":")
    if kind in ("layer", "block") and index:
        return kind, _site_layer(site, index, num_layers)
    raise SiteError(f"unknown site '{site}'; sites are 'layers', 'layer:k', 'output', 'input', 'block', 'block:k'")


def tome_schedule(r: int, inflect: float, steps: int) -> list[int]:
    """ToMe-style schedule: ``inflect`` 0 is constant, -0.5 decreasing (more merging early), 0.5 increasing."""
    lo = int(r * (1.0 - inflect))
    hi = 2 * r - lo
    step = (hi - lo) / max(steps - 1, 1)
    return [int(lo + step * i) for i in range(steps)]


def _check_r(rs: Sequence[int], n_patches: int) -> None:
    n = n_patches
    for i, r in enumerate(rs):
        if not isinstance(r, int) or r < 0:
            raise BudgetError(f"r after layer {i} must be a non-negative int, got {r!r}")
        if r > n // 2 or n - r < 1:
            raise BudgetError(
                f"r={r} after layer {i} is too large: {n} patch tokens are left there and one layer merges at "
                f"most half ({n // 2}); use a smaller r, a decreasing schedule r=(r, -0.5), or flops="
            )
        n -= r


def _is_num(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def tokens_per_layer(s: Schedule, n_patches: int, protected: int, input_patches: int | None = None):
    """Tokens entering each layer and leaving the encoder, for one image (static budgets)."""
    L = s.num_layers
    n = (input_patches if s.input_fraction is not None and input_patches is not None else n_patches) + protected
    counts, out = [], n
    for i in range(L):
        if s.site == "block":  # merge -> compute -> unmerge: the layer computes on fewer, hands on every token
            counts.append(protected + keep_count(s.keep, n_patches) if i in s.blocks else n)
            continue
        counts.append(n)
        if s.site == "layers" and i < L - 1:
            n -= (s.r or ())[i]
        elif s.site == "layer" and i == s.layer:
            n = protected + keep_count(s.keep, n_patches)
        out = n
    return counts, out


def resolve(
    *,
    kind: str,
    sites: Sequence[str],
    default_site: str,
    name: str,
    site: str | None,
    r: object,
    keep: object,
    flops: object,
    dims: EncoderDims,
    grid: tuple[int, int],
    input_patches: Callable[[float], int] | None = None,
    min_keep: float | None = None,
    rule: str | None = None,
) -> Schedule:
    """Turn the user's budget into a :class:`Schedule`, checking it against the model's default token count.

    ``input_patches``: the patch count of the image resized to a fraction of its patches (hosts with site
    ``input``). ``min_keep``: for a method that resizes and merges (``resize-tome``), the share of the input's
    patches the merging must keep to the end before the image is made smaller instead (see
    ``solver.solve_resized``); None: merging only. ``rule``: how a merge schedule is chosen
    among those meeting the target (None: ``solver.DEFAULT_RULE``; see :mod:`tokenthin.solver`)."""
    rule = rule or solver.DEFAULT_RULE
    L = dims.num_layers
    n_patches = grid[0] * grid[1]
    given = [k for k, v in (("r", r), ("keep", keep), ("flops", flops)) if v is not None]
    if len(given) != 1:
        raise BudgetError(
            f"give exactly one budget: r= (tokens merged per layer), keep= (fraction or count of patch tokens "
            f"kept) or flops= (target fraction of encoder FLOPs); got {given or 'none'}"
        )
    site_kind, layer = parse_site(site, L)
    if not site_kind:
        site_kind = default_site.split(":")[0] if default_site != "output" else "layer"
        layer = L - 1 if default_site == "output" else None
        if kind == "prune" and flops is not None and site is None:
            layer = max(0, round(L * float(flops) / 2) - 1)  # type: ignore[arg-type]
        elif site_kind == "layer" and layer is None:
            layer = L - 1
    allowed = {"layer:k" if s == "layer" else s for s in sites}
    if site_kind not in sites:
        pretty = "layer:k" if site_kind == "layer" else site_kind
        raise SiteError(
            f"method '{name}' does not act at site '{site or pretty}'; its sites: {', '.join(sorted(allowed))}"
        )

    def total(s: Schedule) -> float:
        f = s.input_fraction
        ip = input_patches(f) if (f is not None and input_patches) else None
        counts, out = tokens_per_layer(s, n_patches, dims.num_protected, ip)
        return encoder_flops(counts, ip or n_patches, dims, out)

    full = encoder_flops([n_patches + dims.num_protected] * L, n_patches, dims)

    if site_kind == "layers":
        if keep is not None:
            raise BudgetError("site 'layers' takes r= or flops=, not keep=; for keep= use site='layer:k'")
        if r is not None:
            if isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
                rs = tome_schedule(int(r[0]), r[1], L - 1)
            elif isinstance(r, (list, tuple)):
                rs = list(r)
                if len(rs) != L - 1:
                    raise BudgetError(f"a per-layer r needs {L - 1} values (one after each layer but the last)")
            elif isinstance(r, int) and not isinstance(r, bool):
                rs = [r] * (L - 1)
            else:
                raise BudgetError(f"r must be an int, a list of {L - 1} ints or (r, inflect); got {r!r}")
            _check_r(rs, n_patches)
            return Schedule("layers", L, r=tuple(rs))
        target = _fraction(flops, "flops")
        if min_keep is not None and input_patches is not None:
            f, rs, reached = solver.solve_resized(
                target,
                min_keep,
                rule,
                n_patches,
                L - 1,
                input_patches,
                lambda f, c: total(Schedule("layers", L, r=c, input_keep=f)) / full,
            )
            if target < reached - 0.02:
                raise BudgetError(
                    f"flops={target} is unreachable by resizing and merging (at least {reached:.2f}); give a larger "
                    "target"
                )
            return Schedule("layers", L, r=rs, input_keep=f)
        rs, reached = solver.solve(n_patches, L - 1, lambda c: total(Schedule("layers", L, r=c)) / full, target, rule)
        if target < reached - 0.02:
            raise BudgetError(
                f"flops={target} is unreachable by merging after every layer (at least {reached:.2f}: the first "
                "layer always sees every token and each layer merges at most half); use a larger target"
            )
        return Schedule("layers", L, r=rs)

    if site_kind == "input":
        if r is not None:
            raise BudgetError("the input site takes keep= or flops=, not r=")
        if keep is not None:
            return Schedule("input", L, keep=_fraction(keep, "keep"))
        target = _fraction(flops, "flops")
        cands = [Schedule("input", L, keep=f / 1000) for f in range(5, 1001, 5)]
        return min(cands, key=lambda s: abs(total(s) / full - target))

    if site_kind == "block":
        blocks = tuple(range(L)) if layer is None else (layer,)
        if r is not None:
            raise BudgetError("site 'block' takes keep= (tokens each block computes on) or flops=, not r=")
        if keep is not None:
            if not _is_num(keep) or (isinstance(keep, float) and not 0 < keep <= 1):
                raise BudgetError(f"keep must be a fraction in (0, 1] or a token count, got {keep!r}")
            if isinstance(keep, int) and not 1 <= keep <= n_patches:
                raise BudgetError(f"keep={keep} tokens is out of range: this input has {n_patches} patch tokens")
            return Schedule("block", L, keep=keep, blocks=blocks)  # type: ignore[arg-type]
        target = _fraction(flops, "flops")
        cands = [Schedule("block", L, keep=k, blocks=blocks) for k in range(1, n_patches + 1)]
        return min(cands, key=lambda s: abs(total(s) / full - target))

    assert layer is not None
    if r is not None:
        if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < n_patches:
            raise BudgetError(f"r={r!r} must be an int in 0..{n_patches - 1} at a single site")
        return Schedule("layer", L, layer=layer, keep=n_patches - r)
    if keep is not None:
        if not _is_num(keep):
            raise BudgetError(f"keep must be a fraction in (0, 1] or a token count, got {keep!r}")
        if isinstance(keep, float):
            _fraction(keep, "keep")
        elif not 1 <= keep <= n_patches:  # type: ignore[operator]
            raise BudgetError(
                f"keep={keep} tokens is out of range: this input has {n_patches} patch tokens "
                f"(grid {grid[0]}x{grid[1]}); give 1..{n_patches} or a fraction in (0, 1]"
            )
        return Schedule("layer", L, layer=layer, keep=keep)  # type: ignore[arg-type]
    target = _fraction(flops, "flops")
    cands = [Schedule("layer", L, layer=layer, keep=k) for k in range(1, n_patches + 1)]
    best = min(cands, key=lambda s: abs(total(s) / full - target))
    floor = total(cands[0]) / full
    if target < floor - 0.02:
        raise BudgetError(
            f"flops={target} is unreachable with one reduction after layer {layer} (at least {floor:.2f}); "
            "choose an earlier site='layer:k'"
        )
    return best


def _fraction(v: object, what: str) -> float:
    if not _is_num(v) or not 0 < float(v) <= 1:  # type: ignore[arg-type]
        raise BudgetError(f"{what}={v!r} must be a fraction in (0, 1]")
    return float(v)  # type: ignore[arg-type]


def flops_fraction(s: Schedule, dims: EncoderDims, grid: tuple[int, int], input_patches: int | None = None):
    n = grid[0] * grid[1]
    counts, out = tokens_per_layer(s, n, dims.num_protected, input_patches)
    full = encoder_flops([n + dims.num_protected] * dims.num_layers, n, dims)
    return encoder_flops(counts, input_patches or n, dims, out) / full


@dataclass(frozen=True)
class Request:
    """What the caller of ``apply()`` asked for, besides the method: the budget, the site and the options."""

    r: int | list[int] | tuple[int, float] | None = None
    keep: float | int | None = None
    flops: float | None = None
    site: str | None = None
    unmerge: bool = False
    prop_attn: bool | None = None  # None: the runtime's default (encoders: on; denoisers: off)
    image_size: int | tuple[int, int] | None = None
    # a calibrated schedule's planner (tokenthin.calibrate): (dims, grid, resized patches for a share) -> Schedule,
    # instead of r / keep / flops
    plan: Callable[[EncoderDims, tuple[int, int], Callable[[float], int]], Schedule] | None = None
