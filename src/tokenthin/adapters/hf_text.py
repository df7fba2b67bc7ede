"""Hugging Face BERT-family text encoders: ``BertModel`` (BERT, MiniLM, bge), ``RobertaModel`` / ``XLMRobertaModel``
and ``DistilBertModel``, also inside their task models (``*ForSequenceClassification``, ``*ForMaskedLM``, ...).

Seams (transformers 5.x; tested on 5.17 and 5.24): the encoder runs ``hidden_states = layer(hidden_states,
attention_mask, ...)`` with the mask positional, and every attention implementation (eager, SDPA) adds a float
``attention_mask`` to its logits. A forward pre-hook on each layer replaces the mask the model built from the caller's
padding by tokenthin's additive key bias: the caller's padding (a large negative number) before the first reduction,
then log token size (proportional attention) and the padding of samples that keep different counts. Forward hooks on the
query/key projections (``attention.self.query/key``; DistilBERT ``attention.q_lin/k_lin``) capture what scores need. No
forward body is copied; embeddings (absolute positions) run before any reduction, so reducing tokens never moves a
position.

Tokens and padding
------------------
The layout is a 1-D sequence (``Layout.sequence``: a grid of one row, so pooling and grid methods see a line of
tokens). The caller's ``attention_mask`` (B, N) is the layout's padding: padding tokens are never kept as content
and never merged into real tokens, and ``keep`` fractions are of each sample's own real tokens. Padding must be on
the right (the first token is the protected [CLS]); a 3-D/4-D custom mask is refused.

Budgets: ``keep`` fractions are of each sample's own real tokens, and the first reduction of a padded batch is planned
on each sample's real tokens alone (the runtime trims the padding per group), so a padded batch gives what each
sample gives run alone. ``r`` and ``flops=`` are planned for the padded length: a short sample that cannot take an
``r`` solved for the longest one is an error naming the input (use ``keep=``, or batch sentences of similar length).

Protected tokens: [CLS] (``<s>`` for RoBERTa), the first token, only. [SEP] (``</s>``) sits at a different position in
every padded sample, so it is content here: methods may merge or drop it like any word piece. The pooler (a dense
layer on token 0) therefore keeps working on reduced outputs.

Sentence embeddings on reduced outputs
--------------------------------------
A reduced ``last_hidden_state`` holds fewer tokens, each standing for ``size`` original ones. :func:`pool_weights`
gives the per-token weights that make a mean over them the mean over the original real tokens: the caller's mask
when nothing was reduced, ``size`` (zero on padding) on reduced outputs, the mask without dropped tokens after
``unmerge=True``. :func:`mean_pool` applies them (what sentence-transformers' mean pooling computes on the full
model).

Not supported: BERT used as a decoder (``is_decoder`` / cross-attention: causal attention with a cache).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import InputMismatchError
from ..flops import EncoderDims
from .contract import Adapter, BiasSource, Layout, Sink, capture_outputs, touched_layers
from .hf_vision import unmerge_hidden
from .registry import register

__all__ = ["DEFAULT_LENGTH", "HFTextAdapter", "mean_pool", "pool_weights"]

#: Sequence length (tokens, [CLS] included) that explain() and apply-time checks plan for when no ``image_size=``
#: hint is given; every call is planned for the length it is fed.
DEFAULT_LENGTH = 128


def _bert_layers(m: nn.Module) -> tuple[nn.ModuleList, str] | None:
    """(layers, style) of a BERT-like (``encoder.layer[i].attention.self.query``) or DistilBERT-like
    (``transformer.layer[i].attention.q_lin``) encoder module."""
    for holder, style in ((getattr(m, "encoder", None), "bert"), (getattr(m, "transformer", None), "distilbert")):
        layers = getattr(holder, "layer", None)
        if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
            continue
        att = getattr(layers[0], "attention", None)
        if style == "bert" and isinstance(getattr(getattr(att, "self", None), "query", None), nn.Linear):
            return layers, style
        if style == "distilbert" and isinstance(getattr(att, "q_lin", None), nn.Linear):
            return layers, style
    return None


@register
class HFTextAdapter(Adapter):
    name = "hf_text"
    priority = 5  # below hf_vision: a dual encoder with a ViT and a BERT tower stays a vision host
    sites = frozenset({"layers", "layer", "output", "block"})
    families = (
        "Hugging Face BERT-family text encoders: BertModel (BERT, MiniLM, bge), RobertaModel, XLMRobertaModel, "
        "DistilBertModel and their task models (encoders only, not is_decoder)"
    )

    def __init__(self, top: nn.Module, root: nn.Module, layers: nn.ModuleList, style: str) -> None:
        self.top, self.root, self.layers, self.style = top, root, list(layers), style
        cfg = root.config
        self.config = cfg
        self.family = getattr(cfg, "model_type", type(root).__name__)
        self.num_protected = 1  # [CLS] / <s>
        if style == "bert":
            hidden, mlp = int(cfg.hidden_size), int(cfg.intermediate_size)
            self.num_heads = int(cfg.num_attention_heads)
        else:
            hidden, mlp = int(cfg.dim), int(cfg.hidden_dim)
            self.num_heads = int(cfg.n_heads)
        self.hidden = hidden
        self.head_dim = hidden // self.num_heads
        self.scale = self.head_dim**-0.5
        pooler = getattr(root, "pooler", None)
        self.dims = EncoderDims(
            hidden=hidden,
            mlp_hidden=mlp,
            mlp_mats=2,
            num_layers=len(self.layers),
            patch=(1, 1),
            channels=0,  # an embedding lookup, no matrix product
            num_protected=self.num_protected,
            head="dense" if isinstance(getattr(pooler, "dense", None), nn.Linear) else "none",
        )
        self.default_layout = self.layout_for(DEFAULT_LENGTH)

    @classmethod
    def detect(cls, model: nn.Module) -> HFTextAdapter | None:
        for m in model.modules():
            cfg = getattr(m, "config", None)
            emb = getattr(m, "embeddings", None)
            if cfg is None or not isinstance(getattr(emb, "word_embeddings", None), nn.Embedding):
                continue
            if getattr(cfg, "is_decoder", False) or getattr(cfg, "add_cross_attention", False):
                continue  # causal attention with a cache: not a bidirectional encoder
            found = _bert_layers(m)
            if found is not None:
                return cls(model, m, *found)
        return None

    # ----- tokens -----
    def layout_for(self, size: tuple[int, int] | int | None) -> Layout:
        if size is None:
            return self.default_layout
        n = int(size[-1]) if isinstance(size, (tuple, list)) else int(size)
        if n < 1:
            raise InputMismatchError(f"a sequence length must be >= 1, got {n}")
        return Layout.sequence(self.num_protected, max(n - self.num_protected, 0))

    def call_layout(self, args: tuple, kwargs: dict[str, Any]) -> tuple[Layout, int, torch.Tensor]:
        ids = kwargs.get("input_ids", args[0] if args else None)
        x = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
        if not isinstance(x, torch.Tensor):
            raise InputMismatchError("expected input_ids (B, N) or inputs_embeds (B, N, D)")
        b, n = int(x.shape[0]), int(x.shape[1])
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        padding = None
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.dim() != 2 or tuple(mask.shape) != (b, n):
                shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise InputMismatchError(
                    f"attention_mask must be a (batch, sequence) padding mask of shape {(b, n)}, got {shape}; "
                    "tokenthin reduces tokens only under a plain padding mask (1 = real token, 0 = padding)"
                )
            real = mask.to(device=x.device) != 0
            if not bool(real[:, 0].all()):
                raise InputMismatchError(
                    "the first token is padding in some sample; tokenthin protects [CLS] at position 0 and needs "
                    "right padding (tokenizer.padding_side = 'right')"
                )
            padding = None if bool(real.all()) else real
        return Layout.sequence(self.num_protected, n - self.num_protected, padding), b, x

    # ----- layers and signals -----
    def bias_hooks(self, rt: BiasSource) -> list[Any]:
        """Each layer gets ``rt.current_bias()`` as its (B, 1, 1, N) additive mask in place of the model's own
        padding mask (which the bias already holds). With no bias, a mask built for a longer, unreduced sequence is
        dropped: every token then is real and unsized."""

        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            hs = self.layer_input(args, kwargs)
            in_args = len(args) > 1
            mask = args[1] if in_args else kwargs.get("attention_mask")
            bias = rt.current_bias()
            if bias is not None:
                new = bias.to(hs.dtype).view(hs.shape[0], 1, 1, -1)
            elif isinstance(mask, torch.Tensor) and mask.shape[-1] != hs.shape[1]:
                new = None
            else:
                return None
            if in_args:
                return (args[0], new, *args[2:]), kwargs
            return args, {**kwargs, "attention_mask": new}

        return [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in self.layers]

    def qk_modules(self, i: int) -> tuple[nn.Module, nn.Module]:
        att = self.layers[i].attention
        if self.style == "bert":
            return att.self.query, att.self.key
        return att.q_lin, att.k_lin

    def capture_qk(self, i: int, want_q: bool, sink: Sink) -> list[Any]:
        return capture_outputs(*self.qk_modules(i), want_q, sink)

    # ----- consumers -----
    def finish(self, out: Any, source: torch.Tensor | None, unmerge: bool) -> Any:
        return unmerge_hidden(out, source, unmerge)

    def describe(self) -> dict[str, Any]:
        return {"layout": "sequence", "protected": "[CLS] (first token)", "default_length": DEFAULT_LENGTH}

    def touched(self) -> list[str]:
        return touched_layers(
            self.top,
            self.root,
            self.layers,
            self.qk_modules,
            "mask pre-hook: key bias replaces the padding mask; output hook at reductions",
        )


def pool_weights(
    model: nn.Module, last_hidden_state: torch.Tensor, attention_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, N) weights that make a weighted mean over ``last_hidden_state``'s tokens the mean over the original real
    tokens, for the output of the last forward call of ``model`` (reduced by tokenthin or not).

    * not applied (or its runtime detached), or nothing reduced: ``attention_mask`` (ones when None);
    * reduced: each output token's size (how many original tokens it stands for), zero on padding slots; tokens a
      pruning method dropped are gone, so the mean is over what was kept;
    * ``unmerge=True`` (the output is back on the original tokens): ``attention_mask`` without the dropped tokens.
    """
    from ..api import info, is_applied, runtime_of

    b, n = last_hidden_state.shape[:2]
    base = (
        torch.ones(b, n, device=last_hidden_state.device)
        if attention_mask is None
        else attention_mask.to(last_hidden_state.device, torch.float32)
    )
    if not is_applied(model) or not runtime_of(model).handles:  # not applied, or detached (timing the full model)
        return base
    tok = info(model)
    if tok.size is None:
        return base
    if runtime_of(model).unmerge and tok.source is not None:  # back on the original tokens
        if tok.source.shape[1] != n:
            raise InputMismatchError(
                f"last_hidden_state has {n} tokens; the last call's input had {tok.source.shape[1]}"
            )
        return base * (tok.source >= 0).to(base.dtype)
    if tok.size.shape[1] != n:
        raise InputMismatchError(
            f"last_hidden_state has {n} tokens but the last call's output had {tok.size.shape[1]}; pool the output "
            "of the model's last forward call"
        )
    w = tok.size.to(device=last_hidden_state.device, dtype=torch.float32)
    return w if tok.valid is None else w.masked_fill(~tok.valid.to(w.device), 0.0)


def mean_pool(
    model: nn.Module,
    last_hidden_state: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Mean-pooled (and by default L2-normalised) sentence embeddings (B, D), float32, of the last forward call's
    output, correct on reduced outputs (see :func:`pool_weights`)."""
    w = pool_weights(model, last_hidden_state, attention_mask).unsqueeze(-1)
    pooled = (last_hidden_state.to(torch.float32) * w).sum(1) / w.sum(1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=-1) if normalize else pooled
