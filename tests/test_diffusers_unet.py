"""diffusers UNets (host DiffusersUNetAdapter, "diffusers_unet"): block-local merging, tomesd and the baselines."""

from __future__ import annotations

import pytest
import torch

import tokenthin
from tiny_diffusers import cond_kwargs, plain_unet, run, sd_pipeline, sd_unet, sdxl_unet
from tokenthin.adapters.registry import find_adapter

pytest.importorskip("diffusers")

BUILDERS = {"sd": sd_unet, "sdxl": sdxl_unet, "plain": plain_unet}


def latent(model: torch.nn.Module, b: int = 2, hw: tuple[int, int] = (16, 16), seed: int = 0) -> torch.Tensor:
    return torch.randn(b, model.config.in_channels, *hw, generator=torch.Generator().manual_seed(seed))


def test_blocks_levels_and_parts_of_each_layout() -> None:
    sd = find_adapter(sd_unet())
    assert type(sd).__name__ == "DiffusersUNetAdapter" and sd.kind == "denoiser"
    assert [b.level for b in sd.blocks] == [0, 1, 1, 1, 1, 0, 0]  # down 0, down 1, mid, up 0 (x2), up 1 (x2)
    assert set(sd.parts(0)) == {"attn", "cross", "mlp"} and sd.blocks[0].holds == "tokens"
    xl = find_adapter(sdxl_unet())  # no attention at the latent's resolution: level 0 is the first attention level
    assert [b.level for b in xl.blocks] == [0, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0]  # 2 blocks per transformer at level 1
    assert [b.downsample for b in xl.blocks][:2] == [2, 4]
    plain = find_adapter(plain_unet())
    assert [b.level for b in plain.blocks] == [0, 1, 1, 1, 1, 0, 0]
    assert set(plain.parts(0)) == {"attn"} and plain.blocks[0].holds == "channels"
    assert any(h["name"] == "diffusers_unet" and h["kind"] == "denoiser" for h in tokenthin.hosts())
    e = tokenthin.explain(sd_unet())
    assert e["sites"][0] == "block" and e["layers"] == 7 and any("attn1" in t for t in e["touched_modules"])


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize(
    ("method", "budget"), [("tomesd", {"ratio": 0.0, "max_downsample": 8}), ("tome", {"keep": 1.0})]
)
def test_zero_ratio_is_identity(family: str, method: str, budget: dict) -> None:
    model = BUILDERS[family]()
    x = latent(model)
    ref = run(model, x)
    with tokenthin.applied(model, method, **budget):
        assert (run(model, x) - ref).abs().max() <= 1e-5
        assert tokenthin.info(model).merged == [0] * len(tokenthin.info(model).blocks)


@pytest.mark.parametrize("family", list(BUILDERS))
@pytest.mark.parametrize(
    ("method", "budget"),
    [("tomesd", {"ratio": 0.5}), ("tome", {"keep": 0.5}), ("random", {"keep": 0.5}), ("pool", {"keep": 0.5})],
)
def test_merging_changes_outputs_batch_equals_singles_and_remove_is_exact(
    family: str, method: str, budget: dict
) -> None:
    model = BUILDERS[family]()
    x = latent(model, b=3)
    ref = run(model, x)
    extra = {"max_downsample": 2} if method == "tomesd" else {}
    tokenthin.apply(model, method, **budget, **extra)
    got = run(model, x)
    assert got.shape == ref.shape and 0 < (got - ref).abs().max() < float("inf")
    kw = cond_kwargs(model, 3) if hasattr(model.config, "cross_attention_dim") else {}
    for i in range(3):
        one = {k: v[i : i + 1] for k, v in kw.items() if k != "added_cond_kwargs"}
        if "added_cond_kwargs" in kw:
            one["added_cond_kwargs"] = {k: v[i : i + 1] for k, v in kw["added_cond_kwargs"].items()}
        single = run(model, x[i : i + 1], **one)
        assert torch.allclose(single[0], got[i], atol=1e-5)
    tokenthin.remove(model)
    assert (run(model, x) - ref).abs().max() == 0.0 and not tokenthin.is_applied(model)


def test_cfg_batch_equals_separate_runs() -> None:
    model = sd_unet()
    x = latent(model, b=1)
    cond, uncond = torch.randn(1, 5, 32), torch.zeros(1, 5, 32)
    tokenthin.apply(model, "tomesd", ratio=0.5, merge_crossattn=True, merge_mlp=True)
    both = run(model, torch.cat([x, x]), 981, encoder_hidden_states=torch.cat([uncond, cond]))
    apart = [run(model, x, 981, encoder_hidden_states=e) for e in (uncond, cond)]
    assert torch.allclose(both, torch.cat(apart), atol=1e-5)


