"""[CLS]-attention pruning methods: FasterVLM, VTC-CLS and VisionZip on tiny random HF encoders.

Besides the behaviour every method keeps (zero budget, remove, batch, SDPA vs eager, half precision, counts,
protected tokens), the selections are checked against scores recomputed here, independently, from the attention
maps an eager model returns with ``output_attentions`` (and, for VisionZip's merge, from the keys the last layer
really computed), so the q/k-based scores of the runtime are proven right.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tokenthin
from tokenthin.errors import SiteError, TokenThinError
from tokenthin.methods.base import ReduceInput, SignalSource, get

IMAGE, PATCH, LAYERS = 32, 4, 4
N_PATCHES = (IMAGE // PATCH) ** 2  # 64
METHODS = ["fastervlm", "vtc-cls", "visionzip"]
CLS_FAMILIES = ["vit", "dinov2-reg", "clip"]


def build(family: str, attn: str = "sdpa", seed: int = 0) -> nn.Module:
    """A tiny random encoder; queries/keys are scaled up so attention is peaked and top-k has no near-ties."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(
        hidden_size=32,
        num_hidden_layers=LAYERS,
        num_attention_heads=4,
        image_size=IMAGE,
        patch_size=PATCH,
        attn_implementation=attn,
    )
    if family == "vit":
        model = tf.ViTModel(tf.ViTConfig(intermediate_size=64, **common))
    elif family == "dinov2-reg":
        model = tf.Dinov2WithRegistersModel(tf.Dinov2WithRegistersConfig(mlp_ratio=2, num_register_tokens=4, **common))
    elif family == "clip":
        model = tf.CLIPVisionModel(tf.CLIPVisionConfig(intermediate_size=64, **common))
    elif family == "siglip":
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(intermediate_size=64, **common))
    else:
        raise ValueError(family)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if name.rsplit(".", 1)[-1] in ("query", "key", "q_proj", "k_proj"):
                mod.weight.mul_(6.0)
    return model.eval()


def run(model: nn.Module, x: torch.Tensor, **kw):
    with torch.no_grad():
        return model(pixel_values=x, **kw)


def protected(family: str) -> int:
    return {"vit": 1, "dinov2-reg": 5, "clip": 1, "siglip": 0}[family]


def kept_patches(model: nn.Module) -> torch.Tensor:
    """(B, k) original indices of the patch tokens that survived a pure selection, ascending."""
    info = tokenthin.info(model)
    src = info.source
    P = info.num_protected
    rows = [(src[b, P:] >= 0).nonzero().flatten() + P for b in range(src.shape[0])]
    return torch.stack(rows)


def cls_scores(attentions: tuple[torch.Tensor, ...], layers: list[int]) -> torch.Tensor:
    """[CLS] row of eager attention maps, heads averaged, summed over ``layers``: (B, N)."""
    return sum(attentions[i][:, :, 0, :].mean(1) for i in layers)


def topk_ref(score: torch.Tensor, k: int, P: int) -> torch.Tensor:
    return torch.topk(score[:, P:], k, dim=1).indices.sort(1).values + P


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run ~100x faster on one thread than with several threads fighting on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def images() -> torch.Tensor:
    return torch.randn(4, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(3))


# ----- behaviour every method keeps -----


