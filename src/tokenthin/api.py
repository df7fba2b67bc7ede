"""Public API: apply(), remove(), applied(), info(), methods(), explain()."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from . import budget as _budget
from .adapters.denoiser import DenoiserAdapter, denoiser_of
from .adapters.registry import all_adapters, find_adapter
from .denoise import build as _build_denoiser
from .errors import AlreadyAppliedError, InputMismatchError, NotAppliedError, TokenThinError
from .methods.base import all_methods, get
from .runtime import Runtime, TokenInfo
from .runtime import build as _build_encoder
from .vlm.setup import build as _build_vlm

_APPLIED: weakref.WeakKeyDictionary[nn.Module, Any] = weakref.WeakKeyDictionary()  # Runtime | VLMRuntime | ...
# the runtime kinds an adapter can ask for (Adapter.kind); hosts are plug-ins, these runtimes are the core
_BUILD = {"encoder": _build_encoder, "vlm": _build_vlm, "denoiser": _build_denoiser}


def _module(model: Any) -> nn.Module:
    """The module tokenthin acts on: ``model`` itself, or the denoiser of a whole diffusion pipeline."""
    inner = denoiser_of(model)
    return model if inner is None else inner


def apply(
    model: Any,
    method: str,
    *,
    r: int | list[int] | tuple[int, float] | None = None,
    keep: float | int | None = None,
    flops: float | None = None,
    site: str | None = None,
    unmerge: bool = False,
    prop_attn: bool | None = None,
    calibration: torch.Tensor | None = None,
    image_size: int | tuple[int, int] | None = None,
    replace: bool = False,
    schedule: Any = None,
    **params: Any,
) -> nn.Module:
    """Apply a token-reduction method to ``model`` in place and return it.

    Budgets (exactly one): ``r`` tokens merged after every layer (int, per-layer list, or ToMe's ``(r, inflect)``),
    ``keep`` patch tokens kept at a single site (fraction in (0, 1] or count), or ``flops`` a target fraction of
    the encoder's analytic FLOPs. Budgets are resolved for the token count each forward call actually sees (one
    plan per input shape, cached). ``site``: ``"layers"``, ``"layer:k"``, ``"output"`` or ``"input"`` (default:
    the method's; vision-language hosts also ``"llm:k"``). ``unmerge=True`` returns a full per-patch
    ``last_hidden_state`` (dense tasks). ``calibration``: pixel values for methods that calibrate (``dtome``).
    ``image_size``: an optional hint, the input size ``explain()`` and apply-time checks plan for (default: the
    model config's). ``prop_attn``: proportional attention after merging (default: on for encoders, off for
    denoisers, as tomesd). ``schedule``: a :class:`tokenthin.calibration.CalibratedSchedule` (or the path of one
    saved as JSON) found by :func:`tokenthin.calibrate`, instead of ``r`` / ``keep`` / ``flops`` / ``site``; re-solved
    for each input shape (per-layer token fractions of the input's patches); its method parameters are used, and
    its calibrated input size is the default ``image_size``; a vision-language model's schedule gives the site, the
    keep fraction and the parameters the search chose.
    Diffusion denoisers (a UNet, or a whole pipeline: its ``unet`` / ``transformer`` is reduced and the pipeline
    returned) take ``ratio=`` (tomesd's parameter) or ``keep=`` (``1 - ratio``) at site ``"block"``.
    Other keyword arguments are the method's parameters.
    """
    given = model
    model = _module(model)
    if model in _APPLIED:
        if not replace:
            cur = _APPLIED[model]
            raise AlreadyAppliedError(
                f"tokenthin is already applied to this model (method '{cur.method.name}'); call "
                "tokenthin.remove(model) first, or pass replace=True to re-configure"
            )
        remove(model)
    cls = get(method)
    adapter = find_adapter(model)
    plan = None
    if schedule is not None:
        sched = _calibrated(schedule, cls.name, adapter.kind, r=r, keep=keep, flops=flops, site=site, params=params)
        if adapter.kind == "vlm":
            from .calibration.vlm import vlm_apply_args

            site, keep, params = vlm_apply_args(sched, adapter)  # type: ignore[arg-type]
        else:
            params, site, plan = dict(sched.params), sched.site_name, sched.planner
            image_size = sched.image_size if image_size is None else image_size  # explain() shows the calibrated plan
    m = cls(**params)
    req = _budget.Request(
        r=r, keep=keep, flops=flops, site=site, unmerge=unmerge, prop_attn=prop_attn, image_size=image_size, plan=plan
    )
    rt = _BUILD[adapter.kind](model, adapter, cls, m, req)
    rt.attach()
    _APPLIED[model] = rt
    try:
        if hasattr(m, "calibrate"):
            if calibration is None:
                raise TokenThinError(
                    f"method '{cls.name}' calibrates on inputs: pass calibration=pixel_values "
                    "(a batch of typical inputs, e.g. 16-64 images)"
                )
            _check_input(model, calibration)
            m.calibrate(lambda: _run_calibration(model, rt, calibration))
            if flops is not None and hasattr(m, "fit_flops"):  # thresholds meeting the target (dtome's docstring)
                m.fit_flops(float(flops), lambda: _realised_flops(model, rt, calibration))
        elif calibration is not None:
            raise TokenThinError(f"method '{cls.name}' does not calibrate; drop calibration=")
    except BaseException:
        remove(model)
        raise
    return given


def _calibrated(schedule: Any, method: str, kind: str, *, params: dict, **budget: Any) -> Any:
    """The calibrated schedule behind ``apply(schedule=...)``, checked against the rest of the call."""
    from pathlib import Path

    from .calibration.schedule import CalibratedSchedule

    if isinstance(schedule, (str, Path)):
        schedule = CalibratedSchedule.load(schedule)
    if not isinstance(schedule, CalibratedSchedule):
        raise TokenThinError(
            f"schedule= takes a CalibratedSchedule (from tokenthin.calibrate) or the path of one saved as JSON; got "
            f"{type(schedule).__name__}"
        )
    given = [k for k, v in budget.items() if v is not None]
    if given:
        raise TokenThinError(
            f"schedule= is the whole budget and site; drop {', '.join(f'{k}=' for k in given)} (or drop schedule=)"
        )
    if schedule.method != method:
        raise TokenThinError(
            f"this schedule was calibrated for method '{schedule.method}', not '{method}': apply '{schedule.method}' "
            f"with it, or calibrate '{method}' (tokenthin.calibrate(model, '{method}', flops=..., images=...))"
        )
    if kind not in ("encoder", "vlm"):
        raise TokenThinError(
            f"calibrated schedules are for vision encoders and vision-language models; this model runs a {kind} runtime"
        )
    if kind == "encoder" and schedule.is_vlm:
        raise TokenThinError(
            f"this schedule was calibrated on a vision-language model (site {schedule.site_name}); on this vision "
            "encoder calibrate again: tokenthin.calibrate(model, method, flops=..., images=pixel_values)"
        )
    clash = {k: v for k, v in params.items() if schedule.params.get(k, v) != v or k not in schedule.params}
    if clash:
        raise TokenThinError(
            f"the schedule was calibrated with parameters {schedule.params}; drop {sorted(clash)} from apply() or "
            "calibrate again with them"
        )
    return schedule


def _check_input(model: nn.Module, x: torch.Tensor) -> None:
    p = next(model.parameters())
    if x.device != p.device:
        raise InputMismatchError(f"calibration images are on {x.device}, the model on {p.device}; move them")
    if not x.is_floating_point():
        raise InputMismatchError("calibration images must be float pixel values (normalised as the model expects)")


def _run_calibration(model: nn.Module, rt: Any, pixel_values: torch.Tensor) -> None:
    rt.calibrating = True
    try:
        with torch.no_grad():
            args, kwargs = rt.adapter.call_args(pixel_values.to(next(model.parameters()).dtype))
            rt.adapter.root(*args, **kwargs)
    finally:
        rt.calibrating = False


def _realised_flops(model: nn.Module, rt: Any, pixel_values: torch.Tensor) -> float:
    """The mean FLOPs fraction an inference pass over ``pixel_values`` realises (each image at its own counts)."""
    with torch.no_grad():
        args, kwargs = rt.adapter.call_args(pixel_values.to(next(model.parameters()).dtype))
        rt.adapter.root(*args, **kwargs)
    f = rt.last.flops_fraction if rt.last is not None else None
    if f is None:
        raise TokenThinError("this host reports no per-layer token counts, so flops= cannot be fitted; use r=")
    return f


def remove(model: Any) -> Any:
    """Remove tokenthin from ``model``; its outputs are exactly those of the untouched model again."""
    rt = _APPLIED.pop(_module(model), None)
    if rt is None:
        raise NotAppliedError("tokenthin is not applied to this model; nothing to remove")
    rt.detach()
    return model


@contextmanager
def applied(model: Any, method: str, **kwargs: Any) -> Iterator[Any]:
    """``with tokenthin.applied(model, "tome", r=8): ...`` applies on entry and removes on exit."""
    apply(model, method, **kwargs)
    try:
        yield model
    finally:
        if is_applied(model):
            remove(model)


def is_applied(model: Any) -> bool:
    return _module(model) in _APPLIED


def runtime_of(model: Any) -> Runtime:
    """The applied :class:`~tokenthin.runtime.Runtime` (advanced: its ``method``, ``schedule``, ``detach()`` /
    ``attach()`` to time the unreduced model in place, ``measure``/``overhead_s`` for tokenthin's own time)."""
    rt = _APPLIED.get(_module(model))
    if rt is None:
        raise NotAppliedError("tokenthin is not applied to this model")
    return rt


def info(model: Any) -> TokenInfo:
    """What the last forward call did: token counts per layer, sizes, padding mask and source map (a denoiser's:
    :class:`tokenthin.denoise.DenoiseInfo`, per block)."""
    rt = _APPLIED.get(_module(model))
    if rt is None:
        raise NotAppliedError("tokenthin is not applied to this model")
    if rt.last is None:
        raise TokenThinError("no forward call has run since tokenthin was applied")
    return rt.last


def methods() -> list[dict[str, Any]]:
    """Every registered method: name, paper, arXiv id, sites, parameters, one-line description."""
    out = []
    for name, cls in all_methods().items():
        out.append(
            {
                "name": name,
                "paper": cls.title,
                "arxiv": cls.arxiv,
                "kind": cls.kind,
                "sites": [{"layer": "layer:k", "llm": "llm:k"}.get(s, s) for s in cls.sites],
                "default_site": cls.default_site,
                "parameters": {k: {"default": p.default, "doc": p.doc} for k, p in cls.params.items()},
                "description": cls.summary,
            }
        )
    return out


def hosts() -> list[dict[str, Any]]:
    """Every registered host family (adapter): name, models, detection priority, runtime kind, sites, signals."""
    return [
        {
            "name": a.name,
            "families": a.families,
            "priority": a.priority,
            "kind": a.kind,
            "sites": sorted(a.sites),
            "signals": sorted(a.signals),
        }
        for a in all_adapters()
    ]


def support(method: str, host: str) -> str | None:
    """None when ``method`` can act on the host family ``host`` (a name from :func:`hosts`), else the reason."""
    cls = get(method)
    a = {h.name: h for h in all_adapters()}.get(host)
    if a is None:
        raise TokenThinError(f"unknown host '{host}'; hosts: {', '.join(h.name for h in all_adapters())}")
    if cls.runtimes and a.kind not in cls.runtimes:
        return "/".join(sorted(cls.runtimes)) + "s only"
    if issubclass(a, DenoiserAdapter) and cls.block_mode not in a.block_modes:
        return f"no {cls.block_mode} mode"
    if cls.needs_prompt and a.kind != "vlm":
        return "reads a prompt"
    common = set(cls.sites) & set(a.sites)
    if cls.resizes_input and "input" not in a.sites:
        return "no input site (it resizes the image)"
    if not common:
        return "no common site (" + "/".join(cls.sites) + ")"
    missing = cls.signals & {"keys", "cls_attn", "mean_attn"} - a.signals
    if missing:
        return "needs " + ", ".join(sorted(missing))
    if a.kind == "vlm" and hasattr(cls, "calibrate"):
        return "calibrates (encoders only)"
    return None


def explain(model: Any) -> dict[str, Any]:
    """Which modules would be touched, which sites exist and, if applied, the plan and its analytic FLOPs. One shape
    for every host: ``adapter``, ``family``, ``layers``, ``protected_tokens``, ``tokens`` (of the default input;
    None where the host has none), ``sites``, ``touched_modules``, ``host`` (per-host details) and ``applied``."""
    model = _module(model)
    rt = _APPLIED.get(model)
    a = rt.adapter if rt is not None else find_adapter(model)
    lay = getattr(a, "default_layout", None)
    out: dict[str, Any] = {
        "adapter": type(a).__name__,
        "family": a.family,
        "layers": a.num_layers_reduced,
        "protected_tokens": lay.protected if lay is not None else None,
        "tokens": lay.tokens if lay is not None else None,
        "sites": a.site_names(),
        "touched_modules": a.touched(),
        "host": a.describe(),
    }
    if lay is not None:
        out["patch_grid"] = lay.grid
    if rt is not None:
        out["applied"] = rt.describe()
    return out
