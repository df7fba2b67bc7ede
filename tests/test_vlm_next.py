"""LLaVA-NeXT host (AnyRes): base view + crops, row-end newline tokens, a different token count per image."""

from __future__ import annotations

import pytest
import torch

import tokenthin
from tiny_vlm import IMAGE_TOKEN, IMG, PINPOINTS, llava_next, next_inputs, next_single, ngenerate

CASES = [
    ("fastervlm", "output"),
    ("visionzip", "output"),
    ("divprune", "output"),
    ("tome", "output"),
    ("fastv", "llm:1"),
    ("random", "llm:2"),
]


@pytest.fixture(scope="module")
def model():
    return llava_next()


@pytest.fixture(scope="module")
def inputs(model):
    return next_inputs(model)


@pytest.fixture(scope="module")
def reference(model, inputs):
    return ngenerate(model, inputs)


@pytest.mark.parametrize(("method", "site"), CASES)
def test_zero_budget_and_batch_equals_singles(model, inputs, reference, method, site):
    with tokenthin.applied(model, method, keep=1.0, site=site):
        toks, logits = ngenerate(model, inputs)
    assert torch.equal(toks, reference[0]) and (logits - reference[1]).abs().max() < 1e-5
    with tokenthin.applied(model, method, keep=0.5, site=site):
        toks, logits = ngenerate(model, inputs)
        info = tokenthin.info(model)
        assert info.kept == [n // 2 for n in info.visual_tokens]
        for i in range(3):
            t1, l1 = ngenerate(model, next_single(inputs, i))
            assert torch.equal(t1[0], toks[i]) and (l1[0] - logits[i]).abs().max() < 1e-4


@pytest.mark.parametrize(("method", "site"), [("visionzip", "output"), ("random", "llm:2")])
def test_cached_generation_equals_recomputing(model, inputs, method, site):
    with tokenthin.applied(model, method, keep=0.25, site=site):
        a = ngenerate(model, inputs, new=4)
        b = ngenerate(model, inputs, new=4, use_cache=False)
    assert torch.equal(a[0], b[0]) and (a[1] - b[1]).abs().max() < 1e-4


def test_newline_tokens_are_kept_and_not_counted(model, inputs):
    ids, mask = inputs["input_ids"], inputs["attention_mask"].bool()
    image_tokens = ((ids == IMAGE_TOKEN) & mask).sum(1)
    with tokenthin.applied(model, "divprune", keep=3), torch.no_grad():
        model(**inputs)
        info = tokenthin.info(model)
    newlines = image_tokens - torch.tensor(info.visual_tokens)
    assert (newlines > 0).all()  # every AnyRes image here has crops, hence row ends
    assert info.kept == [3, 3, 3]
    after = mask.sum(1) - image_tokens + 3 + newlines  # text + kept + row ends, per sample
    assert info.sequence[1] == int(after.max())


def test_token_map_matches_the_models_own_packing(model, inputs):
    """Feed crop/patch indices through LLaVA-NeXT's own pack_image_features: the map tokenthin recovers from the
    features must give the same index for every token and flag the same row ends."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    sizes = inputs["image_sizes"]
    crops = [image_size_to_num_patches(s.tolist(), PINPOINTS, IMG) for s in sizes]
    n_tok = (IMG // 8) ** 2
    idx, start = [], 0
    for n in crops:
        idx.append(torch.arange(start * n_tok, (start + n) * n_tok, dtype=torch.float32).view(n, n_tok, 1))
        start += n
    packed, _ = model.model.pack_image_features(idx, sizes, "default", image_newline=torch.tensor([-1.0]))
    expect = torch.cat(packed)[:, 0].long()

    rows, grabbed = [], {}
    h = model.model.multi_modal_projector.register_forward_hook(lambda m, a, o: grabbed.__setitem__("p", o))
    try:
        with torch.no_grad():
            feats = model.model.get_image_features(
                pixel_values=inputs["pixel_values"], image_sizes=sizes, return_dict=True
            ).pooler_output
    finally:
        h.remove()
    rows = torch.cat(feats)

    adapter = tokenthin.api.find_adapter(model)
    assert type(adapter).__name__ == "HFLlavaNextAdapter"
    layout = adapter.layout((), {"pixel_values": torch.zeros(sum(crops), 3, IMG, IMG)})
    tm = adapter.token_map(rows, [f.shape[0] for f in feats], layout, grabbed["p"])
    assert torch.equal(tm.newline, expect < 0)
    assert torch.equal(tm.flat[expect >= 0], expect[expect >= 0])
    # views: 0 on each image's base view, >= 1 on its crops
    first = torch.cumsum(torch.tensor([0] + [f.shape[0] for f in feats[:-1]]), 0)
    assert (tm.view[first] == 0).all() and (tm.view[~tm.newline] >= 0).all() and tm.view.max() >= 1

    # rows / columns: feed every crop patch its (row, column) in the tiled crop grid through the model's own
    # packing; tokenthin's places must be those, shifted by the image's unpadding cut (constant per image)
    from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

    side = IMG // 8
    places = []
    for s, n in zip(sizes, crops):
        _, gw = get_anyres_image_grid_shape(s.tolist(), PINPOINTS, IMG)
        f = torch.full((n, side, side, 2), -5.0)
        for j in range(n - 1):
            y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
            f[1 + j, ..., 0] = (j // gw) * side + y
            f[1 + j, ..., 1] = (j % gw) * side + x
        places.append(f.view(n, side * side, 2))
    packed, _ = model.model.pack_image_features(places, sizes, "default", image_newline=torch.tensor([-1.0, -1.0]))
    tiled = torch.cat(packed).long()
    ends = [*first.tolist(), rows.shape[0]]
    for i in range(len(feats)):
        lo, hi = ends[i], ends[i + 1]
        view, r, c = tm.view[lo:hi], tm.row[lo:hi], tm.col[lo:hi]
        crop = (view > 0) & ~tm.newline[lo:hi]
        base = (view == 0) & ~tm.newline[lo:hi]
        assert int(r[crop].min()) == 0 and int(c[crop].min()) == 0
        for k, got in ((0, r), (1, c)):
            shift = tiled[lo:hi, k][crop] - got[crop]
            assert (shift == shift[0]).all(), (i, k)
        b = torch.arange(int(base.sum()))
        assert torch.equal(r[base], b // side) and torch.equal(c[base], b % side)
        assert (r[tm.newline[lo:hi]] == -1).all() and (c[tm.newline[lo:hi]] == -1).all()
