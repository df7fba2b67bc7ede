"""A calibrated per-layer schedule: what :func:`tokenthin.calibrate` found, saved to / loaded from JSON, and re-solved
for each input shape the model is fed (``tokenthin.apply(model, method, schedule=sched)``).

How a schedule carries over to other input sizes (budgets are per input):

* merging (site ``layers``): the schedule is stored as integer ``r`` per layer for the calibrated patch count ``N``;
  for an input with ``N'`` patches the tokens left after each layer are kept at the same *fraction* of the input's
  patches (``n'_i = round(n_i / N * N')``, clamped so that a layer merges at most half of its tokens), then turned
  back into integer ``r``. At the calibrated size this gives back exactly the stored ``r``.
* single-site pruning (site ``layer:k``): the site ``k`` is kept and ``keep`` is a fraction of the input's patches.
* vision-language models (sites ``output``, ``llm`` (``llm:k``), ``output+llm``): ``keep`` is a fraction of each
  prompt's visual tokens (before the language model) or of those that entered it (``llm:k``), so it carries over to
  any prompt; ``params`` hold the method parameters the search chose (AIM's ``start`` / ``step``, ToDRE's
  ``llm_layer`` / ``llm_keep``) and ``llm`` the in-LLM points they give on this language model.
* resize and merge (``resize-tome``, joint calibration): ``input_keep`` is the share of the input's patches the image
  is resized to (the downsampling baseline's rule: each side scaled by its square root, aspect ratio kept), so another
  input is resized to the same share; ``r`` is for the resized image's ``resized_patches`` patches and re-solved as
  above for the resized patch count of the other input.

The FLOPs fraction a schedule reaches at another size differs slightly from the calibrated one (attention's share
grows with the token count); calibrate again at the size you serve for the best fidelity per FLOP.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..budget import Schedule, flops_fraction
from ..errors import BudgetError
from ..flops import EncoderDims
from ..methods.downsample import scaled_size

FORMAT = "tokenthin.calibrated_schedule"
VERSION = 2  # 2: vision-language sites (output, llm, output+llm) and input_keep / resized_patches (resize-tome);
# version 1 files still load
READS = (1, 2)
VLM_SITES = ("output", "llm", "output+llm")


@dataclass(frozen=True)
class CalibratedSchedule:
    """A per-layer budget found on calibration images (see :func:`tokenthin.calibrate`).

    ``site``: ``"layers"`` (``r`` tokens merged after each layer but the last) or ``"layer"`` (one reduction after
    encoder layer ``layer`` keeping the fraction ``keep`` of the patches). ``grid`` / ``image_size``: the input it
    was calibrated for. ``flops_target`` / ``flops``: asked and reached (analytic fraction of the unreduced encoder at
    that size). ``fidelity``: the ``objective`` on the calibration images (1.0: identical to the unreduced model);
    ``baseline_fidelity`` / ``baseline``: the same for the method's default solve of ``flops=flops_target`` (None
    where that solve fails). ``seconds`` / ``images`` / ``forwards``: the search's cost. ``input_keep`` (site
    ``layers`` only): the image is first resized to about this share of its patches, ``resized_patches`` of them at
    the calibrated size (None: the image as given).

    Vision-language models (:mod:`tokenthin.calibration.vlm`): ``site`` ``"output"``, ``"llm"`` (after language-model
    layer ``layer``) or ``"output+llm"``; ``keep`` the fraction of visual tokens (of the prompt's, or of those that
    entered the language model at ``llm``); ``llm`` the resolved in-LLM (layer, keep) points; ``num_layers`` /
    ``hidden`` the language model's; ``flops`` a fraction of the language model's prefill FLOPs on the calibration
    prompts; ``grid`` / ``protected`` unused (0); ``samples`` the calibration batches, ``images`` their prompts;
    ``text_tokens`` / ``visual_tokens`` the mean tokens per calibration prompt.
    """

    method: str
    site: str
    num_layers: int
    flops_target: float
    flops: float
    objective: str
    fidelity: float
    search: str
    grid: tuple[int, int] = (0, 0)
    protected: int = 0
    r: tuple[int, ...] | None = None
    layer: int | None = None
    keep: float | None = None
    params: dict[str, Any] = field(default_factory=dict)
    image_size: tuple[int, int] | None = None
    host: str = ""
    hidden: int = 0
    baseline: str | None = None
    baseline_fidelity: float | None = None
    seconds: float = 0.0
    images: int = 0
    forwards: int = 0
    llm: tuple[tuple[int, float], ...] = ()
    samples: int = 0
    text_tokens: float = 0.0
    visual_tokens: float = 0.0
    input_keep: float | None = None
    resized_patches: int | None = None
    version: int = VERSION

    def __post_init__(self) -> None:
        if (self.input_keep is None) != (self.resized_patches is None) or (
            self.input_keep is not None and (self.site != "layers" or not 0 < self.input_keep <= 1)
        ):
            raise BudgetError(
                "a resized schedule needs site 'layers', input_keep in (0, 1] and resized_patches together; got "
                f"site {self.site!r}, input_keep {self.input_keep!r}, resized_patches {self.resized_patches!r}"
            )
        if self.site == "layers":
            if self.r is None or len(self.r) != self.num_layers - 1:
                raise BudgetError(f"a 'layers' schedule needs {self.num_layers - 1} values of r, got {self.r!r}")
        elif self.site == "layer":
            if self.layer is None or self.keep is None or not 0 < self.keep <= 1:
                raise BudgetError(
                    f"a 'layer' schedule needs a layer and a keep fraction, got {self.layer}, {self.keep}"
                )
        elif self.site in VLM_SITES:
            if self.keep is None or not 0 < self.keep <= 1 or (self.site == "llm") != (self.layer is not None):
                raise BudgetError(
                    f"a vision-language '{self.site}' schedule needs a keep fraction in (0, 1]"
                    + (" and a language-model layer" if self.site == "llm" else "")
                    + f", got layer={self.layer}, keep={self.keep}"
                )
        else:
            raise BudgetError(
                f"a calibrated schedule's site is 'layers', 'layer' (encoders), or {', '.join(VLM_SITES)} "
                f"(vision-language models), not {self.site!r}"
            )
        if self.site in ("layers", "layer") and min(self.grid) < 1:
            raise BudgetError(f"an encoder schedule needs the calibrated patch grid, got {self.grid}")

    @property
    def is_vlm(self) -> bool:
        """A vision-language model's schedule (language-model side), not a vision encoder's."""
        return self.site in VLM_SITES

    # ----- what it plans -----
    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def site_name(self) -> str:
        """The site as ``apply(site=...)`` spells it."""
        if self.site in ("layer", "llm"):
            return f"{self.site}:{self.layer}"
        return self.site

    @property
    def input_patches(self) -> int:
        """Patches entering the first layer at the calibrated size (after the resize, if any)."""
        return self.patches if self.resized_patches is None else self.resized_patches

    def tokens(self) -> list[int]:
        """Patch tokens entering each layer at the calibrated size (site ``layers``)."""
        n, out = self.input_patches, []
        for i in range(self.num_layers):
            out.append(n)
            if self.r is not None and i < self.num_layers - 1:
                n -= self.r[i]
        return out

    def resized(self, grid: tuple[int, int], input_patches: Callable[[float], int] | None = None) -> int:
        """Patches entering the first layer for an input with this grid: ``input_patches(input_keep)`` (the
        method's resize, as the runtime computes it), by default the downsampling baseline's rule on the grid."""
        if self.input_keep is None:
            return grid[0] * grid[1]
        if input_patches is not None:
            return input_patches(self.input_keep)
        gh, gw = scaled_size(grid[0], grid[1], 1, self.input_keep)
        return gh * gw

    def for_grid(self, grid: tuple[int, int], input_patches: Callable[[float], int] | None = None) -> Schedule:
        """The plain :class:`~tokenthin.budget.Schedule` for an input with this patch grid (``input_patches``: the
        resized patch count for a share, where the schedule resizes; see :meth:`resized`)."""
        L = self.num_layers
        if self.site == "layer":
            assert self.keep is not None
            return Schedule("layer", L, layer=self.layer, keep=self.keep)
        n_new = self.resized(grid, input_patches)
        frac = [n / self.input_patches for n in self.tokens()]
        n, rs = n_new, []
        for i in range(L - 1):
            want = round(frac[i + 1] * n_new)
            nxt = max(n - n // 2, min(n, want))  # one layer merges at most half of its tokens
            rs.append(n - nxt)
            n = nxt
        return Schedule("layers", L, r=tuple(rs), input_keep=self.input_keep)

    def planner(
        self, dims: EncoderDims, grid: tuple[int, int], input_patches: Callable[[float], int] | None = None
    ) -> Schedule:
        """What the runtime calls for each input shape: checks the model, then :meth:`for_grid`."""
        if dims.num_layers != self.num_layers or (self.hidden and dims.hidden != self.hidden):
            raise BudgetError(
                f"this schedule was calibrated on a model with {self.num_layers} layers of width {self.hidden} "
                f"({self.host or 'unknown host'}); this model has {dims.num_layers} of width {dims.hidden}: "
                "calibrate again on this model (tokenthin.calibrate)"
            )
        return self.for_grid(grid, input_patches)

    def flops_at(
        self, dims: EncoderDims, grid: tuple[int, int], input_patches: Callable[[float], int] | None = None
    ) -> float:
        """Analytic FLOPs fraction this schedule reaches on an input with this grid."""
        s = self.for_grid(grid, input_patches)
        ip = None if self.input_keep is None else self.resized(grid, input_patches)
        return flops_fraction(s, dims, grid, ip)

    def describe(self) -> str:
        plan = f"r={list(self.r or ())}" if self.site == "layers" else f"site={self.site_name} keep={self.keep:.4f}"
        if self.input_keep is not None:
            plan = f"resized to {self.resized_patches} patches (input_keep={self.input_keep}), {plan}"
        if self.is_vlm:
            plan += (f" {self.params}" if self.params else "") + (
                f" llm points {list(self.llm)}" if self.site == "output+llm" else ""
            )
            where = (
                f"a {self.num_layers}-layer language model ({self.visual_tokens:.0f} visual + {self.text_tokens:.0f} "
                "text tokens per prompt)"
            )
            cost = f"{self.samples} batches, {self.images} prompts"
        else:
            where, cost = f"{self.grid[0]}x{self.grid[1]} patches", f"{self.images} images"
        return (
            f"{self.method} calibrated ({self.search}, {self.objective}) for {where}: "
            f"{plan}; flops {self.flops:.3f} (target {self.flops_target}), fidelity {self.fidelity:.4f}"
            + (f" vs default {self.baseline_fidelity:.4f}" if self.baseline_fidelity is not None else "")
            + f"; {self.seconds:.1f} s on {cost} ({self.forwards} forwards)"
        )

    # ----- JSON -----
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("grid", "image_size", "r"):
            if d[k] is not None:
                d[k] = list(d[k])
        d["llm"] = [list(p) for p in self.llm]
        return {"format": FORMAT, **d}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CalibratedSchedule:
        if d.get("format") != FORMAT:
            raise BudgetError(f"not a tokenthin calibrated schedule (format {d.get('format')!r}, expected {FORMAT!r})")
        if d.get("version") not in READS:
            raise BudgetError(
                f"calibrated schedule version {d.get('version')!r}; this tokenthin reads versions "
                f"{', '.join(map(str, READS))}: calibrate again with this version"
            )
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names - {"format"}
        if unknown:
            raise BudgetError(f"unknown fields in a calibrated schedule: {sorted(unknown)}")
        kw = {k: v for k, v in d.items() if k in names}
        for k in ("grid", "image_size", "r"):
            if kw.get(k) is not None:
                kw[k] = tuple(kw[k])
        kw["llm"] = tuple((int(k), v) for k, v in kw.get("llm", ()))
        kw["version"] = VERSION  # an older file is read as this version (the fields it lacks take their defaults)
        return cls(**kw)

    def save(self, path: str | Path) -> Path:
        p = Path(path)
        p.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return p

    @classmethod
    def load(cls, path: str | Path) -> CalibratedSchedule:
        p = Path(path)
        try:
            d = json.loads(p.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise BudgetError(f"cannot read a calibrated schedule from {p}: {e}") from e
        if not isinstance(d, dict):
            raise BudgetError(f"{p} holds no calibrated schedule (a JSON object is expected)")
        return cls.from_dict(d)