@pytest.mark.parametrize("family", CLS_FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_keep_all_is_identity_and_remove_restores(method: str, family: str, images: torch.Tensor) -> None:
    model = build(family)
    ref = run(model, images).last_hidden_state
    with tokenthin.applied(model, method, keep=1.0):
        got = run(model, images).last_hidden_state
        assert got.shape == ref.shape
        assert (got - ref).abs().max().item() <= 1e-5
    tokenthin.apply(model, method, keep=0.25)
    assert run(model, images).last_hidden_state.shape[1] == protected(family) + 16
    tokenthin.remove(model)
    assert torch.equal(run(model, images).last_hidden_state, ref)


@pytest.mark.parametrize("site", ["output", "layer:1"])
@pytest.mark.parametrize("method", METHODS)
def test_batch_equals_single(method: str, site: str, images: torch.Tensor) -> None:
    model = build("dinov2-reg")
    tokenthin.apply(model, method, keep=0.25, site=site)
    batched = run(model, images)
    for i in range(images.shape[0]):
        single = run(model, images[i : i + 1])
        assert torch.allclose(batched.last_hidden_state[i : i + 1], single.last_hidden_state, atol=2e-5, rtol=1e-4)
        assert torch.allclose(batched.pooler_output[i : i + 1], single.pooler_output, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", CLS_FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_sdpa_equals_eager(method: str, family: str, images: torch.Tensor) -> None:
    sdpa, eager = build(family, "sdpa"), build(family, "eager", seed=1)
    eager.load_state_dict(sdpa.state_dict())
    for m in (sdpa, eager):
        tokenthin.apply(m, method, keep=0.25, site="layer:1")
    a, b = run(sdpa, images).last_hidden_state, run(eager, images).last_hidden_state
    assert a.shape == b.shape
    assert (a - b).abs().max().item() <= 1e-4
    assert torch.equal(tokenthin.info(sdpa).source, tokenthin.info(eager).source)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_runs(method: str, dtype: torch.dtype, images: torch.Tensor) -> None:
    model = build("dinov2-reg").to(dtype)
    tokenthin.apply(model, method, keep=0.25, site="layer:1")
    out = run(model, images.to(dtype))
    for v in (out.last_hidden_state, out.pooler_output):
        assert v.dtype == dtype and torch.isfinite(v).all()
    assert out.last_hidden_state.shape[1] == 5 + 16


@pytest.mark.parametrize("family", CLS_FAMILIES)
@pytest.mark.parametrize("method", METHODS)
def test_counts_and_protected_tokens_in_front(method: str, family: str, images: torch.Tensor) -> None:
    model = build(family)
    full = run(model, images).last_hidden_state
    P = protected(family)
    tokenthin.apply(model, method, keep=12)
    out = run(model, images).last_hidden_state
    info = tokenthin.info(model)
    assert out.shape[1] == P + 12 and info.kept == [P + 12] * 4 and info.num_protected == P
    assert torch.equal(info.source[:, :P], torch.arange(P).expand(4, P))
    assert torch.equal(info.size[:, :P], torch.ones(4, P))
    assert (out[:, :P] - full[:, :P]).abs().max().item() <= 1e-5  # per-token final norm: untouched
    assert info.size.sum(1).tolist() == ([P + 12.0] * 4 if method != "visionzip" else [P + 64.0] * 4)


@pytest.mark.parametrize("method", METHODS)
def test_layer_site_shrinks_later_layers(method: str, images: torch.Tensor) -> None:
    model = build("vit")
    tokenthin.apply(model, method, keep=0.25, site="layer:1")
    run(model, images)
    assert tokenthin.info(model).tokens_per_layer == [1 + 64, 1 + 64, 1 + 16, 1 + 16]


# ----- the selections are the papers' -----


@pytest.mark.parametrize("site", ["output", "layer:1"])
@pytest.mark.parametrize("family", CLS_FAMILIES)
def test_fastervlm_keeps_topk_of_eager_cls_attention(family: str, site: str, images: torch.Tensor) -> None:
    model = build(family)  # SDPA host: the score is recomputed from q and k
    eager = build(family, "eager", seed=1)
    eager.load_state_dict(model.state_dict())
    P, k = protected(family), 10
    att = run(eager, images, output_attentions=True).attentions
    layer = LAYERS - 1 if site == "output" else 1
    tokenthin.apply(model, "fastervlm", keep=k, site=site)
    out = run(model, images).last_hidden_state
    want = topk_ref(cls_scores(att, [layer]), k, P)
    assert torch.equal(kept_patches(model), want)
    if site == "output":  # the kept tokens are the untouched model's, in their original order
        full = run(eager, images).last_hidden_state
        gathered = full.gather(1, want.unsqueeze(-1).expand(-1, -1, full.shape[-1]))
        assert (out[:, P:] - gathered).abs().max().item() <= 1e-5


@pytest.mark.parametrize("layers, used", [(1, [3]), (2, [2, 3]), (7, [0, 1, 2, 3])])
def test_vtc_cls_keeps_topk_of_summed_eager_cls_attention(layers: int, used: list[int], images: torch.Tensor) -> None:
    model = build("dinov2-reg")
    eager = build("dinov2-reg", "eager", seed=1)
    eager.load_state_dict(model.state_dict())
    att = run(eager, images, output_attentions=True).attentions
    tokenthin.apply(model, "vtc-cls", keep=10, layers=layers)
    run(model, images)
    assert torch.equal(kept_patches(model), topk_ref(cls_scores(att, used), 10, 5))
    assert get("vtc-cls")(layers=layers).signal_layers(1, LAYERS) == [i for i in (0, 1) if i > 1 - layers]


def test_vtc_cls_with_one_layer_is_fastervlm(images: torch.Tensor) -> None:
    model = build("clip")
    with tokenthin.applied(model, "vtc-cls", keep=0.25, layers=1):
        a = run(model, images).last_hidden_state
    with tokenthin.applied(model, "fastervlm", keep=0.25):
        b = run(model, images).last_hidden_state
    assert torch.equal(a, b)


def test_vtc_cls_refuses_a_reduced_sequence() -> None:
    class NoSignals(SignalSource):
        pass

    b, n = 2, 1 + 8
    inp = ReduceInput(
        x=torch.zeros(b, n, 4),
        size=torch.ones(b, n),
        valid=torch.ones(b, n, dtype=torch.bool),
        num_protected=1,
        layer=2,
        num_layers=4,
        grid=(4, 4),
        pristine=False,
        signals=NoSignals(),
    )
    with pytest.raises(TokenThinError, match="cannot act after another reduction"):
        get("vtc-cls")().reduce(inp, torch.full((b,), 4))


def _visionzip_reference(state: dict, images: torch.Tensor, k: int, dominant: float) -> torch.Tensor:
    """VisionZip written out from eager attention maps and the last layer's captured keys (CLIP: no final norm)."""
    eager = build("clip", "eager", seed=1)
    eager.load_state_dict(state)
    last = getattr(eager, "vision_model", eager).encoder.layers[-1].self_attn
    keys = {}
    h = last.k_proj.register_forward_hook(lambda _m, _a, out: keys.setdefault("k", out))
    res = run(eager, images, output_attentions=True)
    h.remove()
    x, att = res.last_hidden_state, res.attentions[-1]
    B, N = x.shape[:2]
    metric = keys["k"].view(B, N, 4, -1).mean(2)
    metric = metric / metric.norm(dim=-1, keepdim=True)
    d = int(k * dominant + 0.5)
    c = k - d
    outs = []
    for b in range(B):
        score = att[b, :, 0, 1:].sum(0)  # heads summed, as the official code
        dom = (torch.topk(score, d).indices + 1).tolist()
        rest = [i for i in range(1, N) if i not in dom]
        step = max(1, len(rest) // c)
        targets = rest[::step][:c]
        others = [i for i in rest if i not in targets]
        sim = metric[b, others] @ metric[b, targets].T
        assigned = {t: [t] for t in targets}
        for i, j in zip(others, sim.argmax(1).tolist()):
            assigned[targets[j]].append(i)
        slots = {0: x[b, 0]} | {i: x[b, i] for i in dom}
        slots |= {t: x[b, members].mean(0) for t, members in assigned.items()}
        outs.append(torch.stack([slots[i] for i in sorted(slots)]))
    return torch.stack(outs)


@pytest.mark.parametrize("dominant", [54 / 64, 0.5, 0.0])
def test_visionzip_matches_written_out_reference(dominant: float, images: torch.Tensor) -> None:
    model = build("clip")
    tokenthin.apply(model, "visionzip", keep=16, dominant=dominant)
    got = run(model, images).last_hidden_state
    want = _visionzip_reference(model.state_dict(), images, 16, dominant)
    assert got.shape == want.shape == (4, 17, 32)
    assert (got - want).abs().max().item() <= 1e-5


def test_visionzip_all_dominant_is_fastervlm(images: torch.Tensor) -> None:
    model = build("vit")
    with tokenthin.applied(model, "visionzip", keep=0.25, dominant=1.0):
        a = run(model, images).last_hidden_state
    with tokenthin.applied(model, "fastervlm", keep=0.25):
        b = run(model, images).last_hidden_state
    assert torch.equal(a, b)


def test_visionzip_without_cls_needs_mean_score(images: torch.Tensor) -> None:
    model = build("siglip")
    tokenthin.apply(model, "visionzip", keep=16)
    with pytest.raises(TokenThinError, match=r"no \[CLS\] token.*score='mean'"):
        run(model, images)
    tokenthin.remove(model)
    for method in ("fastervlm", "vtc-cls"):
        with tokenthin.applied(model, method, keep=16), pytest.raises(TokenThinError, match=r"no \[CLS\] token"):
            run(model, images)
    eager = build("siglip", "eager", seed=1)
    eager.load_state_dict(model.state_dict())
    received = run(eager, images, output_attentions=True).attentions[-1].mean(1).mean(1)  # heads, then queries
    tokenthin.apply(model, "visionzip", keep=16, score="mean", dominant=1.0)
    out = run(model, images)
    assert out.last_hidden_state.shape == (4, 16, 32) and torch.isfinite(out.pooler_output).all()
    assert torch.equal(kept_patches(model), topk_ref(received, 16, 0))


def test_bad_parameters_fail_early() -> None:
    model = build("vit")
    for method, params in [
        ("visionzip", {"dominant": 1.5}),
        ("visionzip", {"score": "max"}),
        ("vtc-cls", {"layers": 0}),
        ("fastervlm", {"layers": 2}),
    ]:
        with pytest.raises(TokenThinError, match=method):
            tokenthin.apply(model, method, keep=0.25, **params)
        assert not tokenthin.is_applied(model)
    with pytest.raises(SiteError):
        tokenthin.apply(model, "visionzip", keep=0.25, site="layers")
