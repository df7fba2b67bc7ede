"""Diffusion transformers (hosts diffusers_dit: DiT / PixArt, diffusers_sd3, diffusers_flux): block-local merging of
image tokens, text tokens untouched, tomesd and the baselines."""

from __future__ import annotations

import inspect

import pytest
import torch

import tokenthin
from tiny_diffusers import dit, dit_cond, dit_input, dit_pipeline, dit_run, flux, flux_ids, pixart, sd3
from tokenthin.adapters.registry import find_adapter

pytest.importorskip("diffusers")

BUILDERS = {"dit": dit, "pixart": pixart, "sd3": sd3, "flux": flux}
HOSTS = {"dit": "diffusers_dit", "pixart": "diffusers_dit", "sd3": "diffusers_sd3", "flux": "diffusers_flux"}
BASELINES = [("tomesd", {"ratio": 0.5}), ("tome", {"keep": 0.5}), ("random", {"keep": 0.5}), ("pool", {"keep": 0.5})]


def sliced(kw: dict, i: int) -> dict:
    return {k: v[i : i + 1] for k, v in kw.items()}


def test_blocks_and_parts_of_each_family() -> None:
    d = find_adapter(dit())
    assert d.name == "diffusers_dit" and d.kind == "denoiser" and len(d.blocks) == 2
    assert set(d.parts(0)) == {"attn", "mlp"} and d.blocks[0].downsample == 2 and d.level(1) == 0
    assert set(find_adapter(pixart()).parts(0)) == {"attn", "cross", "mlp"}
    s = find_adapter(sd3())
    assert s.name == "diffusers_sd3" and len(s.blocks) == 3
    assert set(s.parts(0)) == {"attn", "attn2", "mlp"} and s.parts(0)["attn2"].role == "attn"
    assert set(s.parts(1)) == {"attn", "mlp"}
    f = find_adapter(flux())
    assert f.name == "diffusers_flux" and len(f.blocks) == 4 and f.blocks[2].name == "single_transformer_blocks.0"
    assert set(f.parts(0)) == {"attn", "mlp"} and set(f.parts(2)) == {"attn"}
    names = {h["name"] for h in tokenthin.hosts() if h["kind"] == "denoiser"}
    assert {"diffusers_dit", "diffusers_sd3", "diffusers_flux"} <= names
    e = tokenthin.explain(flux())
    assert e["sites"][0] == "block" and e["layers"] == 4 and any("proj_out" in t for t in e["touched_modules"])
    assert any("processor (wrapped" in t for t in e["touched_modules"])


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize(("method", "budget"), [("tomesd", {"ratio": 0.0}), ("tome", {"keep": 1.0})])
def test_zero_ratio_is_identity(family: str, method: str, budget: dict) -> None:
    model = BUILDERS[family]()
    x = dit_input(model, 2)
    ref = dit_run(model, x)
    with tokenthin.applied(model, method, **budget):
        assert (dit_run(model, x) - ref).abs().max() <= 1e-5
        assert tokenthin.info(model).merged == [0] * len(find_adapter(model).blocks)


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize(("method", "budget"), BASELINES)
def test_merging_changes_outputs_batch_equals_singles_and_remove_is_exact(
    family: str, method: str, budget: dict
) -> None:
    model = BUILDERS[family]()
    x, kw = dit_input(model, 3), dit_cond(model, 3)
    t = torch.tensor([0.3, 0.5, 0.7]) if family == "flux" else torch.tensor([10.0, 20.0, 30.0])
    ref = dit_run(model, x, t, **kw)
    extra = {"merge_mlp": True, "merge_crossattn": True} if method == "tomesd" else {}
    tokenthin.apply(model, method, **budget, **extra)
    got = dit_run(model, x, t, **kw)
    assert got.shape == ref.shape and 0 < (got - ref).abs().max() < float("inf")
    info = tokenthin.info(model)
    assert all(a > b for a, b in zip(info.tokens_in, info.tokens_per_layer, strict=True))
    for i in range(3):
        single = dit_run(model, x[i : i + 1], t[i : i + 1], **sliced(kw, i))
        assert torch.allclose(single[0], got[i], atol=1e-5), (i, (single[0] - got[i]).abs().max())
    tokenthin.remove(model)
    assert torch.equal(dit_run(model, x, t, **kw), ref) and not tokenthin.is_applied(model)


