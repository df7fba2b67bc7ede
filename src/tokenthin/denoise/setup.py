"""Setting up the denoiser runtime from a request: the budget (``ratio`` / ``keep``), the blocks (``max_downsample``
or ``site="block:k"``) and the parts (``merge_attn`` / ``merge_crossattn`` / ``merge_mlp``).

A method that acts on denoisers may declare these parameters under tomesd's names; the runtime reads them here and
nowhere else (and, for a soft-mode method, ``reuse_steps``, its plan reuse across calls, and ``tile``, its tile
side). A method whose own parameters fix its budget (``Method.block_ratio``: ToDo's ``downsample_factor``) takes
neither ``ratio=`` nor ``keep=``. Methods that do not (``tome``, ``random``, ``pool``) take ``keep=`` and merge in
the level-0 blocks' self-attention, tomesd's defaults.
"""

from __future__ import annotations

from torch import nn

from ..adapters.denoiser import PART_ROLES, DenoiserAdapter
from ..budget import Request, parse_site
from ..errors import BudgetError, SiteError, TokenThinError, UnsupportedModelError
from ..methods.base import Method
from .runtime import DenoiserRuntime
from .state import BlockOptions

DEFAULT_RATIO = 0.5  # tomesd's
PART_FLAGS = {"attn": "merge_attn", "cross": "merge_crossattn", "mlp": "merge_mlp"}  # tomesd's names


def build(model: nn.Module, adapter: DenoiserAdapter, cls: type[Method], m: Method, req: Request) -> DenoiserRuntime:
    """The denoiser runtime for ``m`` on ``adapter``'s host (not attached)."""
    what = type(model).__name__
    if cls.runtimes and "denoiser" not in cls.runtimes:
        raise UnsupportedModelError(f"method '{cls.name}' is not made for denoisers ({what})")
    if "block" not in cls.sites or cls.needs_prompt:
        raise SiteError(
            f"method '{cls.name}' does not act inside a denoiser's blocks; on {what} use a block-local method "
            "('tomesd', or 'tome' / 'random' / 'pool' with keep=)"
        )
    if cls.signals - {"keys"}:
        raise SiteError(f"method '{cls.name}' reads attention, which a denoiser block cannot give before it runs")
    if hasattr(m, "calibrate"):
        raise TokenThinError(f"method '{cls.name}' calibrates on images; it is not supported on denoisers")
    if req.r is not None or req.flops is not None:
        raise BudgetError(
            "on a denoiser give ratio= (tomesd: the fraction of each block's tokens merged away) or keep= (the "
            "fraction each block computes on); r= and flops= are not supported there"
        )
    if req.unmerge or req.image_size is not None:
        raise TokenThinError("unmerge= and image_size= do not apply to denoisers: every block hands on all tokens")
    if req.prop_attn:
        raise TokenThinError(
            "proportional attention is not supported on denoisers (tomesd merges without it); drop prop_attn="
        )
    own = m.block_ratio()
    if own is not None:
        if req.keep is not None:
            raise BudgetError(
                f"'{cls.name}' sets its own budget through its parameters (it removes {own:.0%} of each chosen "
                "block's tokens); drop keep="
            )
        ratio = own
    else:
        ratio = _ratio(cls, m, req.keep)
    max_ds = int(m.p.get("max_downsample", 1))
    roles = tuple(r for r in PART_ROLES if bool(m.p.get(PART_FLAGS[r], r == "attn")))
    if not roles:
        raise TokenThinError("nothing to merge: set at least one of merge_attn, merge_crossattn, merge_mlp to True")
    mode = cls.block_mode
    if mode not in ("merge", "kv", "soft"):
        raise TokenThinError(f"method '{cls.name}' has block_mode={mode!r}; one of 'merge', 'kv', 'soft'")
    if mode not in adapter.block_modes:
        raise UnsupportedModelError(
            f"method '{cls.name}' acts in block mode '{mode}', which {adapter.family} cannot take "
            f"({adapter.block_modes_note}); see tokenthin.support() for what works here"
        )
    if mode == "kv" and roles != ("attn",):
        raise TokenThinError(f"'{cls.name}' reduces the self-attention's keys and values only (parts: attn)")
    reuse = int(m.p.get("reuse_steps", 1))
    n = len(adapter.blocks)
    kind, k = parse_site(req.site, n) if req.site is not None else ("block", None)
    if kind != "block":
        raise SiteError(f"a denoiser offers site 'block' (or 'block:k', k in 0..{n - 1}), not '{req.site}'")
    blocks = (k,) if k is not None else tuple(i for i in range(n) if 2 ** adapter.level(i) <= max_ds)
    tile = int(m.p.get("tile", 8)) if mode == "soft" else 0  # ToMA's tiles set its planning cost
    options = BlockOptions(ratio, max_ds, blocks, roles, mode=mode, reuse_steps=reuse, soft_tile=tile)
    return DenoiserRuntime(model, adapter, m, options)


def _ratio(cls: type[Method], m: Method, keep: object) -> float:
    own = m.p.get("ratio") if "ratio" in cls.params else None
    if own is not None and keep is not None:
        raise BudgetError(f"give ratio= or keep= (= 1 - ratio), not both; got ratio={own}, keep={keep}")
    if keep is not None:
        if isinstance(keep, bool) or not isinstance(keep, float) or not 0 < keep <= 1:
            raise BudgetError(
                f"keep={keep!r}: on a denoiser keep= is the fraction in (0, 1] of each block's tokens that its "
                "parts compute on (blocks differ in size: a count cannot fit them all)"
            )
        return 1.0 - keep
    if own is None:
        if "ratio" in cls.params:
            return DEFAULT_RATIO
        raise BudgetError(f"give keep= (the fraction of each block's tokens '{cls.name}' keeps, e.g. keep=0.5)")
    return float(own)
