"""Vision-language hosts (LLaVA): reduction before the language model ('output') and inside it ('llm:k'), with
generate() and its KV cache. Tiny random models; no downloads."""

from __future__ import annotations

import pytest
import torch

import tokenthin
from tiny_vlm import IMAGE_TOKEN, PROMPTS, TPI, batch, generate, llava, pixels
from tokenthin.errors import (
    AlreadyAppliedError,
    BudgetError,
    SiteError,
    TokenThinError,
    UnsupportedModelError,
)

# (method, site): every method that works on a LLaVA host, at the sites it supports
CASES = [
    ("fastervlm", "output"),
    ("visionzip", "output"),
    ("divprune", "output"),
    ("kcenter", "output"),
    ("coverage", "output"),
    ("vtc-cls", "output"),
    ("random", "output"),
    ("tome", "output"),
    ("pitome", "output"),
    ("pool", "output"),
    ("fastv", "llm:1"),
    ("fastv", "llm:0"),
    ("random", "llm:2"),
    ("divprune", "llm:1"),
]


@pytest.fixture(scope="module")
def model():
    return llava()


@pytest.fixture(scope="module")
def inputs():
    ids, mask = batch(PROMPTS)
    return ids, mask, pixels(3)


@pytest.fixture(scope="module")
def reference(model, inputs):
    ids, mask, pv = inputs
    with torch.no_grad():
        return generate(model, ids, mask, pv)


@pytest.mark.parametrize(("method", "site"), CASES)
def test_zero_budget_generation_is_identical(model, inputs, reference, method, site):
    ids, mask, pv = inputs
    with tokenthin.applied(model, method, keep=1.0, site=site):
        toks, logits = generate(model, ids, mask, pv)
    assert torch.equal(toks, reference[0])
    assert (logits - reference[1]).abs().max() < 1e-5


@pytest.mark.parametrize(("method", "site"), CASES)
def test_batch_of_mixed_prompts_equals_single_runs(model, inputs, method, site):
    ids, mask, pv = inputs
    with tokenthin.applied(model, method, keep=0.5, site=site):
        toks, logits = generate(model, ids, mask, pv)
        assert tokenthin.info(model).kept == [TPI // 2] * 3
        for i, p in enumerate(PROMPTS):
            t1, l1 = generate(model, torch.tensor([p]), None, pv[i : i + 1])
            assert torch.equal(t1[0], toks[i]), (method, site, i)
            assert (l1[0] - logits[i]).abs().max() < 1e-4


@pytest.mark.parametrize(("method", "site"), [c for c in CASES if c[0] != "fastv"])
def test_cached_generation_equals_recomputing_each_step(model, inputs, method, site):
    """With the cache, decoding runs on the shortened prompt; without it, every step re-runs the reduction on the
    whole sequence. A selection that does not read the text gives the same tokens and logits both ways."""
    ids, mask, pv = inputs
    with tokenthin.applied(model, method, keep=0.25, site=site):
        a = generate(model, ids, mask, pv, new=5)
        b = generate(model, ids, mask, pv, new=5, use_cache=False)
    assert torch.equal(a[0], b[0])
    assert (a[1] - b[1]).abs().max() < 1e-4


@pytest.mark.parametrize(("method", "site"), [("visionzip", "output"), ("random", "llm:1")])
def test_beam_search_batch_equals_singles_and_cache(model, inputs, method, site):
    """Beams repeat every prompt after the vision tower ran once per image; the reduction follows."""
    ids, mask, pv = inputs
    kw = dict(max_new_tokens=4, num_beams=3, do_sample=False, suppress_tokens=[IMAGE_TOKEN], pad_token_id=0)
    with tokenthin.applied(model, method, keep=0.5, site=site):
        out = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, **kw)
        again = model.generate(input_ids=ids, attention_mask=mask, pixel_values=pv, use_cache=False, **kw)
        for i, p in enumerate(PROMPTS):
            one = model.generate(input_ids=torch.tensor([p]), pixel_values=pv[i : i + 1], **kw)
            assert torch.equal(one[0, -4:], out[i, -4:])
    assert torch.equal(out, again)


def test_reduction_changes_generation_and_shortens_prompt(model, inputs, reference):
    ids, mask, pv = inputs
    with tokenthin.applied(model, "fastervlm", keep=2):
        _toks, logits = generate(model, ids, mask, pv)
        info = tokenthin.info(model)
    assert info.kept == [2, 2, 2] and info.visual_tokens == [TPI] * 3
    assert info.sequence == (ids.shape[1], ids.shape[1] - (TPI - 2))
    assert (logits - reference[1]).abs().max() > 1e-3
    assert ((info.source >= 0).sum(1) == 2).all()


def test_forward_logits_match_first_generated_step(model, inputs):
    ids, mask, pv = inputs
    with tokenthin.applied(model, "divprune", keep=0.5):
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, pixel_values=pv)
        _, logits = generate(model, ids, mask, pv, new=1)
    assert out.logits.shape[1] == ids.shape[1] - TPI // 2
    assert (out.logits[:, -1] - logits[:, 0]).abs().max() < 1e-5


