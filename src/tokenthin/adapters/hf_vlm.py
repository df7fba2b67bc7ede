"""What every Hugging Face vision-language host shares: a language model that reads the visual tokens in its own
sequence. The hosts themselves live in :mod:`tokenthin.adapters.hf_llava` (LLaVA, LLaVA-NeXT) and
:mod:`tokenthin.adapters.hf_qwen2vl` (Qwen2-VL, Qwen2.5-VL).

The adapter only says where things are and how the host's calls are spelled; :mod:`tokenthin.vlm` does the work and
names no Hugging Face keyword. Every Hugging Face seam of the vision-language runtime is here (transformers 4.57 -
5.24):

* the inner multimodal model (``LlavaModel``) receives ``input_ids`` and ``pixel_values`` (:meth:`root_call`): a
  forward pre-hook reads where the image placeholder tokens are and whether this call is a prefill (an image, an
  empty cache) or a decoding step; the outer model's ``labels`` are refused (:meth:`labels_given`);
* the vision tower: a forward pre-hook records the image layout (:meth:`layout`; :meth:`token_map` maps the
  prompt's image tokens back to the tower's, :mod:`tokenthin.adapters.hf_vlm_tokens`); forward hooks on its
  query/key projections capture what scores need. transformers 5.24's ``generate()`` runs the tower before the
  multimodal model's forward (``mm_encoder_outputs``), so both are kept until the next prefill picks them up;
* the projector (:attr:`projector`, LLaVA's ``multi_modal_projector``), called with the image features first;
* the language model (``LlamaModel`` & co.) is always called with keyword arguments (``inputs_embeds``,
  ``attention_mask``, ``position_ids``, ``cache_position``, the cache as ``past_key_values`` or, from 5.24,
  ``cache``): :meth:`lm_call` reads them into an :class:`LMCall`, :meth:`with_lm_call` writes them back;
* the language model's decoder layers (``hidden_states`` first, then ``position_embeddings`` (cos, sin), the mask in
  the attention implementation's format, :meth:`layer_mask`); their ``self_attn.q_proj`` / ``k_proj`` and rotary
  function (:meth:`lm_qk_modules`, :meth:`lm_logits`).

No forward body is copied.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import InputMismatchError, TokenThinError, UnsupportedModelError
from ..flops import LMDims
from .contract import Adapter, Handle, hidden_of
from .hf_vision import HFVisionAdapter
from .hf_vlm_tokens import ImageLayout, TokenMap, assign_images, grid_place

_KEEP: Any = object()  # with_lm_call: leave this argument as the caller gave it


def _language_layers(lm: nn.Module) -> nn.ModuleList:
    for holder in (lm, getattr(lm, "model", None)):
        layers = getattr(holder, "layers", None)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0:
            return layers
    raise UnsupportedModelError(f"cannot find the decoder layers of {type(lm).__name__}")


@dataclass
class RootCall:
    """The multimodal model's call as the runtime reads it."""

    ids: torch.Tensor | None  # (B, T) token ids
    pixels: torch.Tensor | None  # pixel values, when the vision tower runs inside this call
    has_image: bool  # pixel values or image features computed beforehand (generate() in transformers 5.24)
    cache: Any  # the KV cache object, or None


@dataclass
class LMCall:
    """A call of the language model or one of its decoder layers, as the runtime reads it."""

    embeds: torch.Tensor | None  # (B, T, D): the input embeddings (language model) or hidden states (layer)
    mask: torch.Tensor | None  # the attention mask as the caller gave it
    positions: torch.Tensor | None  # (B|1, T) positions, or (S, B|1, T) multimodal ones (Qwen2-VL)
    rotary: tuple[torch.Tensor, torch.Tensor] | None  # a decoder layer's rotary (cos, sin)
    cache: Any  # the KV cache object, or None
    cache_slots: torch.Tensor | None  # (T,) slots in the cache, when the host numbers them


