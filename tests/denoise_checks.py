"""Shared invariants of block-local denoiser methods (tests/test_methods_todo.py, _tofu.py, _toma.py): zero budget
is the identity, batch == singles, a CFG batch == separate runs, SDPA == eager, remove() is exact, bf16 runs."""

from __future__ import annotations

from typing import Any

import torch

import tokenthin
from tiny_diffusers import cond_kwargs, plain_unet, run, sd_unet, sdxl_unet

BUILDERS = {"sd": sd_unet, "sdxl": sdxl_unet, "plain": plain_unet}


def latent(model: torch.nn.Module, b: int = 2, hw: tuple[int, int] = (16, 16), seed: int = 0) -> torch.Tensor:
    return torch.randn(b, model.config.in_channels, *hw, generator=torch.Generator().manual_seed(seed))


def identity(family: str, method: str, zero: dict[str, Any]) -> None:
    model = BUILDERS[family]()
    x = latent(model)
    ref = run(model, x)
    with tokenthin.applied(model, method, max_downsample=8, **zero):
        assert (run(model, x) - ref).abs().max() <= 1e-5


def batch_singles_and_remove(family: str, method: str, params: dict[str, Any]) -> None:
    model = BUILDERS[family]()
    x = latent(model, b=3)
    ref = run(model, x)
    tokenthin.apply(model, method, **params)
    got = run(model, x)
    assert got.shape == ref.shape and 0 < (got - ref).abs().max() < float("inf")
    assert any(a > b for a, b in zip(tokenthin.info(model).tokens_in, tokenthin.info(model).tokens_per_layer))
    kw = cond_kwargs(model, 3) if hasattr(model.config, "cross_attention_dim") else {}
    for i in range(3):
        one = {k: v[i : i + 1] for k, v in kw.items() if k != "added_cond_kwargs"}
        if "added_cond_kwargs" in kw:
            one["added_cond_kwargs"] = {k: v[i : i + 1] for k, v in kw["added_cond_kwargs"].items()}
        assert torch.allclose(run(model, x[i : i + 1], **one)[0], got[i], atol=1e-5)
    tokenthin.remove(model)
    assert (run(model, x) - ref).abs().max() == 0.0 and not tokenthin.is_applied(model)


def cfg_batch(method: str, params: dict[str, Any]) -> None:
    model = sd_unet()
    x = latent(model, b=1)
    cond, uncond = torch.randn(1, 5, 32), torch.zeros(1, 5, 32)
    with tokenthin.applied(model, method, **params):
        both = run(model, torch.cat([x, x]), 981, encoder_hidden_states=torch.cat([uncond, cond]))
        apart = [run(model, x, 981, encoder_hidden_states=e) for e in (uncond, cond)]
    assert torch.allclose(both, torch.cat(apart), atol=1e-5)


def sdpa_eager(family: str, method: str, params: dict[str, Any]) -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    got = []
    for proc in (AttnProcessor2_0(), AttnProcessor()):
        model = BUILDERS[family]()
        for m in model.modules():
            if isinstance(m, Attention):
                m.set_processor(proc)
        ref = run(model, latent(model))
        with tokenthin.applied(model, method, **params):
            got.append(run(model, latent(model)))
        assert (got[-1] - ref).abs().max() > 0
    assert (got[0] - got[1]).abs().max() <= 1e-5


def bf16(family: str, method: str, params: dict[str, Any]) -> None:
    model = BUILDERS[family]().to(torch.bfloat16)
    x = latent(model).to(torch.bfloat16)
    kw = cond_kwargs(model, 2) if hasattr(model.config, "cross_attention_dim") else {}
    kw = {k: v.to(torch.bfloat16) for k, v in kw.items() if k != "added_cond_kwargs"} | (
        {"added_cond_kwargs": {k: v.to(torch.bfloat16) for k, v in kw["added_cond_kwargs"].items()}}
        if "added_cond_kwargs" in kw
        else {}
    )
    with tokenthin.applied(model, method, **params):
        out = run(model, x, **kw)
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())


def capture(module: torch.nn.Module, store: dict) -> list:
    """Hooks recording a module's call arguments and output (remove them after)."""

    def pre(_m, args, kwargs):
        store["args"], store["kwargs"] = args, kwargs

    def post(_m, _a, out):
        store["out"] = out

    return [module.register_forward_pre_hook(pre, with_kwargs=True), module.register_forward_hook(post)]