@pytest.mark.parametrize("family", ["dit", "pixart", "sd3", "flux"])
def test_cfg_batch_equals_separate_runs(family: str) -> None:
    model = BUILDERS[family]()
    x = dit_input(model, 1)
    cond = dit_cond(model, 1)
    if family == "dit":
        uncond = {"class_labels": torch.tensor([1000])}  # the null class
    else:
        uncond = {k: torch.zeros_like(v) for k, v in cond.items()}
    both_kw = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
    t = 0.6 if family == "flux" else 981
    tokenthin.apply(model, "tomesd", ratio=0.5, merge_crossattn=True, merge_mlp=True)
    both = dit_run(model, torch.cat([x, x]), t, **both_kw)
    apart = [dit_run(model, x, t, **c) for c in (uncond, cond)]
    assert torch.allclose(both, torch.cat(apart), atol=1e-5)
    tokenthin.remove(model)


@pytest.mark.parametrize("family", ["dit", "pixart"])
def test_sdpa_equals_eager_processors(family: str) -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    got = []
    for proc in (AttnProcessor2_0(), AttnProcessor()):
        model = BUILDERS[family]()
        for m in model.modules():  # DiT has no set_attn_processor
            if isinstance(m, Attention):
                m.set_processor(proc)
        with tokenthin.applied(model, "tomesd", ratio=0.5, merge_crossattn=True, merge_mlp=True):
            got.append(dit_run(model, dit_input(model, 2)))
    assert (got[0] - got[1]).abs().max() <= 1e-5


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_math_attention_equals_the_default_kernel(family: str) -> None:
    """SD3 and Flux have one SDPA processor each: its math kernel (SD3: sdpa_kernel; Flux: the "_native_math"
    backend, set after apply through the processor wrapper) gives the default kernel's result."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    model = BUILDERS[family]()
    x = dit_input(model, 2)
    with tokenthin.applied(model, "tomesd", ratio=0.5):
        fast = dit_run(model, x)
        if family == "sd3":
            with sdpa_kernel([SDPBackend.MATH]):
                slow = dit_run(model, x)
        else:
            model.set_attention_backend("_native_math")
            slow = dit_run(model, x)
            assert str(find_adapter(model).blocks[0].parts["attn"].attention.processor.inner._attention_backend)
    assert (fast - slow).abs().max() <= 1e-5


def test_flux_processors_are_wrapped_then_restored_exactly() -> None:
    from tokenthin.adapters.diffusers_flux import SlotRotaryProcessor

    model = flux()
    before = dict(model.attn_processors)
    tokenthin.apply(model, "tomesd", ratio=0.5, max_downsample=1)
    assert all(isinstance(p, SlotRotaryProcessor) for p in model.attn_processors.values())
    tokenthin.remove(model)
    after = model.attn_processors
    assert before.keys() == after.keys() and all(after[k] is before[k] for k in before)
    # only the chosen blocks' processors are wrapped
    tokenthin.apply(model, "tomesd", ratio=0.5, site="block:3")
    wrapped = [k for k, p in model.attn_processors.items() if isinstance(p, SlotRotaryProcessor)]
    assert wrapped == ["single_transformer_blocks.1.attn.processor"]
    tokenthin.remove(model)
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    model.single_transformer_blocks[0].attn.set_processor(FluxIPAdapterAttnProcessor(16, 16))
    with pytest.raises(tokenthin.UnsupportedModelError, match="FluxAttnProcessor"):
        tokenthin.apply(model, "tomesd", ratio=0.5)
    assert not tokenthin.is_applied(model) and not any(
        isinstance(p, SlotRotaryProcessor) for p in model.attn_processors.values()
    )
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


def test_flux_rotary_rows_follow_the_kept_tokens() -> None:
    """Every merged slot is computed with the rotary row of the token it keeps (not of its slot index), text rows
    unchanged; samples that keep different tokens run their attention apart."""
    from tokenthin.adapters.diffusers_flux import SlotRotary

    cos, sin = torch.randn(7, 4), torch.randn(7, 4)
    c, s = SlotRotary(cos, sin, text=3, slots=torch.tensor([[0, 2], [1, 3]])).rows(torch.tensor([0, 2]))
    assert torch.equal(c, cos[[0, 1, 2, 3, 5]]) and torch.equal(s, sin[[0, 1, 2, 3, 5]])
    model = flux()
    x, kw = dit_input(model, 2, hw=(4, 4)), dit_cond(model, 2)
    img, txt = flux_ids(4, 4)
    full_cos, full_sin = model.pos_embed(torch.cat([txt, img]))
    seen: dict[str, torch.Tensor] = {}

    def grab(_m: torch.nn.Module, _a: tuple, o: tuple) -> None:
        seen.setdefault("x", o[0])

    hook = model.transformer_blocks[0].norm1.register_forward_hook(grab)
    tokenthin.apply(model, "tomesd", ratio=0.5)
    wrapper = model.transformer_blocks[0].attn.processor
    inner, calls = wrapper.inner, []

    def spy(attn, hs, ehs, mask, rot):
        calls.append((hs, rot))
        return inner(attn, hs, ehs, mask, rot)

    wrapper.inner = spy
    dit_run(model, x, img_ids=img, txt_ids=txt, **kw)
    wrapper.inner = inner
    tokenthin.remove(model)
    hook.remove()
    assert len(calls) == 2 and all(hs.shape[:2] == (1, 8) for hs, _ in calls)  # one call per sample
    matched = shifted = 0
    for hs, (c, s) in calls:
        assert torch.equal(c[:5], full_cos[:5]) and torch.equal(s[:5], full_sin[:5])  # text rows
        for j in range(hs.shape[1]):
            hit = (seen["x"] == hs[0, j]).all(-1).nonzero()  # a kept token nothing was merged into
            if len(hit):
                n = int(hit[0, 1])
                assert torch.equal(c[5 + j], full_cos[5 + n]) and torch.equal(s[5 + j], full_sin[5 + n])
                matched, shifted = matched + 1, shifted + (n != j)
    assert matched > 0 and shifted > 0


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_text_tokens_are_untouched(family: str) -> None:
    """Each block's text-stream output is unchanged at ratio 0 and keeps every text token at ratio 0.5."""
    model = BUILDERS[family]()
    x, kw = dit_input(model, 2), dit_cond(model, 2, text=6)
    seen: list[torch.Tensor | None] = []
    blocks = list(model.transformer_blocks) + list(getattr(model, "single_transformer_blocks", []))
    hooks = [b.register_forward_hook(lambda _m, _a, out: seen.append(out[0])) for b in blocks]

    def text_outputs(**budget: object) -> list[torch.Tensor | None]:
        seen.clear()
        if budget:
            with tokenthin.applied(model, "tomesd", **budget):
                dit_run(model, x, **kw)
        else:
            dit_run(model, x, **kw)
        return list(seen)

    ref, zero, half = text_outputs(), text_outputs(ratio=0.0), text_outputs(ratio=0.5, merge_mlp=True)
    assert len(ref) == len(blocks)
    for r, z, h in zip(ref, zero, half, strict=True):
        if r is None:  # SD3's last block: context_pre_only ends the text stream
            assert z is None and h is None
            continue
        assert (r - z).abs().max() <= 1e-5 and h.shape == r.shape and r.shape[:2] == (2, 6)
        assert 0 < (r - h).abs().max() < float("inf")  # text attends to merged image keys
    for hook in hooks:
        hook.remove()


