"""The method contract and registry.

A method is one paper's algorithm box: it receives tensors (a :class:`ReduceInput`) and returns a plan, a keep mask
plus merge targets (see :mod:`tokenthin.ops.assign`). It never touches a model; adapters know where the tensors come
from. A method declares

* ``kind``: ``"merge"`` (acts at every layer boundary with a per-layer ``r``, or once with a keep count),
  ``"prune"`` (acts once, with a keep count) or ``"input"`` (acts on the image before the encoder);
* ``sites``: which of ``"layers"`` (every boundary), ``"layer"`` (``"layer:k"``, after encoder layer k),
  ``"output"`` (after the last encoder layer; on a vision-language model: before the language model),
  ``"input"``, ``"llm"`` (``"llm:k"``, inside a language model after its layer k) and ``"output+llm"`` (two
  stages, see :meth:`Method.llm_points`) it supports;
* ``signals``: which of ``"keys"``, ``"cls_attn"``, ``"mean_attn"`` (the vision encoder) and ``"last_attn"``,
  ``"lm_attn"`` (a language model's attention, at ``llm`` sites) it reads, so adapters capture only those;
* ``params``: its own parameters with defaults and checks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..errors import BudgetError, TokenThinError, UnknownMethodError
from ..layout import Layout
from ..ops import assign
from ..ops.assign import Assignment
from ..ops.soft import SoftPlan


@dataclass(frozen=True)
class Param:
    """A method parameter: default, one-line doc and an optional check returning an error message or None."""

    default: Any
    doc: str
    check: Callable[[Any], str | None] | None = None


class SignalSource:
    """Lazily computed signals at one reduction point (implemented by the runtime)."""

    has_cls: bool = False  # a [CLS] token exists outside the reduced tokens (a VLM drops it; its attention remains)

    def keys(self, layer: int) -> torch.Tensor:  # (B, N, d_head) keys averaged over heads
        raise NotImplementedError

    def cls_attention(self, layer: int) -> torch.Tensor:  # (B, N)
        raise NotImplementedError

    def mean_attention(self, layer: int) -> torch.Tensor:  # (B, N)
        raise NotImplementedError

    def last_token_attention(self, layer: int) -> torch.Tensor:  # (B, N) inside a language model only
        raise TokenThinError("this signal exists only inside a language model (site 'llm:k')")

    def lm_attention_logits(self, layer: int) -> torch.Tensor:  # (B, H, T, T) inside a language model only
        raise TokenThinError("this signal exists only inside a language model (site 'llm:k')")

    def lm_attention_blocks(self, layer: int, floats: int = 1 << 20) -> Iterator[torch.Tensor]:
        """``lm_attention_logits`` a few heads at a time, (B, h, T, T) blocks of about ``floats`` values."""
        yield self.lm_attention_logits(layer)


@dataclass
class ReduceInput:
    """Everything a method sees at one reduction point.

    The optional fields after ``calibrating`` are filled by the host where they exist; a method that needs one
    checks it (``None``: the host has no such thing). On a vision-language host they come from the runtime's token
    map (:class:`tokenthin.adapters.hf_vlm.TokenMap`), laid out like ``x``'s tokens where they are per token:

    * ``site``: the vision-language stage, ``"output"`` (before the language model) or ``"llm"`` (inside it, after
      language-model layer ``layer``); ``""`` on encoder hosts (their site is in ``layer``);
    * ``view``: (B, N) long, the view each token belongs to: 0 the image (an AnyRes base view), k >= 1 its k-th
      crop, -1 padding; at ``llm`` all 0;
    * ``rows`` / ``cols``: (B, N) long, each token's row and column in its view's grid; the crops of an AnyRes image
      share one grid, the image's unpadded high-resolution grid with the crops tiled (-1: not on a grid, padding);
      None at ``llm`` and on encoder hosts (there ``grid`` says it all);
    * ``prompt_pos``: (B, N) long, each token's position in the sequence the language model holds at this point
      (the index into :meth:`SignalSource.lm_attention_logits`' last two axes);
    * ``text`` / ``text_valid``: (B, L, D) and (B, L) bool, the prompt's text-token embeddings (every non-image
      token of the sample's own prompt) as the language model reads them at this point;
    * ``tower_slot``: (B, N) long, on a host whose vision tower reduced already (sites ``layers`` / ``layer:k`` of a
      vision-language model): the tower slot each visual token belongs to (-1: dropped there);
    * ``fixed``: the fixed-count case (every sample has the same tokens, no padding, as ``torch.compile`` needs):
      the candidate count of every sample, known from the shapes. The runtime then passes ``keep`` as an int.
    * ``step``: (B,) float64 on CPU, on a denoiser: each sample's timestep value in this call (methods seed their
      randomness from it, so that a sample's plan does not depend on the batch it is in).
    * ``order``: (B, N) long, on an encoder host after an earlier reduction of this call returned an
      :class:`OrderedPlan` with an ``order`` (an official parity mode, e.g. ToMe's): each token's place in the
      token order the official code would hold now (0 first; padding last); None: positional order. The tokens
      themselves stay in positional order, so a method that splits by position (ToMe's alternate A / B) reads
      this to split as the official code does.
    """

    x: torch.Tensor  # (B, N, D) hidden states after encoder layer ``layer``
    size: torch.Tensor  # (B, N) how many original tokens each token stands for (0: padding)
    valid: torch.Tensor  # (B, N) False for padding
    num_protected: int  # leading tokens never merged or dropped ([CLS], registers, distillation token)
    layer: int  # encoder layer whose output this is
    num_layers: int
    grid: tuple[int, int]  # original patch grid (h, w)
    pristine: bool  # True when no reduction happened before this point (tokens are protected + full grid)
    signals: SignalSource
    calibrating: bool = False
    layout: Layout | None = None  # the host's typed layout of this call (grid or 1-D sequence, views, padding)
    site: str = ""
    view: torch.Tensor | None = None
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    prompt_pos: torch.Tensor | None = None
    text: torch.Tensor | None = None
    text_valid: torch.Tensor | None = None
    tower_slot: torch.Tensor | None = None
    step: torch.Tensor | None = None
    fixed: int | None = None  # candidate tokens of every sample, where known from the shapes (no padding)
    order: torch.Tensor | None = None  # (B, N) place of each token in an official mode's token order (None: positional)

    def _cached(self) -> list[torch.Tensor]:
        """[candidates] or [candidates, counts], computed once per (valid, num_protected); counts on first use."""
        key = (self.valid, self.num_protected)
        cache = self.__dict__.get("_cache")
        if cache is None or cache[0][0] is not key[0] or cache[0][1] != key[1]:
            c = self.valid.clone()
            c[:, : self.num_protected] = False
            cache = (key, [c])
            self.__dict__["_cache"] = cache
        return cache[1]

    @property
    def candidates(self) -> torch.Tensor:
        """(B, N) tokens that may be merged or dropped: valid and not protected (computed once per input)."""
        return self._cached()[0]

    @property
    def counts(self) -> torch.Tensor:
        """(B,) number of candidate tokens per sample (computed once per input, when first asked)."""
        got = self._cached()
        if len(got) == 1:
            got.append(got[0].sum(1))
        return got[1]

    def keys(self) -> torch.Tensor:
        return self.signals.keys(self.layer)

    def prompt_text(self, method: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(text, text_valid), refusing a host that gives no prompt."""
        if self.text is None or self.text_valid is None:
            raise TokenThinError(f"'{method}' reads the prompt's text tokens: it works on vision-language models only")
        return self.text, self.text_valid

    def positions_in_prompt(self, method: str) -> torch.Tensor:
        """``prompt_pos``, refusing a host that gives none."""
        if self.prompt_pos is None:
            raise TokenThinError(f"'{method}' reads the language model's attention: it works at site 'llm:k' only")
        return self.prompt_pos

    @property
    def has_cls(self) -> bool:
        """A [CLS] token exists: among the protected tokens, or outside ``x`` (a VLM drops it from the visual
        tokens the language model reads but its attention is still available)."""
        own = self.num_protected >= 1 and (self.layout is None or self.layout.cls)
        return own or bool(self.signals.has_cls)

    def cls_attention(self, layer: int | None = None) -> torch.Tensor:
        if not self.has_cls:
            raise TokenThinError(
                "this model has no [CLS] token; use a method that scores without one "
                "(e.g. 'divprune', 'kcenter', 'coverage', 'tome') or a mean-attention variant"
            )
        return self.signals.cls_attention(self.layer if layer is None else layer)

    def mean_attention(self, layer: int | None = None) -> torch.Tensor:
        return self.signals.mean_attention(self.layer if layer is None else layer)


Plan = tuple[torch.Tensor, torch.Tensor | None]  # (keep (B, N) bool, target (B, N) long or None)


class OrderedPlan(tuple):
    """A plan ``(keep, target)`` that also fixes what the language model reads, for an official code's parity mode
    (``official=True``). It unpacks like any plan (``keep, target = plan``), so hosts that ignore the additions still
    run it; the vision-language runtime (:func:`tokenthin.vlm.plan.plan`) and :func:`tokenthin.ops.ordered.apply`
    honour them:

    * ``order`` (B, N) float or None: a sort key per kept token; the language model reads the slots by ascending
      key of their representative (ties: positional order). The set of sequence positions is unchanged (the
      positions stay ascending), only which slot sits at which position;
    * ``values`` (B, N, D) or None: the value of each kept token's slot, where the official merge is not the
      size-weighted mean (rows of tokens that are not kept are ignored).

    The encoder runtime applies ``keep`` / ``target`` (positional order, size-weighted means) and carries ``order``
    to the next reduction point of the call (:attr:`ReduceInput.order`) and to ``tokenthin.info(model).order``;
    denoiser runtimes apply ``keep`` / ``target`` only."""

    order: torch.Tensor | None
    values: torch.Tensor | None

    def __new__(
        cls,
        keep: torch.Tensor,
        target: torch.Tensor | None,
        order: torch.Tensor | None = None,
        values: torch.Tensor | None = None,
    ) -> OrderedPlan:
        obj = super().__new__(cls, (keep, target))
        obj.order, obj.values = order, values
        return obj


class Method:
    """Base class; subclasses set the class attributes and implement :meth:`reduce`."""

    name: ClassVar[str]
    title: ClassVar[str]
    arxiv: ClassVar[str] = ""
    summary: ClassVar[str]
    kind: ClassVar[str]
    sites: ClassVar[tuple[str, ...]]
    default_site: ClassVar[str]
    signals: ClassVar[frozenset[str]] = frozenset()
    params: ClassVar[dict[str, Param]] = {}
    dynamic: ClassVar[bool] = False  # True: samples keep different counts (the runtime pads and masks)
    needs_prompt: ClassVar[bool] = False  # True: reads the prompt's text tokens (vision-language hosts only)
    # the runtime kinds (Adapter.kind: "encoder", "vlm", "denoiser") the method is made for; empty: any host that
    # offers one of its sites
    runtimes: ClassVar[frozenset[str]] = frozenset()
    # on a denoiser (tokenthin.denoise), what a block's plan acts on: "merge" (the chosen parts compute on merged
    # tokens and their outputs are unmerged; the plan is reduce()'s assignment, applied by block_merge()), "kv"
    # (only the self-attention's key / value inputs are reduced by the assignment, queries untouched, nothing is
    # unmerged: ToDo) or "soft" (the parts compute on soft_plan()'s many-to-many merge and unmerge: ToMA)
    block_mode: ClassVar[str] = "merge"
    # True: under ``flops=`` the method also picks a smaller input image (``Schedule.input_keep``, sized by
    # :meth:`input_size`, split by its ``input_share`` parameter); only hosts with site ``input`` can take it
    resizes_input: ClassVar[bool] = False
    # two-stage vision-language methods (site ``output+llm``): the in-LLM parameters ``tokenthin.calibrate`` may
    # search on a VLM, each a tuple of values or "layers" (every language-model layer 0..L-2)
    llm_search: ClassVar[dict[str, tuple[Any, ...] | str]] = {}

    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(self.params))
        if unknown:
            known = ", ".join(sorted(self.params)) or "none"
            raise TokenThinError(
                f"method '{self.name}' has no parameter(s) {', '.join(unknown)}; its parameters: {known}"
            )
        self.p: dict[str, Any] = {k: kwargs.get(k, spec.default) for k, spec in self.params.items()}
        for k, spec in self.params.items():
            msg = spec.check(self.p[k]) if spec.check else None
            if msg:
                raise TokenThinError(f"method '{self.name}': {k}={self.p[k]!r} is invalid: {msg}")

    def signal_layers(self, point_layer: int, num_layers: int) -> list[int]:
        """Encoder layers whose queries/keys this method reads for a reduction after ``point_layer``."""
        return [point_layer]

    def reduce(self, inp: ReduceInput, keep: torch.Tensor | int) -> Plan:
        """Plan the reduction at one point. ``keep`` (B,): candidate tokens each sample keeps; an int where every
        sample keeps the same count and it is known from the shapes (``inp.fixed`` set: no padding). In that case
        the plan must keep exactly :meth:`output_count` candidates per sample, read no count back from the data
        (``int(tensor)``, ``.item()``, ``.tolist()``, ``nonzero``) and make no data-dependent branch, so that
        ``torch.compile`` traces it without a graph break; :func:`uniform_keep` accepts both forms."""
        raise NotImplementedError

    def output_count(self, keep: int, inp: ReduceInput) -> int:
        """Candidates a fixed-count plan keeps when asked to keep ``keep`` (default: exactly ``keep``; a method
        that keeps fewer, such as grid pooling to a whole grid, says how many). The runtime sizes its output from
        this without reading the plan back; eager mode checks it against the plan."""
        return keep

    # ----- denoiser hooks (tokenthin.denoise; the defaults suit every assignment method) -----
    def block_ratio(self) -> float | None:
        """The share of each block's tokens removed when the method's own parameters fix it (ToDo's
        ``downsample_factor``); None: the budget comes from ``ratio=`` / ``keep=``."""
        return None

    def block_merge(self, x: torch.Tensor, a: Assignment, layer: int, num_layers: int) -> torch.Tensor:
        """Block ``layer``'s (of ``num_layers``) tokens ``x`` (B, N, D) merged by ``a``: the mean of each slot's
        tokens (tomesd); ToFu overrides it (MLERP, or pruning in late blocks)."""
        ones = torch.ones(x.shape[:2], dtype=torch.float32, device=x.device)
        return assign.merge(x, ones, a)[0]

    def soft_plan(self, inp: ReduceInput, keep: torch.Tensor) -> SoftPlan:
        """For ``block_mode == "soft"``: a many-to-many merge of the block's tokens (each sample keeping ``keep``)."""
        raise NotImplementedError

    def llm_points(self, num_layers: int) -> list[tuple[int, float | int]]:
        """For two-stage methods (``sites`` holds ``"output+llm"``): the language-model layers after which they
        prune again, each with the fraction of the visual tokens entering the language model kept from there on."""
        raise NotImplementedError

    def input_size(self, height: int, width: int, patch: int, keep: float) -> tuple[int, int]:
        """For ``kind == "input"`` (and ``resizes_input``): the image size to feed instead of (height, width)."""
        raise NotImplementedError


_REGISTRY: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available by ``cls.name``."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise TokenThinError(f"two methods are named '{cls.name}'")
    _REGISTRY[cls.name] = cls
    return cls


def get(name: str) -> type[Method]:
    from . import _load_all

    _load_all()
    key = name.lower().strip()
    if key not in _REGISTRY:
        raise UnknownMethodError(
            f"unknown method '{name}'. Known methods: {', '.join(sorted(_REGISTRY))} "
            "(see tokenthin.methods() for what each does)"
        )
    return _REGISTRY[key]


def all_methods() -> dict[str, type[Method]]:
    from . import _load_all

    _load_all()
    return dict(sorted(_REGISTRY.items()))


# ----- small shared helpers for method files -----


def uniform_keep(keep: torch.Tensor | int, method: str) -> int:
    """Selection methods need one k for the whole batch; samples differ only after a dynamic reduction. An int
    ``keep`` (the fixed-count case) is returned as it is, with no read-back of the data."""
    if isinstance(keep, int):
        return keep
    k = int(keep.min())
    if int(keep.max()) != k:
        raise BudgetError(
            f"'{method}' keeps the same count per sample, but samples arrive with different counts "
            "(after a dynamic method such as dtome); give a keep count no larger than the smallest sample's"
        )
    return k


def keep_indices(inp: ReduceInput, idx: torch.Tensor) -> torch.Tensor:
    """Keep mask from selected candidate indices (B, k); protected tokens are always kept."""
    keep = torch.zeros_like(inp.valid)
    keep.scatter_(1, idx, True)
    keep[:, : inp.num_protected] = True
    return keep & inp.valid


def positive_int(v: Any) -> str | None:
    return None if isinstance(v, int) and v > 0 else "must be a positive integer"


def fraction(v: Any) -> str | None:
    return None if isinstance(v, (int, float)) and 0 < v <= 1 else "must be in (0, 1]"
