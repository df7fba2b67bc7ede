"""``tokenthin.calibrate`` on a vision-language model (LLaVA, LLaVA-NeXT, Qwen2-VL, Qwen2.5-VL): the site and keep
of a pruning / merging method on the language-model side, or a two-stage method's in-LLM schedule, under a target
fraction of the language model's prefill FLOPs (:mod:`tokenthin.vlm.cost`, FastV's count: decoder layers only), for
the most faithful next-token prediction on calibration prompts.

What is searched:

* single-site methods (``fastv`` at ``llm:k``; methods that read only the tokens and so also run inside the
  language model, such as ``divprune``, ``kcenter``, ``coverage``, ``random``, at ``output`` and every ``llm:k``):
  every site the method takes on this host (one where it refuses to run, such as ``pool`` inside the language model,
  is skipped), each with the largest keep fraction that meets the target there (solved on the calibration
  prompts' text / visual token counts, at least one visual token kept per prompt). This is G-Search's question
  (arXiv 2412.00556: where, inside the MLLM, and how many tokens) restricted to one reduction point, as FastV has
  one.
* methods that only work before the language model (``visionzip``, ``fastervlm``, ...): nothing to search; the one
  candidate is ``output`` with the keep that meets the target (accepted, so that a FLOPs target works on a VLM at
  all; its fidelity is measured and reported).
* two-stage methods (site ``output+llm``: ``aim``, ``todre``): the in-LLM parameters the method lists in
  ``llm_search`` (AIM: the first pruning layer ``start`` over every layer and the per-layer ``step`` over 0.125 /
  0.25 / 0.5; ToDRE: the layer ``llm_layer`` over every layer and ``llm_keep`` over 0 / 0.25 / 0.5), each with the
  output-stage keep solved for the target; a parameter you pass to ``calibrate`` is fixed, not searched (so
  ``aim`` with ``official=True`` keeps the release's schedule only with ``start=`` given).
* in every case the method's default (its default site / parameters, keep solved for the target) is a candidate
  and reported as the baseline; the result is never less faithful than it on the calibration prompts.

Objective (1.0: identical to the unreduced model): ``"logits"`` (the default) the cosine of the language model's
last-position logits, ``"kl"`` ``exp(-KL(p_full || p_reduced))`` of the next-token distributions, ``"hidden"`` the
cosine of the final hidden state at the last position (it asks the model for every layer's hidden states: more
memory than the other two, which run the head on the last position only); a mean over the calibration prompts.

Not searched: sites inside the vision tower (``layers`` / ``layer:k`` on LLaVA), several reduction points of a
single-site method, and per-prompt budgets. Quality on real weights is not measured here (no VLM weights exist on
this project's machines): the search is tested on tiny random models only.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import api
from ..adapters.hf_vlm import VLMAdapter
from ..errors import BudgetError, InputMismatchError, SiteError, TokenThinError
from ..flops import LMDims
from ..vlm.cost import min_visual, prefill_fraction
from ..vlm.schedule import VLMSchedule, parse_vlm_site
from .schedule import CalibratedSchedule

VLM_OBJECTIVES = ("auto", "logits", "kl", "hidden")
Prompts = list[tuple[int, int]]  # (text, visual) tokens of each calibration prompt


@dataclass(frozen=True)
class Candidate:
    """One point of the search: ``apply(model, method, site=site, keep=keep, **params)``."""

    site: str
    keep: float
    params: tuple[tuple[str, Any], ...] = ()

    def kwargs(self) -> dict[str, Any]:
        return {"site": self.site, "keep": self.keep, **dict(self.params)}


def check_samples(samples: Any) -> list[dict[str, Any]]:
    """``samples``: one processor output (a mapping of tensors: ``input_ids``, ``pixel_values`` and what the host
    needs, e.g. ``attention_mask``, ``image_sizes``, ``image_grid_thw``) or a list of them, each a batch of prompts
    with images, fed as ``model(**sample)``."""
    batches = [samples] if isinstance(samples, Mapping) else samples
    how = (
        "give samples= as a processor output or a list of them, e.g. [processor(images=img, text=prompt, "
        "return_tensors='pt'), ...] (each a batch of prompts with their images)"
    )
    if not isinstance(batches, Sequence) or isinstance(batches, (str, bytes)) or not batches:
        raise InputMismatchError(f"a vision-language model calibrates on prompts with images: {how}")
    out = []
    for i, b in enumerate(batches):
        if not isinstance(b, Mapping) or not isinstance(b.get("input_ids"), torch.Tensor):
            raise InputMismatchError(f"samples[{i}] has no input_ids tensor: {how}")
        if b.get("pixel_values") is None:
            raise InputMismatchError(f"samples[{i}] has no pixel_values: every calibration prompt needs an image")
        if "labels" in b:
            raise InputMismatchError(f"samples[{i}] holds labels; drop them (the objective compares predictions)")
        out.append(dict(b))
    return out


def _on(batch: dict[str, Any], param: torch.Tensor) -> dict[str, Any]:
    out = {}
    for k, v in batch.items():
        if isinstance(v, torch.Tensor):
            v = v.to(param.device, dtype=param.dtype if v.is_floating_point() else v.dtype)
        out[k] = v
    return out


class Fidelity:
    """The objective on the calibration batches, cached by candidate; ``forwards`` counts passes over them."""

    def __init__(
        self, model: nn.Module, method: str, batches: list[dict[str, Any]], objective: str, seed: int, bar: Any
    ) -> None:
        self.model, self.method, self.batches, self.seed, self.bar = model, method, batches, seed, bar
        self.objective = "logits" if objective == "auto" else objective
        self.cache: dict[Candidate, float] = {}
        self.forwards = 0
        # the head on the last position only (what the objective reads), where the model's forward takes it
        takes = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.extra = {"logits_to_keep": 1} if takes and self.objective != "hidden" else {}
        self.ref = self._run()

    @torch.no_grad()
    def _run(self) -> torch.Tensor:
        rows = []
        hidden = self.objective == "hidden"
        for b in self.batches:
            out = self.model(**b, use_cache=False, output_hidden_states=hidden, **self.extra)
            if not hidden and getattr(out, "logits", None) is None:
                raise TokenThinError(
                    f"{type(self.model).__name__} returns no logits (a multimodal model without its language-model "
                    f"head); calibrate the ...ForConditionalGeneration model, or use objective='hidden'"
                )
            rows.append((out.hidden_states[-1] if hidden else out.logits)[:, -1].float())
        self.forwards += 1
        return torch.cat(rows)

    def __call__(self, c: Candidate) -> float:
        if c not in self.cache:
            torch.manual_seed(self.seed)
            with api.applied(self.model, self.method, **c.kwargs()):
                got = self._run()
            if self.objective == "kl":
                logp, logq = F.log_softmax(self.ref, -1), F.log_softmax(got, -1)
                v = torch.exp(-(logp.exp() * (logp - logq)).sum(-1)).mean().item()
            else:
                v = F.cosine_similarity(got, self.ref, dim=-1).mean().item()
            self.cache[c] = v
            self.bar.update(1)
            self.bar.set_postfix(site=c.site, keep=f"{c.keep:.3f}", fidelity=f"{v:.4f}")
        return self.cache[c]


@torch.no_grad()
def prompt_tokens(model: nn.Module, batches: list[dict[str, Any]]) -> Prompts:
    """(text, visual) tokens of every calibration prompt: visual as the runtime counts its candidates (row-end
    structure tokens count as text: they always stay), from one pass with nothing reduced (``random`` keeping all)."""
    out: Prompts = []
    with api.applied(model, "random", keep=1.0, site="output"):
        rt = api.runtime_of(model)
        for b in batches:
            model(**b, use_cache=False)
            assert rt.last is not None
            ids, mask = b["input_ids"], b.get("attention_mask")
            lengths = mask.sum(1).tolist() if isinstance(mask, torch.Tensor) else [ids.shape[1]] * ids.shape[0]
            out += [(int(n) - v, v) for n, v in zip(lengths, rt.last.visual_tokens)]
    return out


def _shapes(cls: Any, params: dict[str, Any], num_layers: int) -> list[tuple[str | None, dict[str, Any]]]:
    """(site, searched parameters) pairs, the keep left to solve; the method's default first."""
    out: list[tuple[str | None, dict[str, Any]]] = [(None, {})]
    if "output+llm" in cls.sites:
        grid: list[dict[str, Any]] = [{}]
        for name, values in cls.llm_search.items():
            if name in params:
                continue
            vals = range(num_layers - 1) if values == "layers" else values
            grid = [{**g, name: v} for g in grid for v in vals]
        return out + [("output+llm", g) for g in grid if g]
    return out + [(s, {}) for s in ["output", *(f"llm:{k}" for k in range(num_layers - 1))]]