def _gather_seq(x: torch.Tensor, idx: torch.Tensor, batch_dim: int) -> torch.Tensor:
    """Gather positions / rotary tensors along their sequence axis for each sample (``idx``: (B, T'))."""
    if x.dim() == 2:  # (B|1, T) positions
        return x.expand(idx.shape[0], -1).gather(1, idx)
    if x.dim() == 3 and batch_dim == 0:  # (B|1, T, d) rotary cos/sin
        x = x.expand(idx.shape[0], -1, -1)
        return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    # (S, B|1, T[, d]): multimodal positions / rotary (sections first)
    x = x.expand(x.shape[0], idx.shape[0], *x.shape[2:])
    g = idx.unsqueeze(0).expand(x.shape[0], -1, -1)
    if x.dim() == 4:
        g = g.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1])
    return x.gather(2, g)


class VLMAdapter(Adapter):
    """What every vision-language host provides; subclasses fill in the vision side. The work is done by
    :mod:`tokenthin.vlm` (``kind = "vlm"``); the encoder members of :class:`Adapter` are the vision tower's."""

    kind = "vlm"
    sites = frozenset({"output", "llm", "output+llm", "layers", "layer"})
    shift_positions = True  # 1-D rotary positions: a shorter prompt is numbered 0..T'-1 at the output site
    vision: HFVisionAdapter | None = None  # a ViT-like tower whose attention tokenthin can score, or None
    projector: nn.Module | None = None  # receives the tower's features (first argument) for the language model
    feature_layer = 0  # vision layer whose output the language model reads (ReduceInput.layer)
    vision_layers = 0
    drops_protected = 0  # leading tokens ([CLS]) the host drops from each image's features
    needs_projected = False  # the runtime keeps the projector's output for token_map()

    def __init__(self, top: nn.Module, root: nn.Module, vision_root: nn.Module) -> None:
        self.top, self.root, self.vision_root = top, root, vision_root
        cfg = root.config
        self.config = cfg
        self.family = getattr(cfg, "model_type", type(root).__name__)
        self.lm: nn.Module = root.language_model
        self.lm_layers = list(_language_layers(self.lm))
        self.image_token_id = int(cfg.image_token_id if hasattr(cfg, "image_token_id") else cfg.image_token_index)
        tcfg = getattr(cfg, "text_config", cfg)
        attn = self.lm_layers[0].self_attn
        self.lm_heads = int(tcfg.num_attention_heads)
        self.lm_kv_heads = int(getattr(tcfg, "num_key_value_heads", None) or self.lm_heads)
        self.lm_head_dim = int(getattr(attn, "head_dim", tcfg.hidden_size // self.lm_heads))
        self.lm_scale = float(getattr(attn, "scaling", self.lm_head_dim**-0.5))
        self.lm_config = tcfg

    # ----- the image tokens -----
    def layout(self, args: tuple, kwargs: dict[str, Any]) -> ImageLayout:
        """From the vision tower's call: (visual tokens, token grid (h, w)) of every image, in prompt order."""
        raise NotImplementedError

    def token_map(
        self, rows: torch.Tensor, per: list[int], layout: ImageLayout | None, projected: torch.Tensor | None
    ) -> TokenMap:
        """Map the prompt's image-token embeddings ``rows`` (M, D; ``per`` of them per sample) to the vision
        tower's tokens, given the last tower call's ``layout`` and the projector's last output ``projected`` (kept
        only for hosts that set ``needs_projected``). Default: the features were scattered in image-major order, one
        image after another, nothing re-packed."""
        grids, imgs = assign_images(per, layout)
        assert layout is not None
        start = [0]
        for t, _ in layout:
            start.append(start[-1] + t)
        dev = rows.device
        flat = torch.cat([torch.arange(start[img], start[img + 1], device=dev) for g in imgs for img in g])
        places = [grid_place(torch.arange(layout[i][0], device=dev), *layout[i]) for g in imgs for i in g]
        zeros = torch.zeros(rows.shape[0], dtype=torch.long, device=dev)
        row = torch.cat([r for r, _ in places])
        col = torch.cat([c for _, c in places])
        return TokenMap(flat, zeros.bool(), zeros, grids, row, col)

    # ----- the multimodal model's and the outer model's calls -----
    def root_call(self, args: tuple, kwargs: dict[str, Any]) -> RootCall:
        ids = kwargs.get("input_ids", args[0] if args else None)
        pv = kwargs.get("pixel_values", args[1] if len(args) > 1 else None)
        mm = kwargs.get("mm_encoder_outputs") or {}
        has_image = pv is not None or (isinstance(mm, dict) and mm.get("image") is not None)
        return RootCall(ids=ids, pixels=pv, has_image=has_image, cache=self.cache_of(kwargs))

    def image_tokens(self, rc: RootCall) -> torch.Tensor:
        """(B, T) bool: the image placeholder tokens of a prefill, after refusing prompts without an image and pixel
        values the vision tower would mis-read, naming the fix."""
        ids = rc.ids
        if ids is None:
            raise TokenThinError(
                "pass input_ids (not inputs_embeds) while tokenthin is applied: it finds the image tokens by their id"
            )
        vis = ids == self.image_token_id
        per = vis.sum(1)
        if not rc.has_image or not bool((per > 0).all()):
            which = "the prompt has" if ids.shape[0] == 1 else f"sample(s) {(per == 0).nonzero().flatten().tolist()}"
            raise TokenThinError(
                f"prompt without image: {which} no image token (id {self.image_token_id})"
                + ("" if rc.has_image else " and no pixel_values were given")
                + "; tokenthin reduces visual tokens, so every prompt of a call needs an image. Run text-only "
                "prompts with tokenthin.remove(model), or outside a `with tokenthin.applied(...)` block"
            )
        self._check_pixels(rc.pixels)
        return vis

    def _check_pixels(self, pv: torch.Tensor | None) -> None:
        param = next(self.root.parameters())
        if pv is not None and not pv.is_floating_point():
            raise InputMismatchError(f"pixel_values has dtype {pv.dtype}; use the processor's float pixel values")
        if pv is not None and pv.device != param.device:
            raise InputMismatchError(f"pixel_values is on {pv.device} but the model is on {param.device}; move them")

    def labels_given(self, kwargs: dict[str, Any]) -> bool:
        """The outer model was asked for a loss (its labels would not line up with a shorter sequence)."""
        return kwargs.get("labels") is not None

    def hook_projector(self, pre: Any = None, post: Any = None) -> list[Handle]:
        """Hooks on the projector: ``pre(features | None) -> features | None`` may replace the tower's features it
        receives (None: it was not given them positionally); ``post(projected)`` sees its output."""
        assert self.projector is not None
        hooks: list[Handle] = []
        if pre is not None:

            def _pre(_m: nn.Module, args: tuple) -> tuple | None:
                new = pre(args[0] if args else None)
                return None if new is None else (new, *args[1:])

            hooks.append(self.projector.register_forward_pre_hook(_pre))
        if post is not None:
            hooks.append(self.projector.register_forward_hook(lambda _m, _a, out: post(out)))
        return hooks

    # ----- the language model's calls -----
    def cache_of(self, kwargs: dict[str, Any], out: Any = None) -> Any:
        """The KV cache a call was given, else the one its output returns (``out``, a ModelOutput); None if none."""
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if cache is None and isinstance(out, dict):  # ModelOutput; the key is "cache" from transformers 5.24
            cache = out.get("cache")
            if cache is None:
                cache = out.get("past_key_values")
        return cache

    def cache_len(self, cache: Any, layer: int = 0) -> int:
        """Tokens held by ``cache`` at language-model layer ``layer`` (0 for no cache)."""
        if cache is None:
            return 0
        if isinstance(cache, (tuple, list)):
            raise TokenThinError("tokenthin needs a transformers Cache object (e.g. DynamicCache), not legacy tuples")
        try:
            return int(cache.get_seq_length(layer))
        except (IndexError, KeyError):
            return 0

    def check_prefill_mask(self, mask: torch.Tensor | None) -> None:
        """Refuse a prefill mask the runtime cannot rebuild (a static or compiled cache's 4-D one)."""
        if mask is not None and mask.dim() != 2:
            raise TokenThinError(
                "tokenthin needs a 2-D attention_mask (a dynamic cache); static or compiled caches, which get a 4-D "
                "mask, are not supported"
            )

    def check_decode_mask(self, mask: torch.Tensor, prompt_len: int) -> None:
        """Refuse a decoding step's mask that does not cover the prompt as the caller numbers it."""
        if mask.dim() != 2 or mask.shape[1] < prompt_len:
            raise TokenThinError("tokenthin needs the 2-D attention_mask generate() keeps, covering the prompt")

    def is_cache(self, cache: Any) -> bool:
        """``cache`` is a cache object the runtime can key a shortened prompt on."""
        return cache is not None and not isinstance(cache, (tuple, list))

    def lm_call(self, kwargs: dict[str, Any]) -> LMCall:
        """The language model's call (it is always called with keywords)."""
        return self._call_of(kwargs.get("inputs_embeds"), kwargs)

    def layer_call(self, args: tuple, kwargs: dict[str, Any]) -> LMCall:
        """A decoder layer's call (hidden states first)."""
        return self._call_of(hidden_of(args, kwargs), kwargs)

    def _call_of(self, embeds: torch.Tensor | None, kwargs: dict[str, Any]) -> LMCall:
        return LMCall(
            embeds=embeds,
            mask=kwargs.get("attention_mask"),
            positions=kwargs.get("position_ids"),
            rotary=kwargs.get("position_embeddings"),
            cache=self.cache_of(kwargs),
            cache_slots=kwargs.get("cache_position"),
        )

    def with_lm_call(
        self,
        kwargs: dict[str, Any],
        *,
        embeds: Any = _KEEP,
        mask: Any = _KEEP,
        positions: Any = _KEEP,
        rotary: Any = _KEEP,
        cache_slots: Any = _KEEP,
    ) -> dict[str, Any]:
        """A copy of a language-model (or decoder-layer) call's keyword arguments with the given parts replaced."""
        out = dict(kwargs)
        for key, value in (
            ("inputs_embeds", embeds),
            ("attention_mask", mask),
            ("position_ids", positions),
            ("position_embeddings", rotary),
            ("cache_position", cache_slots),
        ):
            if value is not _KEEP:
                out[key] = value
        return out

    def select_positions(self, positions: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Positions ((B|1, T) or multimodal (S, B|1, T)) of the sequence entries ``idx`` (B, T') of each sample."""
        return _gather_seq(positions, idx, 0 if positions.dim() == 2 else 1)

    def select_rotary(self, rotary: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """A decoder layer's rotary (cos, sin) for the sequence entries ``idx`` (B, T') of each sample."""
        bd = 0 if rotary[0].dim() == 3 else 1
        return tuple(_gather_seq(t, idx, bd) for t in rotary)

    def layer_mask(self, valid_kv: torch.Tensor, q: int, like: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """(B, 1, q, KV) causal mask over keys ``valid_kv`` (B, KV) for the last ``q`` positions, in the format the
        decoder layers read: bool (True attends) unless the incoming mask ``like`` is float or the host runs eager
        attention (additive)."""
        impl = getattr(self.lm_config, "_attn_implementation", None) or "eager"
        _b, kv = valid_kv.shape
        qi = torch.arange(q, device=valid_kv.device).unsqueeze(1) + (kv - q)
        causal = torch.arange(kv, device=valid_kv.device).unsqueeze(0) <= qi  # (q, KV)
        m = valid_kv[:, None, None, :] & causal[None, None]
        m = m | (torch.arange(kv, device=valid_kv.device).unsqueeze(0) == qi)[None, None]  # a token sees itself
        floaty = (isinstance(like, torch.Tensor) and like.is_floating_point()) or (like is None and impl == "eager")
        if floaty:
            return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(~m, torch.finfo(dtype).min)
        return m

    def lm_dims(self) -> LMDims:
        """The language model's shape, for its analytic prefill FLOPs (:mod:`tokenthin.vlm.cost`)."""
        t = self.lm_config
        return LMDims(
            hidden=int(t.hidden_size),
            heads=self.lm_heads,
            kv_heads=self.lm_kv_heads,
            head_dim=self.lm_head_dim,
            mlp_hidden=int(t.intermediate_size),
            num_layers=len(self.lm_layers),
        )

    @property
    def lm_device(self) -> torch.device:
        """Where the language model's first layer runs (for timing)."""
        return self.lm_layers[0].self_attn.q_proj.weight.device

    # ----- language-model attention, for scores inside the LLM -----
    def lm_qk_modules(self, i: int) -> tuple[nn.Module, nn.Module]:
        """Layer i's query and key projections (their outputs: (B, T, heads * head_dim), (B, T, kv * head_dim))."""
        att = self.lm_layers[i].self_attn
        return att.q_proj, att.k_proj

    def rope(self, i: int, t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, which: str) -> torch.Tensor:
        """Layer i's queries (``which="q"``, (B, H, T, d)) or keys ("k", (B, KV, T, d)) as its attention sees them:
        per-head norm where the layer has one (Qwen3-style), then the layer module's own rotary function."""
        att = self.lm_layers[i].self_attn
        norm = getattr(att, f"{which}_norm", None)
        if isinstance(norm, nn.Module):
            t = norm(t)
        mod = sys.modules[type(att).__module__]
        if cos.dim() == 4 and hasattr(mod, "apply_multimodal_rotary_pos_emb"):  # Qwen2-VL before transformers 5.2x
            sec = (getattr(self.lm_config, "rope_scaling", None) or {}).get("mrope_section") or (
                getattr(self.lm_config, "rope_parameters", None) or {}
            ).get("mrope_section")
            return mod.apply_multimodal_rotary_pos_emb(t, t, cos, sin, sec)[0]
        return mod.apply_rotary_pos_emb(t, t, cos, sin)[0]

    def lm_heads_qk(
        self, i: int, q: torch.Tensor, k: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], last_only: bool
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer i's queries (B, H, R, d) for R query rows (the last one, or all) and keys (B, H, T, d), one key
        head per query head, as its attention sees them (rotary applied), from its captured projections."""
        b, t, _ = k.shape
        h, kv, d = self.lm_heads, self.lm_kv_heads, self.lm_head_dim
        rows = slice(t - 1, t) if last_only else slice(0, t)
        qh = q[:, rows].reshape(b, -1, h, d).transpose(1, 2)
        kh = k.view(b, t, kv, d).transpose(1, 2)
        cos, sin = rotary
        qh = self.rope(i, qh, cos[..., rows, :], sin[..., rows, :], "q")
        kh = self.rope(i, kh, cos, sin, "k")
        return qh, kh.repeat_interleave(h // kv, dim=1)

    def lm_logits(
        self, i: int, q: torch.Tensor, k: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], last_only: bool
    ) -> torch.Tensor:
        """Attention logits (B, H, R, T) of layer i for R query rows (the last one, or all), from its captured
        query / key projections ``q``, ``k`` (B, T, ...) and its rotary (cos, sin), scaled as the layer scales them;
        nothing masked."""
        qh, kh = self.lm_heads_qk(i, q, k, rotary, last_only)
        return (qh.float() @ kh.float().transpose(-1, -2)) * self.lm_scale

    # ----- explain() -----
    @property
    def num_layers_reduced(self) -> int:
        return len(self.lm_layers)

    def site_names(self) -> list[str]:
        return ["output", *[f"llm:{i}" for i in range(len(self.lm_layers) - 1)]]

    def describe(self) -> dict[str, Any]:
        return {
            "vision_layers": self.vision_layers,
            "vision_feature_layer": self.feature_layer,
            "vision_signals": self.vision is not None,
            "language_layers": len(self.lm_layers),
        }

    def touched(self) -> list[str]:
        names = {m: n for n, m in self.top.named_modules()}
        return [
            f"{names[self.root] or type(self.root).__name__} (pre/post hooks: find image tokens, open/close a call)",
            f"{names[self.vision_root]} (pre-hook: image layout; query/key capture where a method needs scores)",
            f"{names[self.lm]} (pre-hook: shorter prompt at 'output'; mask/positions of every decoding step)",
            f"{names[self.lm]} layers k.. (for 'llm:k': output hook at k, mask/rotary pre-hooks after k)",
        ]