@pytest.mark.parametrize("family", list(BUILDERS))
def test_bf16_runs(family: str) -> None:
    model = BUILDERS[family]().to(torch.bfloat16)
    x = dit_input(model, 2).to(torch.bfloat16)
    kw = {k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in dit_cond(model, 2).items()}
    with tokenthin.applied(model, "tomesd", ratio=0.5, merge_mlp=True):
        out = dit_run(model, x, **kw)
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())


def test_token_counts_and_grids_follow_each_input() -> None:
    model = dit(sample=16)  # DiT's blocks see (H / 2) x (W / 2) patches
    tokenthin.apply(model, "tomesd", ratio=0.5)
    dit_run(model, dit_input(model, 1, hw=(16, 16)))
    info = tokenthin.info(model)
    assert info.latent == (16, 16) and info.grids == [(8, 8)] * 2 and info.tokens_in == [64, 64]
    assert info.tokens_per_layer == [32, 32]
    tokenthin.remove(model)
    model = sd3()
    tokenthin.apply(model, "tomesd", ratio=0.25, site="block:1")
    dit_run(model, dit_input(model, 1, hw=(12, 8)))  # a non-square latent: 6 x 4 patches
    info = tokenthin.info(model)
    assert info.blocks == [1] and info.grids == [(6, 4)] and info.tokens_per_layer == [24 - 6]
    tokenthin.remove(model)
    model = flux()
    tokenthin.apply(model, "tomesd", ratio=0.5)
    x = dit_input(model, 1, hw=(4, 6))
    img, txt = flux_ids(4, 6)
    dit_run(model, x, img_ids=img, txt_ids=txt)
    info = tokenthin.info(model)
    assert info.latent == (4, 6) and info.grids == [(4, 6)] * 4 and info.tokens_per_layer == [12] * 4
    dit_run(model, x, img_ids=img.flip(0), txt_ids=txt)  # not a raster: the squarest factorisation of 24
    assert tokenthin.info(model).grids[0] == (4, 6)
    dit_run(model, dit_input(model, 1, hw=(1, 10)), img_ids=torch.zeros(10, 3), txt_ids=txt)
    assert tokenthin.info(model).grids[0] == (2, 5)
    tokenthin.remove(model)