def _solve(
    cls: Any, params: dict, site: str | None, extra: dict, target: float, prompts: Prompts, dims: LMDims
) -> tuple[float, VLMSchedule] | None:
    """The largest keep fraction that meets ``target`` at ``site`` (None: the site does not exist or cannot)."""
    m = cls(**params, **extra)
    L = dims.num_layers

    def sched(f: float) -> VLMSchedule:
        return parse_vlm_site(site, f, L, m)

    try:
        s1 = sched(1.0)
    except SiteError:
        return None
    if s1.output_keep is None:  # one point inside the language model: keep at least one visual token
        lo = 1.0 / max(1, min(v for _, v in prompts))
        if min_visual(prompts, sched(lo), L) < 1:
            return None
    else:
        lo = 1e-6
    if prefill_fraction(prompts, s1, dims) <= target:
        return 1.0, s1
    if prefill_fraction(prompts, sched(lo), dims) > target or lo >= 1.0:
        return None
    hi = 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if prefill_fraction(prompts, sched(mid), dims) <= target else (lo, mid)
    return lo, sched(lo)


def check_method(cls: Any) -> None:
    """Refuse what cannot be calibrated on a vision-language model, saying why."""
    if cls.resizes_input:
        raise TokenThinError(
            f"method '{cls.name}' chooses a vision encoder's input size under flops=, which a vision-language model's "
            "calibration does not search; calibrate a pruning or merging method (e.g. fastv, divprune, aim)"
        )
    if cls.kind not in ("prune", "merge"):
        raise TokenThinError(
            f"method '{cls.name}' ({cls.kind}) does not reduce the visual tokens a language model reads; calibrate a "
            "pruning or merging method (e.g. fastv, divprune, aim)"
        )
    if not ({"output", "layer", "llm", "output+llm"} & set(cls.sites)):
        raise SiteError(
            f"method '{cls.name}' has no site a vision-language model offers (its sites: {', '.join(cls.sites)}); "
            "calibration there searches output, llm:k and output+llm"
        )