@pytest.mark.parametrize("family", list(BUILDERS))
def test_sdpa_equals_eager_processors(family: str) -> None:
    from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

    got = []
    for proc in (AttnProcessor2_0(), AttnProcessor()):
        model = BUILDERS[family]()
        for m in model.modules():  # UNet2DModel has no set_attn_processor
            if isinstance(m, Attention):
                m.set_processor(proc)
        with tokenthin.applied(model, "tomesd", ratio=0.5, max_downsample=2):
            got.append(run(model, latent(model)))
    assert (got[0] - got[1]).abs().max() <= 1e-5


@pytest.mark.parametrize("family", list(BUILDERS))
def test_bf16_runs(family: str) -> None:
    model = BUILDERS[family]().to(torch.bfloat16)
    x = latent(model).to(torch.bfloat16)
    kw = cond_kwargs(model, 2) if hasattr(model.config, "cross_attention_dim") else {}
    kw = {k: v.to(torch.bfloat16) for k, v in kw.items() if k != "added_cond_kwargs"} | (
        {"added_cond_kwargs": {k: v.to(torch.bfloat16) for k, v in kw["added_cond_kwargs"].items()}}
        if "added_cond_kwargs" in kw
        else {}
    )
    with tokenthin.applied(model, "tomesd", ratio=0.5):
        out = run(model, x, **kw)
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())


def test_token_counts_follow_each_latent_size_with_no_hint() -> None:
    model = sd_unet()
    tokenthin.apply(model, "tomesd", ratio=0.5, max_downsample=2)
    run(model, latent(model, b=1, hw=(16, 16)))
    small = tokenthin.info(model)
    assert small.tokens_in == [256, 64, 64, 64, 64, 256, 256] and small.tokens_per_layer == [
        128,
        32,
        32,
        32,
        32,
        128,
        128,
    ]
    run(model, latent(model, b=1, hw=(32, 32)))
    big = tokenthin.info(model)
    assert big.tokens_in[0] == 1024 and big.tokens_per_layer[0] == 512 and big.grids[1] == (16, 16)
    run(model, latent(model, b=1, hw=(18, 14)))  # odd sizes: grids 18x14 and 9x7; 2x2 cells of the 9x7 leave a rim
    odd = tokenthin.info(model)
    assert odd.grids[:2] == [(18, 14), (9, 7)] and odd.tokens_per_layer[:2] == [252 - 126, 63 - 31]
    assert tokenthin.info(model).latent == (18, 14)


def test_max_downsample_and_site_choose_the_blocks() -> None:
    model = sd_unet()
    x = latent(model, b=1)
    for md, blocks in ((1, [0, 5, 6]), (2, list(range(7))), (8, list(range(7)))):
        tokenthin.apply(model, "tomesd", ratio=0.5, max_downsample=md, replace=True)
        run(model, x)
        assert tokenthin.info(model).blocks == blocks
    tokenthin.apply(model, "tomesd", ratio=0.5, site="block:2", replace=True)
    run(model, x)
    assert tokenthin.info(model).blocks == [2]
    tokenthin.remove(model)


def test_seed_and_timestep_drive_the_random_offsets() -> None:
    model = sd_unet()
    x = latent(model, b=1)

    def out(**p: object) -> torch.Tensor:
        t = p.pop("t", 10)
        with tokenthin.applied(model, "tomesd", ratio=0.5, **p):
            return run(model, x, t)

    a = out(seed=0)
    assert torch.equal(a, out(seed=0))  # reproducible
    assert not torch.equal(a, out(seed=1)) and not torch.equal(a, out(seed=0, use_rand=False))
    assert torch.equal(out(use_rand=False, seed=0), out(use_rand=False, seed=5))  # no randomness: the top-left
    assert not torch.equal(out(t=10), out(t=11))


