"""The host contract: what every adapter declares about a model family's seams. No method logic lives here.

A host (one adapter file in :mod:`tokenthin.adapters`) tells the runtime, in typed members:

* **tokens**: :attr:`Adapter.root` is where tokens enter (its pre-hook opens a call, its post-hook closes it);
  :meth:`Adapter.call_layout` reads the call's inputs (pixel values, input ids, audio features) into the
  :class:`Layout` of the tokens entering the first layer; :meth:`Adapter.consumer_hooks` hands whatever reads the
  reduced tokens afterwards (a decoder's cross-attention, a pooling head) the key bias of the output tokens;
* **layers**: :attr:`Adapter.layers`, the ordered blocks; :meth:`Adapter.bias_hooks` installs how each layer is
  handed an additive key bias (an HF ``attention_mask`` argument, timm's ``attn_mask``, a registered attention
  function, an attention processor); :meth:`Adapter.layer_input` / :meth:`Adapter.layer_output` say where a
  layer's hidden states are in its call and its result;
* **signals**: :meth:`Adapter.capture_qk` captures a layer's queries and keys (separate projections or a fused
  ``qkv``); :attr:`Adapter.signals` names those it can give;
* **layout**: :class:`Layout`, a typed description of the tokens that methods read: protected tokens ([CLS],
  registers, distillation), a 2-D grid, views (AnyRes base + crops), frames, or a 1-D sequence (audio, text), and
  the caller's padding;
* **sites** it offers (:attr:`Adapter.sites`): ``input``, ``layers``, ``layer`` (``layer:k``), ``output``, and
  block-local ones (``block``: merge -> compute -> unmerge inside one layer) for hosts that declare them.

Adapters register themselves (:func:`tokenthin.adapters.registry.register`) with a detection priority; nothing keeps
a list of them. An adapter never imports an optional host library (timm, diffusers) at module import time.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Protocol

import torch
from torch import nn

from ..flops import EncoderDims
from ..layout import Layout, View

__all__ = [
    "Adapter",
    "BiasFn",
    "BiasSource",
    "Handle",
    "Layout",
    "Sink",
    "View",
    "capture_outputs",
    "hidden_of",
    "pre_hook_bias",
    "touched_layers",
]

Handle = Any  # anything with .remove(): torch hook handles, or an adapter's own seam objects
BiasFn = Callable[[], "torch.Tensor | None"]  # (B, N) additive key bias of the tokens now flowing, or None
Sink = Callable[[str, torch.Tensor], None]  # capture_qk hands ("q" | "k", (B, N, heads * head_dim)) to it


class BiasSource(Protocol):
    """What the runtime offers to an adapter's hooks."""

    def current_bias(self) -> torch.Tensor | None:
        """(B, N) additive key bias of the tokens now flowing through the layers (None: no bias needed)."""

    def cross_bias(self) -> torch.Tensor | None:
        """(B, N) additive key bias of the last call's output tokens, for modules that read them afterwards."""


def hidden_of(args: tuple, kwargs: dict[str, Any], name: str = "hidden_states") -> torch.Tensor:
    """The hidden states of a layer call: the first positional argument or keyword ``name``."""
    x = args[0] if args else kwargs.get(name)
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"expected the layer's hidden states as its first argument or '{name}='")
    return x