def calibrate_vlm(
    model: nn.Module,
    adapter: VLMAdapter,
    cls: Any,
    params: dict[str, Any],
    targets: list[float],
    samples: Any,
    *,
    images: Any = None,
    search: str = "greedy",
    objective: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> list[CalibratedSchedule]:
    """The search of the module docstring, one schedule per target (``tokenthin.calibrate`` checked the targets
    and the method's parameters)."""
    if images is not None:
        raise InputMismatchError(
            f"{type(model).__name__} is a vision-language model: it calibrates on prompts with images, not pixel "
            "values alone; pass samples=[processor(images=..., text=..., return_tensors='pt'), ...] instead of images="
        )
    if samples is None:
        raise InputMismatchError(
            "give calibration prompts with images: samples=[processor(images=..., text=..., return_tensors='pt'), ...]"
        )
    if search != "greedy":
        raise TokenThinError(
            f"search={search!r} shapes a vision encoder's per-layer curve; on a vision-language model every site "
            "(or the two-stage schedule's grid) is tried: drop search="
        )
    if hasattr(cls, "calibrate"):
        raise TokenThinError(f"method '{cls.name}' calibrates its own thresholds and is not supported on VLMs yet")
    if objective not in VLM_OBJECTIVES:
        raise TokenThinError(
            f"on a vision-language model objective is one of {', '.join(VLM_OBJECTIVES)}; got {objective!r}"
        )
    check_method(cls)
    param = next(model.parameters())
    batches = [_on(b, param) for b in check_samples(samples)]
    dims = adapter.lm_dims()
    L = dims.num_layers
    shapes = _shapes(cls, params, L)
    t0 = time.perf_counter()
    what = ", ".join(f"{t:g}" for t in targets)
    bar = tqdm(total=len(shapes) * len(targets), desc=f"calibrate {cls.name} @ {what} LM FLOPs", disable=not progress)
    results = []
    try:
        prompts = prompt_tokens(model, batches)
        fid = Fidelity(model, cls.name, batches, objective, seed, bar)
        for t in targets:
            found = []
            for site, extra in shapes:
                solved = _solve(cls, params, site, extra, t, prompts, dims)
                if solved is None:
                    continue
                keep, s = solved
                name = site or ("output+llm" if "output+llm" in cls.sites else s.site)
                c = Candidate(name, keep, tuple(sorted({**params, **extra}.items())))
                try:
                    v = fid(c)
                except SiteError:  # the method cannot run there on this host (e.g. a grid method inside the LLM)
                    continue
                found.append((c, s, v, site is None))
            if not found:
                raise BudgetError(
                    f"flops={t} of the language model's prefill is unreachable for '{cls.name}' on these prompts "
                    "(text tokens stay, at least one visual token is kept at a single site): use a larger target"
                )
            base = next((f for f in found if f[3]), None)
            best = max(found, key=lambda f: f[2])  # ties: the first, the default
            results.append((t, best, base))
    finally:
        bar.close()
    seconds = time.perf_counter() - t0
    n = max(1, len(prompts))
    out = []
    for t, (c, s, v, _), base in results:
        site = "llm" if c.site.startswith("llm:") else c.site
        chosen = dict(c.params)
        out.append(
            CalibratedSchedule(
                method=cls.name,
                site=site,
                num_layers=L,
                flops_target=float(t),
                flops=prefill_fraction(prompts, s, dims),
                objective=fid.objective,
                fidelity=v,
                search="sites" if "output+llm" not in cls.sites else "grid",
                layer=s.llm[0][0] if site == "llm" else None,
                keep=float(c.keep),
                params=chosen,
                host=adapter.family,
                hidden=dims.hidden,
                baseline=None if base is None else f"site={base[0].site} keep={base[0].keep:.4f} (default)",
                baseline_fidelity=None if base is None else base[2],
                seconds=seconds,
                images=len(prompts),
                forwards=fid.forwards + 1,
                llm=tuple((int(k), float(f)) for k, f in s.llm),
                samples=len(batches),
                text_tokens=sum(t_ for t_, _ in prompts) / n,
                visual_tokens=sum(v_ for _, v_ in prompts) / n,
            )
        )
    return out


def vlm_apply_args(schedule: CalibratedSchedule, adapter: VLMAdapter) -> tuple[str, float, dict[str, Any]]:
    """(site, keep, parameters) that ``apply(model, method, schedule=...)`` runs on a vision-language model, after
    checking that the schedule was calibrated on a language model of this shape."""
    L, hidden = len(adapter.lm_layers), adapter.lm_dims().hidden
    if not schedule.is_vlm:
        raise TokenThinError(
            "this schedule was calibrated on a vision encoder; on a vision-language model calibrate with "
            "tokenthin.calibrate(model, method, flops=..., samples=[processor outputs])"
        )
    if schedule.num_layers != L or (schedule.hidden and schedule.hidden != hidden):
        raise BudgetError(
            f"this schedule was calibrated on a language model with {schedule.num_layers} layers of width "
            f"{schedule.hidden} ({schedule.host or 'unknown host'}); this one has {L} of width {hidden}: calibrate "
            "again on this model (tokenthin.calibrate)"
        )
    assert schedule.keep is not None
    return schedule.site_name, float(schedule.keep), dict(schedule.params)
