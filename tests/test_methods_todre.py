"""ToDRE (arXiv 2505.18757): k-center before the language model, task-relevance pruning inside it."""

from __future__ import annotations

import pytest
import torch

import tokenthin
from tiny_vlm import IMAGE_TOKEN, PROMPTS, TPI, batch, generate, llava, pixels
from tokenthin.errors import SiteError, TokenThinError


@pytest.fixture(scope="module")
def model():
    return llava()


def test_defaults_drop_every_visual_token_in_the_middle_layer(model):
    ids, mask = batch(PROMPTS)
    pv = pixels(3)
    seen: dict[int, int] = {}
    hooks = [
        layer.register_forward_pre_hook(lambda mod, a, i=i: seen.__setitem__(i, a[0].shape[1]))
        for i, layer in enumerate(model.model.language_model.layers)
    ]
    try:
        with tokenthin.applied(model, "todre", keep=0.5), torch.no_grad():
            model(input_ids=ids, attention_mask=mask, pixel_values=pv)
            info = tokenthin.info(model)
    finally:
        for h in hooks:
            h.remove()
    short = ids.shape[1] - TPI // 2
    assert seen == {0: short, 1: short, 2: short, 3: short - TPI // 2}  # 4 layers: dropped after layer 2
    assert info.kept == [0, 0, 0] and (info.source < 0).all()


def test_first_stage_is_kcenter_and_batch_equals_singles(model):
    ids, mask = batch(PROMPTS)
    pv = pixels(3)
    with tokenthin.applied(model, "kcenter", keep=6), torch.no_grad():
        model(input_ids=ids, attention_mask=mask, pixel_values=pv)
        kc = tokenthin.info(model).source >= 0
    with tokenthin.applied(model, "todre", keep=6, llm_layer=1, llm_keep=0.25):
        toks, logits = generate(model, ids, mask, pv)
        info = tokenthin.info(model)
        for i, p in enumerate(PROMPTS):
            t1, l1 = generate(model, torch.tensor([p]), None, pv[i : i + 1])
            assert torch.equal(t1[0], toks[i]) and (l1[0] - logits[i]).abs().max() < 1e-4
    assert info.kept == [2, 2, 2]  # round(0.25 * 6): a fraction of the tokens that entered the language model
    assert ((info.source >= 0) <= kc).all()  # survivors of stage 2 are among the k-center picks


def test_relevance_is_the_text_tokens_eager_attention():
    m = llava("eager")
    ids = torch.tensor([PROMPTS[2]])
    pv = pixels(1)
    with torch.no_grad():
        att = m(input_ids=ids, pixel_values=pv, output_attentions=True).attentions[1][0].mean(0)  # (T, T)
    vis = ids[0] == IMAGE_TOKEN
    relevance = att[~vis][:, vis].mean(0)
    expect = relevance.topk(5).indices.sort().values
    with tokenthin.applied(m, "todre", keep=1.0, llm_layer=1, llm_keep=5 / 16), torch.no_grad():
        m(input_ids=ids, pixel_values=pv)
        kept = (tokenthin.info(m).source[0] >= 0).nonzero().flatten()
    assert torch.equal(kept, expect)


def test_errors(model):
    with pytest.raises(TokenThinError, match="llm_keep"):
        tokenthin.apply(model, "todre", keep=0.5, llm_keep=2)
    with pytest.raises(SiteError, match="llm_layer"):
        tokenthin.apply(model, "todre", keep=0.5, llm_layer=3)
    with pytest.raises(SiteError):
        tokenthin.apply(model, "todre", keep=0.5, site="llm:1")
    assert not tokenthin.is_applied(model)