class Adapter:
    """A host family. Subclasses set the attributes (class or instance) and implement the methods below.

    Class attributes: ``name`` (registry key), ``priority`` (higher is tried first; a specialised host, e.g. an
    encoder-decoder, sits above the encoder it contains), ``families`` (supported models, for error messages),
    ``sites`` (sites this host offers), ``signals`` (which of ``keys``, ``cls_attn``, ``mean_attn`` it can give).
    """

    name: ClassVar[str]
    priority: ClassVar[int] = 0
    families: ClassVar[str]
    sites: ClassVar[frozenset[str]] = frozenset({"layers", "layer", "output"})
    signals: ClassVar[frozenset[str]] = frozenset({"keys", "cls_attn", "mean_attn"})
    kind: ClassVar[str] = "encoder"  # "encoder" (tokenthin.runtime) or "vlm" (tokenthin.vlm)

    top: nn.Module  # the model the user applied tokenthin to
    root: nn.Module  # receives the inputs; its pre/post hooks open and close a call
    layers: list[nn.Module]
    num_protected: int
    num_heads: int
    head_dim: int
    scale: float
    dims: EncoderDims  # for analytic FLOPs and flops= budgets
    family: str
    # where budgets are planned when no call has been seen (explain(), apply-time checks): tokens of the config's
    # input; the runtime re-plans for every input shape it is actually fed
    default_layout: Layout

    @classmethod
    def detect(cls, model: nn.Module) -> Adapter | None:
        """An adapter for ``model`` if it is (or contains) this family, else None. Duck-typed: no imports."""
        raise NotImplementedError

    # ----- tokens -----
    def call_layout(self, args: tuple, kwargs: dict[str, Any]) -> tuple[Layout, int, torch.Tensor]:
        """The layout of the tokens entering the first layer for this call, the batch size, and the input tensor
        (checked for device and dtype by the runtime)."""
        raise NotImplementedError

    def call_args(self, x: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
        """Arguments that call ``root`` on a batch of inputs (calibration runs)."""
        return (), {"pixel_values": x}

    def layout_for(self, size: tuple[int, int] | int | None) -> Layout:
        """The layout for an input size hint (``image_size=`` for images, a length for sequences); None: default."""
        if size is None:
            return self.default_layout
        raise NotImplementedError(f"{type(self).__name__} takes no input size hint")

    def shrink_input(self, args: tuple, kwargs: dict[str, Any], size: tuple[int, int]) -> tuple[tuple, dict]:
        """Site ``input``: call arguments with the image resized to ``size`` (hosts offering ``input`` only)."""
        raise NotImplementedError

    @property
    def input_patch(self) -> int:
        """Pixels per token side, for site ``input`` (hosts offering it)."""
        raise NotImplementedError

    # ----- layers -----
    def layer_input(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        """The hidden states a layer is called with."""
        return hidden_of(args, kwargs)

    def with_layer_input(self, args: tuple, kwargs: dict[str, Any], x: torch.Tensor) -> tuple[tuple, dict]:
        """A layer's call arguments with its hidden states replaced by ``x`` (block-local sites)."""
        if args:
            return (x, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": x}

    def layer_output(self, out: Any) -> torch.Tensor:
        """The hidden states in a layer's result."""
        return out[0] if isinstance(out, tuple) else out

    def with_layer_output(self, out: Any, x: torch.Tensor) -> Any:
        """A layer's result with its hidden states replaced by ``x``."""
        return (x, *out[1:]) if isinstance(out, tuple) else x

    def bias_hooks(self, rt: BiasSource) -> list[Handle]:
        """Make every layer add ``rt.current_bias()`` (when not None) to its attention logits over the keys."""
        raise NotImplementedError

    # ----- signals -----
    def capture_qk(self, i: int, want_q: bool, sink: Sink) -> list[Handle]:
        """Hooks that hand layer i's keys (and queries when ``want_q``), (B, N, heads * head_dim), to ``sink``."""
        raise NotImplementedError

    # ----- consumers -----
    def consumer_hooks(self, rt: BiasSource) -> list[Handle]:
        """Hooks on what reads the tokens besides the layers (pooling heads, a decoder's cross-attention)."""
        return []

    def finish(self, out: Any, source: torch.Tensor | None, unmerge: bool) -> Any:
        """The root's output at the end of a call; with ``unmerge`` the host's token output is put back on the
        full token set through ``source`` (original token -> output token). Return None to keep ``out``."""
        return None

    def touched(self) -> list[str]:
        """Names of modules that get hooks, for explain()."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """Host details for explain() beyond the common ones."""
        return {}

    @property
    def num_layers_reduced(self) -> int:
        """Layers of the region tokens are reduced in (explain()'s ``layers``)."""
        return len(self.layers)

    def site_names(self) -> list[str]:
        """Every concrete site this host offers, e.g. ``["layers", "layer:0", ..., "output"]``."""
        order = {"input": 0, "layers": 1, "layer": 2, "output": 3, "block": 4}
        out: list[str] = []
        for s in sorted(self.sites, key=lambda s: order.get(s, 9)):
            out.extend([f"layer:{i}" for i in range(len(self.layers))] if s == "layer" else [s])
        return out


def pre_hook_bias(
    layers: list[nn.Module], rt: BiasSource, keyword: str, position: int | None, what: str
) -> list[Handle]:
    """Forward pre-hooks handing each layer the current key bias as a (B, 1, 1, N) additive mask through its
    argument ``keyword`` (or positional ``position``); refuses a caller-supplied mask that it would overwrite."""

    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        bias = rt.current_bias()
        if bias is None:
            return None
        hs = hidden_of(args, kwargs)
        mask = bias.to(hs.dtype).view(hs.shape[0], 1, 1, -1)
        if position is not None and len(args) > position:
            if args[position] is not None:
                raise _combine_error(what)
            return (*args[:position], mask, *args[position + 1 :]), kwargs
        if kwargs.get(keyword) is not None:
            raise _combine_error(what)
        return args, {**kwargs, keyword: mask}

    return [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in layers]


def _combine_error(what: str) -> Exception:
    from ..errors import TokenThinError

    return TokenThinError(f"tokenthin cannot combine a caller-supplied {what} with merging")


def capture_outputs(q: nn.Module, k: nn.Module, want_q: bool, sink: Sink) -> list[Handle]:
    """Forward hooks handing the outputs of separate query / key projections, (B, N, heads * head_dim), to
    ``sink`` (the query's only when ``want_q``)."""
    hooks = [k.register_forward_hook(lambda _m, _a, out: sink("k", out))]
    if want_q:
        hooks.append(q.register_forward_hook(lambda _m, _a, out: sink("q", out)))
    return hooks


def touched_layers(
    top: nn.Module,
    root: nn.Module,
    layers: list[nn.Module],
    qk: Callable[[int], tuple[nn.Module, nn.Module]],
    note: str,
) -> list[str]:
    """explain()'s touched modules of an encoder whose layers get ``note``'s hooks and whose q/k modules are
    captured: the root (a call opens and closes there), each layer, each layer's query and key modules."""
    names = {m: n for n, m in top.named_modules()}
    out = [f"{names[root] or type(root).__name__} (pre/post hooks: open and close a call)"]
    for i, layer in enumerate(layers):
        q, k = qk(i)
        out.append(f"{names[layer]} ({note})")
        out.append(f"{names[q]}, {names[k]} (output capture where a method needs scores)")
    return out
