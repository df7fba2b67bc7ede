"""timm ``VisionTransformer`` (timm 1.0.16+): ViT, DeiT, DeiT-3, DINOv2 (with registers), CLIP/SigLIP image towers
as timm builds them, with or without a class token, with ``avg`` / ``token`` / ``map`` pooling.

Seams (no forward body copied; checked on timm 1.0.16 - 1.0.31):
* ``Block.forward(x, attn_mask=None)`` hands ``attn_mask`` to ``Attention``, which adds it to the logits on both
  paths (``fused_attn``: SDPA ``attn_mask``; explicit: ``maybe_add_mask``). A forward pre-hook on each block passes
  the additive key bias (log token size, large negative on padding) as ``attn_mask``; the runtime's forward hook
  on the block replaces its output by the reduced tokens. LayerScale (``ls1``/``ls2``) and drop-path stay inside
  the untouched block, so they are never skipped (the official ToMe patch copies ``Block.forward`` and loses them).
* Queries and keys: timm fuses them into one ``qkv`` projection and normalises them per head (``q_norm`` /
  ``k_norm``, ``nn.Identity`` without qk-norm). The capture hooks sit on ``q_norm`` / ``k_norm``: their outputs are
  exactly the (B, heads, N, head_dim) queries and keys the attention uses, with no splitting of the fused output.
  Deviation from the official ToMe timm patch: it takes keys before ``k_norm`` (it ignores qk-norm); without
  qk-norm the two are identical.
* Protected tokens: the ``num_prefix_tokens`` leading tokens (class token, then ``reg_tokens`` registers).
* Heads: ``global_pool="token"`` reads the class token (protected). ``"avg"`` (also ``"avgmax"`` / ``"max"``)
  would average merged and padded tokens as if each were one valid patch: a forward hook on ``norm`` keeps the
  final tokens and a pre-hook on ``fc_norm`` replaces the plain mean by the size-weighted mean over valid tokens
  (``max``: over valid tokens). ``"map"`` (``AttentionPoolLatent``) gets the key bias as its ``attn_mask``.
  ``"prr"`` pooling takes no mask and is refused.
* The grid is read from each call's input (``dynamic_img_size`` models take other sizes; with ``dynamic_img_pad``
  the grid rounds up).
Limits: only calls of the model itself are reduced (``model(x)``); ``forward_features`` / ``forward_intermediates``
called directly run unreduced.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import torch
from torch import nn

from ..errors import InputMismatchError, UnsupportedModelError
from ..flops import EncoderDims
from .base import Adapter


def _pair(v: Any) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (list, tuple)) else (int(v), int(v))


def _is_vit(m: nn.Module) -> bool:
    """Duck-typed: a timm VisionTransformer (blocks taking ``attn_mask``, fused-qkv attention), not Eva (rope)."""
    if not all(hasattr(m, a) for a in ("patch_embed", "blocks", "num_prefix_tokens", "no_embed_class", "attn_pool")):
        return False
    blocks = m.blocks
    if not isinstance(blocks, (nn.Sequential, nn.ModuleList)) or len(blocks) == 0 or getattr(m, "rope", None):
        return False
    for b in blocks:
        att = getattr(b, "attn", None)
        if not (isinstance(getattr(att, "qkv", None), nn.Linear) and hasattr(att, "k_norm") and hasattr(att, "q_norm")):
            return False
        if "attn_mask" not in inspect.signature(b.forward).parameters:
            return False
    return True


class TimmViTAdapter(Adapter):
    families = (
        "timm VisionTransformer (timm 1.0.16+; class token and/or registers or none; token, avg and map pooling; "
        "LayerScale, qk-norm, dynamic_img_size)"
    )

    def __init__(self, top: nn.Module, root: nn.Module) -> None:
        self.top, self.root = top, root
        self.layers = list(root.blocks)
        self.family = "timm-vit"
        self.num_protected = int(root.num_prefix_tokens)
        att = self.layers[0].attn
        self.num_heads = int(att.num_heads)
        self.head_dim = int(att.head_dim)
        self.scale = float(att.scale)
        pe = root.patch_embed
        self.patch = _pair(pe.patch_size)
        self.image_size = _pair(pe.img_size) if pe.img_size is not None else (224, 224)
        self.pad = bool(getattr(pe, "dynamic_img_pad", False))
        self.layer_takes_mask = False  # the runtime must not pass HF's attention_mask; _block_bias passes attn_mask
        self.pool = str(root.global_pool)
        if root.attn_pool is not None and "attn_mask" not in inspect.signature(root.attn_pool.forward).parameters:
            raise UnsupportedModelError(
                f"timm global_pool='{self.pool}' ({type(root.attn_pool).__name__}) takes no attention mask, so it "
                "would treat merged and padded tokens as plain ones; use a token, avg or map pooled model"
            )
        mlp = self.layers[0].mlp
        if hasattr(mlp, "fc1_g"):  # SwiGLU: separate gate and value
            mlp_hidden, mats = mlp.fc1_g.out_features, 3
        elif hasattr(mlp, "chunk_dim"):  # GluMlp: fused gate and value in fc1
            mlp_hidden, mats = mlp.fc1.out_features // 2, 3
        else:
            mlp_hidden, mats = mlp.fc1.out_features, 2
        head, head_mlp = "none", 0
        if self.pool == "map":
            head = "map"
            head_mlp = root.attn_pool.mlp.fc1.out_features if root.attn_pool.mlp is not None else 0
        self.dims = EncoderDims(
            hidden=int(root.embed_dim),
            mlp_hidden=mlp_hidden,
            mlp_mats=mats,
            num_layers=len(self.layers),
            patch=self.patch,
            channels=int(pe.proj.in_channels) if hasattr(pe.proj, "in_channels") else 3,
            num_protected=self.num_protected,
            head=head,
            head_mlp_hidden=head_mlp,
        )

    @classmethod
    def detect(cls, model: nn.Module) -> TimmViTAdapter | None:
        for m in model.modules():
            if _is_vit(m):
                return cls(model, m)
        return None

    def grid(self, pv: torch.Tensor) -> tuple[int, int]:
        h, w = pv.shape[-2], pv.shape[-1]
        if self.pad:
            return math.ceil(h / self.patch[0]), math.ceil(w / self.patch[1])
        return h // self.patch[0], w // self.patch[1]

    def pixel_values(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        pv = kwargs.get("x", args[0] if args else None)
        if not isinstance(pv, torch.Tensor):
            raise TypeError("expected the image batch as the first argument")
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal"):
            raise InputMismatchError("tokenthin cannot combine a caller-supplied attn_mask / is_causal with merging")
        return pv

    def images_call(self, pv: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
        return (pv,), {}

    def with_pixel_values(self, args: tuple, kwargs: dict[str, Any], pv: torch.Tensor) -> tuple[tuple, dict]:
        if not getattr(self.root, "dynamic_img_size", False):
            raise InputMismatchError(
                "site 'input' feeds a smaller image; this timm model has a fixed input size. Create it with "
                "dynamic_img_size=True (timm.create_model(..., dynamic_img_size=True))"
            )
        if "x" in kwargs or not args:
            return args, {**kwargs, "x": pv}
        return (pv, *args[1:]), kwargs

    def qk_modules(self, i: int) -> tuple[nn.Module, nn.Module]:
        att = self.layers[i].attn
        return att.q_norm, att.k_norm

    @staticmethod
    def flat(t: torch.Tensor) -> torch.Tensor:
        """(B, heads, N, head_dim) captured by the q_norm / k_norm hooks -> (B, N, heads * head_dim)."""
        b, h, n, d = t.shape
        return t.transpose(1, 2).reshape(b, n, h * d)

    def extra_hooks(self, runtime: Any) -> list[torch.utils.hooks.RemovableHandle]:
        handles = [blk.register_forward_pre_hook(_block_bias(runtime), with_kwargs=True) for blk in self.layers]
        handles += self._capture_hooks(runtime)
        root = self.root
        if self.pool == "map":
            handles.append(root.attn_pool.register_forward_pre_hook(_pool_bias(runtime, self), with_kwargs=True))
        elif self.pool in ("avg", "avgmax", "max"):
            handles += _weighted_pool(runtime, self)
        return handles

    def _capture_hooks(self, runtime: Any) -> list[torch.utils.hooks.RemovableHandle]:
        # Draft for today's runtime, which stores the raw outputs of qk_modules: these hooks run after its own
        # and replace the per-head captures by flat ones (to be replaced by the host contract's capture seam).
        handles = []
        for i in sorted(runtime.capture):
            att = self.layers[i].attn
            pairs = [(att.k_norm, "k"), (att.q_norm, "q")] if runtime.need_q else [(att.k_norm, "k")]
            for mod, which in pairs:

                def hook(_m: nn.Module, _a: tuple, out: torch.Tensor, i: int = i, which: str = which) -> None:
                    st = runtime.call_state()
                    if st is not None:
                        getattr(st, which)[i] = self.flat(out.detach())

                handles.append(mod.register_forward_hook(hook))
        return handles

    def touched(self) -> list[str]:
        names = {m: n for n, m in self.top.named_modules()}
        out = [f"{names[self.root] or type(self.root).__name__} (pre/post hooks: open and close a call)"]
        for i, blk in enumerate(self.layers):
            out.append(f"{names[blk]} (attn_mask pre-hook; output hook at reduction points)")
            q, k = self.qk_modules(i)
            out.append(f"{names[q]}, {names[k]} (query/key capture where a method needs scores)")
        if self.pool == "map":
            out.append(f"{names[self.root.attn_pool]} (attn_mask pre-hook: key bias)")
        elif self.pool in ("avg", "avgmax", "max"):
            out.append(f"{names[self.root.norm]}, {names[self.root.fc_norm]} (size-weighted pooling over valid tokens)")
        return out


def _block_bias(runtime: Any):
    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        bias = runtime.current_bias()
        if bias is None:
            return None
        x = args[0] if args else kwargs["x"]
        return args, {**kwargs, "attn_mask": bias.to(x.dtype).view(x.shape[0], 1, 1, -1)}

    return pre


def _pool_bias(runtime: Any, a: TimmViTAdapter):
    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        bias = runtime.current_bias()
        if bias is None:
            return None
        x = args[0] if args else kwargs["x"]
        if x.shape[1] != bias.shape[1]:  # the pool saw the tokens without the prefix
            bias = bias[:, a.num_protected :]
        return args, {**kwargs, "attn_mask": bias.to(x.dtype).view(x.shape[0], 1, 1, -1)}

    return pre


def _weighted_pool(runtime: Any, a: TimmViTAdapter) -> list[torch.utils.hooks.RemovableHandle]:
    """``avg`` / ``avgmax`` / ``max`` pooling that counts each token by its size and skips padding."""
    last: dict[str, Any] = {}

    def keep_tokens(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        last["call"], last["x"] = runtime.call_state(), out

    def repool(_m: nn.Module, args: tuple) -> tuple | None:
        st = runtime.call_state()
        if st is None or last.get("call") is not st or (st.size is None and st.valid is None):
            return None
        x = last.pop("x")
        last.clear()
        b, n, _ = x.shape
        w = st.size.to(x.dtype) if st.size is not None else x.new_ones(b, n)
        valid = st.valid if st.valid is not None else torch.ones(b, n, dtype=torch.bool, device=x.device)
        if not a.root.pool_include_prefix:
            x, w, valid = x[:, a.num_protected :], w[:, a.num_protected :], valid[:, a.num_protected :]
        w = w * valid.to(x.dtype)
        mean = (x * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)
        if a.pool == "avg":
            return (mean, *args[1:])
        top = x.masked_fill(~valid.unsqueeze(-1), float("-inf")).amax(1)
        return ((top if a.pool == "max" else 0.5 * (top + mean)), *args[1:])

    return [a.root.norm.register_forward_hook(keep_tokens), a.root.fc_norm.register_forward_pre_hook(repool)]
