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
  (``max``: over valid tokens). The weights are ``exp`` of the key bias: token sizes with proportional attention
  (the default), 1 per valid token with ``prop_attn=False`` (as the attention counts them), 0 on padding.
  ``"map"`` (``AttentionPoolLatent``) gets the key bias as its ``attn_mask``.
  ``"prr"`` pooling takes no mask and is refused.
* The grid is read from each call's input (``dynamic_img_size`` models take other sizes; with ``dynamic_img_pad``
  the grid rounds up).
* ``unmerge=True``: a model that returns tokens (``global_pool=""``, ``num_classes=0``) returns them on the full
  token set again.
Limits: only calls of the model itself (``model(x)``) are reduced; ``forward_features`` / ``forward_intermediates``
called directly run unreduced (a one-time warning says so). A caller's ``attn_mask`` / ``is_causal`` is refused.
"""

from __future__ import annotations

import inspect
import math
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputMismatchError, UnsupportedModelError
from ..flops import EncoderDims
from ..ops import assign
from .contract import Adapter, BiasSource, Layout, Sink, hidden_of, pre_hook_bias
from .registry import register


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


@register
class TimmViTAdapter(Adapter):
    name = "timm_vit"
    priority = 10
    sites = frozenset({"input", "layers", "layer", "output", "block"})
    families = (
        "timm VisionTransformer (timm 1.0.16+: class token and/or registers or none; token, avg and map pooling; "
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
        self.pool = str(root.global_pool)
        if root.attn_pool is not None and "attn_mask" not in inspect.signature(root.attn_pool.forward).parameters:
            raise UnsupportedModelError(
                f"timm global_pool='{self.pool}' ({type(root.attn_pool).__name__}) takes no attention mask, so it "
                "would treat merged and padded tokens as plain ones; use a token, avg or map pooled model"
            )
        self.dims = self._dims()
        self.default_layout = self.layout_for(self.image_size)
        self._open = 0  # calls of the root in progress (to warn about direct forward_features calls)
        self._warned = False

    def _dims(self) -> EncoderDims:
        root, mlp = self.root, self.layers[0].mlp
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
        proj = root.patch_embed.proj
        return EncoderDims(
            hidden=int(root.embed_dim),
            mlp_hidden=mlp_hidden,
            mlp_mats=mats,
            num_layers=len(self.layers),
            patch=self.patch,
            channels=int(proj.in_channels) if hasattr(proj, "in_channels") else 3,
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

    # ----- tokens -----
    def layout_for(self, size: tuple[int, int] | int | None) -> Layout:
        if size is None:
            return self.default_layout
        h, w = _pair(size)
        if self.pad:  # dynamic_img_pad: the patch embedding pads the image up to whole patches
            grid = (math.ceil(h / self.patch[0]), math.ceil(w / self.patch[1]))
        else:
            grid = (h // self.patch[0], w // self.patch[1])
        return Layout(protected=self.num_protected, grid=grid, cls=self.root.cls_token is not None)

    def images(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        x = kwargs.get("x", args[0] if args else None)
        if not isinstance(x, torch.Tensor):
            raise InputMismatchError("expected the image batch (a float tensor) as the model's first argument")
        return x

    def call_layout(self, args: tuple, kwargs: dict[str, Any]) -> tuple[Layout, int, torch.Tensor]:
        x = self.images(args, kwargs)
        if kwargs.get("attn_mask") is not None or kwargs.get("is_causal") or len(args) > 1:
            raise InputMismatchError("tokenthin cannot combine a caller-supplied attn_mask / is_causal with merging")
        if not x.is_floating_point():
            raise InputMismatchError(f"the images have dtype {x.dtype}; convert them to float and normalise them")
        return self.layout_for((x.shape[-2], x.shape[-1])), x.shape[0], x

    def call_args(self, x: torch.Tensor) -> tuple[tuple, dict[str, Any]]:
        return (x,), {}

    @property
    def input_patch(self) -> int:
        return self.patch[0]

    def shrink_input(self, args: tuple, kwargs: dict[str, Any], size: tuple[int, int]) -> tuple[tuple, dict]:
        if not getattr(self.root, "dynamic_img_size", False):
            raise InputMismatchError(
                "site 'input' feeds a smaller image, and this timm model has a fixed input size: create it with "
                "dynamic_img_size=True (timm.create_model(name, dynamic_img_size=True))"
            )
        x = self.images(args, kwargs)
        small = F.interpolate(x.float(), size=size, mode="bilinear", align_corners=False, antialias=True).to(x.dtype)
        if "x" in kwargs or not args:
            return args, {**kwargs, "x": small}
        return (small, *args[1:]), kwargs

    # ----- layers and signals -----
    def layer_input(self, args: tuple, kwargs: dict[str, Any]) -> torch.Tensor:
        return hidden_of(args, kwargs, "x")

    def bias_hooks(self, rt: BiasSource) -> list[Any]:
        """``Block.forward(x, attn_mask=None, ...)``: a pre-hook passes the key bias as ``attn_mask``."""
        return pre_hook_bias(self.layers, rt, "attn_mask", 1, "attn_mask")

    def capture_qk(self, i: int, want_q: bool, sink: Sink) -> list[Any]:
        att = self.layers[i].attn
        hooks = [att.k_norm.register_forward_hook(lambda _m, _a, out: sink("k", _flat(out)))]
        if want_q:
            hooks.append(att.q_norm.register_forward_hook(lambda _m, _a, out: sink("q", _flat(out))))
        return hooks

    # ----- consumers -----
    def consumer_hooks(self, rt: BiasSource) -> list[Any]:
        handles = self._direct_call_warning()
        if self.pool == "map":
            handles.append(self.root.attn_pool.register_forward_pre_hook(_pool_bias(rt, self), with_kwargs=True))
        elif self.pool in ("avg", "avgmax", "max"):
            handles += _weighted_pool(rt, self)
        return handles

    def _direct_call_warning(self) -> list[Any]:
        def opened(*_a: Any) -> None:
            self._open += 1

        def closed(*_a: Any) -> None:
            self._open = max(0, self._open - 1)

        def check(*_a: Any) -> None:
            if not self._open and not self._warned:
                self._warned = True
                warnings.warn(
                    "tokenthin reduces calls of the timm model itself (model(x)); forward_features / "
                    "forward_intermediates called directly run unreduced",
                    stacklevel=2,
                )

        return [
            self.root.register_forward_pre_hook(opened),
            self.root.register_forward_hook(closed, always_call=True),
            self.root.patch_embed.register_forward_pre_hook(check),
        ]

    def finish(self, out: Any, source: torch.Tensor | None, unmerge: bool) -> Any:
        if unmerge and source is not None and isinstance(out, torch.Tensor) and out.dim() == 3:
            return assign.unmerge(out, source)
        return None

    def describe(self) -> dict[str, Any]:
        return {"patch": self.patch, "image_size": self.image_size, "global_pool": self.pool}

    def touched(self) -> list[str]:
        names = {m: n for n, m in self.top.named_modules()}
        out = [f"{names[self.root] or type(self.root).__name__} (pre/post hooks: open and close a call)"]
        for blk in self.layers:
            out.append(f"{names[blk]} (attn_mask pre-hook; output hook at reduction points)")
            out.append(f"{names[blk.attn.q_norm]}, {names[blk.attn.k_norm]} (query/key capture for scores)")
        if self.pool == "map":
            out.append(f"{names[self.root.attn_pool]} (attn_mask pre-hook: key bias)")
        elif self.pool in ("avg", "avgmax", "max"):
            out.append(f"{names[self.root.norm]}, {names[self.root.fc_norm]} (size-weighted pooling of valid tokens)")
        return out


def _flat(t: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, head_dim) from q_norm / k_norm -> (B, N, heads * head_dim)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def _pool_bias(rt: BiasSource, a: TimmViTAdapter):
    def pre(_m: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        bias = rt.current_bias()
        if bias is None:
            return None
        x = hidden_of(args, kwargs, "x")
        if x.shape[1] != bias.shape[1]:  # the pool reads the tokens after the prefix
            bias = bias[:, a.num_protected :]
        if kwargs.get("attn_mask") is not None:
            raise InputMismatchError("tokenthin cannot combine a caller-supplied attn_mask with merging")
        return args, {**kwargs, "attn_mask": bias.to(x.dtype).view(x.shape[0], 1, 1, -1)}

    return pre


def _weighted_pool(rt: BiasSource, a: TimmViTAdapter) -> list[Any]:
    """``avg`` / ``avgmax`` / ``max`` pooling that weighs each token by exp(key bias) and skips padding: a hook on
    ``norm`` keeps the final tokens of this call, a pre-hook on ``fc_norm`` replaces timm's plain pooled input."""
    kept: dict[str, Any] = {}

    def keep_tokens(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
        kept.clear()
        bias = rt.current_bias()
        if bias is not None and out.dim() == 3 and out.shape[1] == bias.shape[1]:
            kept["bias"], kept["x"] = bias, out

    def repool(_m: nn.Module, args: tuple) -> tuple | None:
        bias = rt.current_bias()
        if bias is None or kept.get("bias") is not bias:  # not this call's tokens
            return None
        x = kept.pop("x")
        kept.clear()
        w = bias.float().exp()  # token size (prop_attn) or 1; 0 on padding
        if not a.root.pool_include_prefix:
            x, w = x[:, a.num_protected :], w[:, a.num_protected :]
        mean = ((x.float() * w.unsqueeze(-1)).sum(1) / w.sum(1, keepdim=True)).to(x.dtype)
        if a.pool == "avg":
            return (mean, *args[1:])
        top = x.masked_fill((w == 0).unsqueeze(-1), float("-inf")).amax(1)
        return ((top if a.pool == "max" else 0.5 * (top + mean)), *args[1:])

    return [a.root.norm.register_forward_hook(keep_tokens), a.root.fc_norm.register_forward_pre_hook(repool)]