@pytest.mark.parametrize(("method", "site"), [("visionzip", "output"), ("fastv", "llm:1"), ("random", "llm:2")])
def test_sdpa_and_eager_agree(inputs, method, site):
    ids, mask, pv = inputs
    res = []
    for attn in ("sdpa", "eager"):
        m = llava(attn)
        with tokenthin.applied(m, method, keep=0.5, site=site):
            res.append(generate(m, ids, mask, pv))
    assert torch.equal(res[0][0], res[1][0])
    assert (res[0][1] - res[1][1]).abs().max() < 1e-4


def test_fastv_ranks_by_the_last_tokens_eager_attention():
    """FastV's score recomputed from q/k with rotary equals the eager attention map's last row."""
    m = llava("eager")
    ids = torch.tensor([PROMPTS[1]])
    pv = pixels(1)
    with torch.no_grad():
        out = m(input_ids=ids, pixel_values=pv, output_attentions=True)
    vis = (ids[0] == IMAGE_TOKEN).nonzero().flatten()
    k = 1
    ref = out.attentions[k][0, :, -1, vis].mean(0)  # heads averaged, last prompt token
    top = ref.topk(5).indices.sort().values
    with tokenthin.applied(m, "fastv", keep=5, site=f"llm:{k}"):
        with torch.no_grad():
            m(input_ids=ids, pixel_values=pv)
        kept = (tokenthin.info(m).source[0] >= 0).nonzero().flatten()
    assert torch.equal(kept, top)


def test_fastv_prunes_only_later_layers_and_keeps_positions(model, inputs):
    ids, mask, pv = inputs
    seen: dict[int, int] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda mod, a, i=i: seen.__setitem__(i, a[0].shape[1]))
        for i, layer in enumerate(model.model.language_model.layers)
    ]
    try:
        with tokenthin.applied(model, "fastv", keep=4, site="llm:1"), torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=pv)
    finally:
        for h in hooks:
            h.remove()
    full = ids.shape[1]
    assert seen == {0: full, 1: full, 2: full - TPI + 4, 3: full - TPI + 4}


def test_remove_restores_generation(model, inputs, reference):
    ids, mask, pv = inputs
    tokenthin.apply(model, "visionzip", keep=0.25)
    generate(model, ids, mask, pv)
    tokenthin.remove(model)
    toks, logits = generate(model, ids, mask, pv)
    assert torch.equal(toks, reference[0])
    assert torch.equal(logits, reference[1])


def test_explain_lists_vlm_sites(model):
    e = tokenthin.explain(model)
    assert e["adapter"] == "HFLlavaAdapter" and e["sites"][:2] == ["output", "llm:0"]
    with tokenthin.applied(model, "fastv", keep=0.5):
        assert tokenthin.explain(model)["applied"]["schedule"] == "site=llm:1 keep=0.5"


def test_errors(model, inputs):
    ids, mask, pv = inputs
    with tokenthin.applied(model, "fastervlm", keep=0.5):
        with pytest.raises(AlreadyAppliedError):
            tokenthin.apply(model, "fastv", keep=0.5)
        with pytest.raises(TokenThinError, match="prompt without image"):
            model(input_ids=torch.tensor([[1, 5, 6, 7]]))
        with pytest.raises(TokenThinError, match="labels"):
            model(input_ids=ids, attention_mask=mask, pixel_values=pv, labels=ids)
    with tokenthin.applied(model, "fastervlm", keep=TPI + 1):
        with pytest.raises(BudgetError, match="holds only 16"):
            generate(model, ids, mask, pv)
    for site in ("layers", "input", "layer:1", "llm:3", "llm:x"):  # divprune has no 'layers'; layer:1 is read
        with pytest.raises(SiteError):
            tokenthin.apply(model, "divprune", keep=0.5, site=site)
    with pytest.raises(SiteError, match="inside the language model"):
        tokenthin.apply(model, "fastervlm", keep=0.5, site="llm:1")
    with pytest.raises(BudgetError, match="keep="):
        tokenthin.apply(model, "fastervlm", r=2)
    with pytest.raises(BudgetError, match="out of range"):
        tokenthin.apply(model, "fastervlm", keep=1.5)
    with pytest.raises(TokenThinError, match="vision encoders"):
        tokenthin.apply(model, "fastervlm", keep=0.5, unmerge=True)
    assert not tokenthin.is_applied(model)


def test_fastv_refuses_a_plain_vision_encoder():
    from tiny import build

    with pytest.raises(UnsupportedModelError, match="language model"):
        tokenthin.apply(build("vit"), "fastv", keep=0.5)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_bfloat16_generation_runs_at_every_site(attn, inputs):
    ids, mask, pv = inputs
    m = llava(attn).to(torch.bfloat16)
    for method, site in [("visionzip", "output"), ("fastv", "llm:1"), ("aim", None)]:
        with tokenthin.applied(m, method, keep=0.5, site=site):
            toks, logits = generate(m, ids, mask, pv.to(torch.bfloat16), new=3)
            assert tokenthin.info(m).kept == [TPI // 2 if method != "aim" else tokenthin.info(m).kept[0]] * 3
        assert torch.isfinite(logits).all() and toks.shape == (3, 3)