def test_pixart_self_attention_mask_is_refused() -> None:
    model = pixart()
    x = dit_input(model, 1)
    tokenthin.apply(model, "tomesd", ratio=0.5)
    with pytest.raises(tokenthin.InputMismatchError, match="attention_mask"):
        dit_run(model, x, attention_mask=torch.ones(1, 16))
    tokenthin.remove(model)


def test_support_table_matches_apply() -> None:
    for family, host in HOSTS.items():
        model = BUILDERS[family]()
        for name in tokenthin.api.all_methods():
            reason = tokenthin.support(name, host)
            try:
                denoiser_only = tokenthin.api.get(name).runtimes == {"denoiser"}  # their own default budgets
                tokenthin.apply(model, name, **({} if denoiser_only else {"keep": 0.5}), replace=True)
                refused = None
            except tokenthin.TokenThinError as e:
                refused = str(e)
            assert (reason is None) == (refused is None), (family, name, reason, refused)
            if tokenthin.is_applied(model):
                tokenthin.remove(model)


def test_pipelines_hold_the_denoiser_as_transformer_and_apply_finds_it() -> None:
    import diffusers

    for cls in ("DiTPipeline", "PixArtAlphaPipeline", "PixArtSigmaPipeline", "StableDiffusion3Pipeline"):
        assert "transformer" in inspect.signature(getattr(diffusers, cls).__init__).parameters, cls
    assert "transformer" in inspect.signature(diffusers.FluxPipeline.__init__).parameters
    pipe = dit_pipeline()

    def gen() -> torch.Tensor:
        with torch.no_grad():
            out = pipe(class_labels=[3], guidance_scale=4.0, num_inference_steps=2, output_type="pt")
        return out.images

    # DiTPipeline draws its noise from the global generator
    torch.manual_seed(0)
    ref = gen()
    assert tokenthin.apply(pipe, "tomesd", ratio=0.5) is pipe and tokenthin.is_applied(pipe.transformer)
    torch.manual_seed(0)
    got = gen()
    assert 0 < (got - ref).abs().max() < float("inf") and tokenthin.info(pipe).tokens_per_layer == [8, 8]
    tokenthin.remove(pipe)
    torch.manual_seed(0)
    assert torch.equal(gen(), ref)


def test_flux_refuses_key_value_reduction_and_takes_soft_plans(monkeypatch: pytest.MonkeyPatch) -> None:
    import tokenthin
    from tokenthin.denoise import cost
    from tokenthin.errors import UnsupportedModelError

    monkeypatch.setattr(cost, "ENABLED", False)  # this tiny Flux's blocks cost less than a ToMA plan

    m = flux()
    x = dit_input(m, 2, (8, 8))
    assert tokenthin.support("todo", "diffusers_flux") == "no kv mode"
    with pytest.raises(UnsupportedModelError, match="rotary"):
        tokenthin.apply(m, "todo")
    assert not tokenthin.is_applied(m)
    ref = dit_run(m, x)
    tokenthin.apply(m, "toma", ratio=0.5)  # soft slots are built around kept tokens: rotary rows follow them
    y = dit_run(m, x)
    tokenthin.remove(m)
    assert y.shape == ref.shape and torch.isfinite(y).all() and not torch.equal(y, ref)
    assert torch.equal(dit_run(m, x), ref)