def test_offsets_are_per_sample_and_step() -> None:
    from tokenthin.methods.base import ReduceInput
    from tokenthin.methods.tomesd import destinations

    def dst(steps: list[float], grid: tuple[int, int] = (8, 8)) -> torch.Tensor:
        n = grid[0] * grid[1]
        inp = ReduceInput(
            x=torch.zeros(len(steps), n, 4),
            size=torch.ones(len(steps), n),
            valid=torch.ones(len(steps), n, dtype=torch.bool),
            num_protected=0,
            layer=0,
            num_layers=1,
            grid=grid,
            pristine=True,
            signals=None,  # type: ignore[arg-type]
            step=torch.tensor(steps, dtype=torch.float64),
        )
        return destinations(inp, 2, 2, True, 0)

    d = dst([10.0, 10.0, 11.0])
    assert torch.equal(d[0], d[1]) and not torch.equal(d[0], d[2])  # same step: same offsets, whatever the batch
    assert torch.equal(d[2], dst([11.0])[0])
    assert d.view(3, -1).sum(1).tolist() == [16, 16, 16]  # one destination per 2x2 cell
    cells = d[0].view(4, 2, 4, 2).sum((1, 3))
    assert bool((cells == 1).all())


def test_clear_errors() -> None:
    model = sd_unet()
    for bad in (1.0, -0.1, "half"):
        with pytest.raises(tokenthin.TokenThinError, match="ratio"):
            tokenthin.apply(model, "tomesd", ratio=bad)
    with pytest.raises(tokenthin.BudgetError, match="not both"):
        tokenthin.apply(model, "tomesd", ratio=0.5, keep=0.5)
    with pytest.raises(tokenthin.BudgetError, match="fraction"):
        tokenthin.apply(model, "tome", keep=64)
    with pytest.raises(tokenthin.BudgetError, match="ratio="):
        tokenthin.apply(model, "tome", r=8)
    with pytest.raises(tokenthin.TokenThinError, match="max_downsample"):
        tokenthin.apply(model, "tomesd", max_downsample=3)
    with pytest.raises(tokenthin.SiteError, match="block-local"):
        tokenthin.apply(model, "divprune", keep=0.5)
    with pytest.raises(tokenthin.TokenThinError, match="proportional"):
        tokenthin.apply(model, "tome", keep=0.5, prop_attn=True)
    with pytest.raises(tokenthin.TokenThinError, match="nothing to merge"):
        tokenthin.apply(model, "tomesd", merge_attn=False)
    assert not tokenthin.is_applied(model)
    from tiny import build

    with pytest.raises(tokenthin.UnsupportedModelError, match="denoisers"):
        tokenthin.apply(build("vit"), "tomesd", keep=0.5, site="block")
    with pytest.raises(tokenthin.UnsupportedModelError):
        tokenthin.apply(torch.nn.Linear(2, 2), "tomesd")
    plain = plain_unet()
    find_adapter(plain).blocks[0].module.fuse_projections()
    with pytest.raises(tokenthin.UnsupportedModelError, match="unfuse"):
        tokenthin.apply(plain, "tomesd")


def test_support_table_matches_apply() -> None:
    model = sd_unet()
    for name, cls in tokenthin.api.all_methods().items():
        reason = tokenthin.support(name, "diffusers_unet")
        try:  # the denoiser methods have their own default budgets (tomesd's ratio, todo's factor)
            budget = {} if cls.runtimes == {"denoiser"} else {"keep": 0.5}
            tokenthin.apply(model, name, **budget, replace=True)
            refused = None
        except tokenthin.TokenThinError as e:
            refused = str(e)
        assert (reason is None) == (refused is None), (name, reason, refused)
        if tokenthin.is_applied(model):
            tokenthin.remove(model)
    assert tokenthin.support("tomesd", "hf_vision") == "denoisers only"


def test_pipeline_apply_remove_and_info() -> None:
    pipe = sd_pipeline()
    emb, neg = torch.randn(1, 5, 32), torch.zeros(1, 5, 32)

    def gen() -> torch.Tensor:
        with torch.no_grad():
            return pipe(
                prompt_embeds=emb,
                negative_prompt_embeds=neg,
                num_inference_steps=2,
                height=32,
                width=32,
                output_type="latent",
                generator=torch.Generator().manual_seed(0),
            ).images

    ref = gen()
    assert tokenthin.apply(pipe, "tomesd", ratio=0.5) is pipe
    assert tokenthin.is_applied(pipe) and tokenthin.is_applied(pipe.unet)
    got = gen()
    assert 0 < (got - ref).abs().max() < float("inf")
    assert tokenthin.info(pipe).tokens_in[0] == 256 and tokenthin.info(pipe).tokens_per_layer[0] == 128
    assert tokenthin.explain(pipe)["applied"]["method"] == "tomesd"
    tokenthin.remove(pipe)
    assert torch.equal(gen(), ref)
    with tokenthin.applied(pipe, "tomesd", ratio=0.0):
        assert (gen() - ref).abs().max() <= 1e-5
