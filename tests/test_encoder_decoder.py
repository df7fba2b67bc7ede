"""Token reduction in a whole VisionEncoderDecoderModel: generate() with its KV cache, cross-attention key bias."""

from __future__ import annotations

import pytest
import torch

import tokenthin
from tokenthin.adapters.hf_encoder_decoder import HFEncoderDecoderAdapter
from tokenthin.adapters.registry import find_adapter
from tokenthin.errors import TokenThinError
from tokenthin.methods.base import all_methods

transformers = pytest.importorskip("transformers")

STEPS = 6
BOS, PAD, EOS = 0, 1, 2
TOL = 1e-4


def _ved(attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    enc = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        image_size=32,
        patch_size=4,
    )
    dec = transformers.MBartConfig(
        vocab_size=50,
        d_model=32,
        decoder_layers=2,
        decoder_attention_heads=4,
        decoder_ffn_dim=64,
        encoder_layers=0,
        max_position_embeddings=64,
        is_decoder=True,
        add_cross_attention=True,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
        decoder_start_token_id=BOS,
        forced_eos_token_id=None,
    )
    cfg = transformers.VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.encoder._attn_implementation = attn
    cfg.decoder._attn_implementation = attn
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = BOS, PAD, EOS
    torch.manual_seed(seed)
    model = transformers.VisionEncoderDecoderModel(cfg).eval()
    with torch.no_grad():  # the default init (std 0.02) makes every image decode the same tokens
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _ved()


@pytest.fixture(scope="module")
def pixels() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True)
def _clean(model):
    yield
    if tokenthin.is_applied(model):
        tokenthin.remove(model)


def _gen(model, x, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generate for exactly STEPS new tokens: (sequences, raw logits (B, STEPS, V))."""
    with torch.no_grad():
        out = model.generate(
            pixel_values=x,
            max_new_tokens=STEPS,
            min_new_tokens=STEPS,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
            decoder_start_token_id=BOS,
            pad_token_id=PAD,
            eos_token_id=EOS,
            **kw,
        )
    return out.sequences, torch.stack(out.logits, 1)


def _budget(name: str, site: str) -> dict:
    kw: dict = {"site": site}
    if site == "layers":
        kw["r"] = 4
    else:
        kw["keep"] = 0.5
    return kw


def _cases() -> list[tuple[str, str]]:
    out = []
    for m in tokenthin.methods():
        cls = all_methods()[m["name"]]
        if cls.needs_prompt or (cls.runtimes and "encoder" not in cls.runtimes):  # prompt readers: VLMs; tomesd
            continue
        for site in m["sites"]:
            if site.startswith("llm") or site == "output+llm":  # inside a language model: tests/test_vlm*.py
                continue
            if site == "input":
                out.append((m["name"], "input"))
            elif site == "layer:k":
                out.append((m["name"], "layer:1"))
            else:
                out.append((m["name"], site))
    return out


def _apply(model, name, x, **kw):
    if name == "dtome":
        kw = {"r": kw.get("r", 4), "site": kw["site"], "calibration": x}
    return tokenthin.apply(model, name, **kw)


def test_detected(model):
    tokenthin.apply(model, "tome", r=2)
    ex = tokenthin.explain(model)
    assert ex["adapter"] == "HFEncoderDecoderAdapter"
    assert sum("cross-attention" in t for t in ex["touched_modules"]) == 2


def test_vision_only_models_keep_their_adapter():
    from tiny import build

    assert not isinstance(find_adapter(build("vit")), HFEncoderDecoderAdapter)
    assert type(find_adapter(build("vit"))).__name__ == "HFVisionAdapter"


@pytest.mark.parametrize("name,kw", [("tome", {"r": 0}), ("divprune", {"keep": 1.0}), ("fastervlm", {"keep": 1.0})])
def test_zero_budget_is_identity(model, pixels, name, kw):
    ref_ids, ref_logits = _gen(model, pixels)
    tokenthin.apply(model, name, **kw)
    ids, logits = _gen(model, pixels)
    assert torch.equal(ids, ref_ids)
    assert (logits - ref_logits).abs().max() <= 1e-5


@pytest.mark.parametrize("name,site", _cases())
def test_batch_equals_single(model, pixels, name, site):
    _apply(model, name, pixels, **_budget(name, site))
    ids, logits = _gen(model, pixels)
    if name not in ("downsample",):
        assert tokenthin.info(model).kept[0] < 65
    for i in range(pixels.shape[0]):
        ids1, logits1 = _gen(model, pixels[i : i + 1])
        assert torch.equal(ids1, ids[i : i + 1])
        assert (logits1 - logits[i : i + 1]).abs().max() <= TOL


def test_dtome_pads_and_masks(model, pixels):
    tokenthin.apply(model, "dtome", r=6, calibration=pixels)
    _gen(model, pixels)
    info = tokenthin.info(model)
    assert len(set(info.kept)) > 1 and info.valid is not None  # samples keep different counts: padding


def test_bias_reaches_cross_attention(model, pixels):
    """Every cross-attention call (every step, cached keys or not) gets log(size) and -big on padding."""
    tokenthin.apply(model, "dtome", r=6, calibration=pixels)
    seen: list[torch.Tensor] = []

    def spy(_m, _args, kwargs):
        seen.append(kwargs["attention_mask"])

    handles = [model.decoder.model.decoder.layers[i].encoder_attn for i in range(2)]
    handles = [m.register_forward_pre_hook(spy, with_kwargs=True) for m in handles]  # runs after tokenthin's
    try:
        _gen(model, pixels, num_beams=2)
    finally:
        for h in handles:
            h.remove()
    info = tokenthin.info(model)
    assert len(seen) == 2 * STEPS
    expect = info.size.clamp_min(1e-6).log().masked_fill(~info.valid, torch.finfo(torch.float32).min / 2)
    expect = expect.repeat_interleave(2, 0)[:, None, None, :]
    for mask in seen:
        assert mask.shape == expect.shape and torch.equal(mask, expect)
    assert (info.size[info.valid] > 1).any()
    tokenthin.apply(model, "tome", r=8, prop_attn=False, replace=True)
    _gen(model, pixels)
    assert tokenthin.runtime_of(model).cross_bias() is None  # uniform counts, no proportional attention


@pytest.mark.parametrize("name,kw", [("tome", {"r": 8}), ("divprune", {"keep": 0.3}), ("dtome", {"r": 6})])
def test_cache_equals_recompute(model, pixels, name, kw):
    if name == "dtome":
        kw = {**kw, "calibration": pixels}
    tokenthin.apply(model, name, **kw)
    ids, logits = _gen(model, pixels, use_cache=True)
    seq = torch.full((pixels.shape[0], 1), BOS)
    with torch.no_grad():
        for t in range(STEPS):
            step = model(pixel_values=pixels, decoder_input_ids=seq, use_cache=False).logits[:, -1]
            assert (step - logits[:, t]).abs().max() <= TOL
            step = step.clone()
            step[:, EOS] = float("-inf")  # min_new_tokens
            seq = torch.cat([seq, step.argmax(-1, keepdim=True)], 1)
    assert torch.equal(seq, ids)


def test_beams_and_return_sequences_repeat_the_bias(model, pixels):
    tokenthin.apply(model, "dtome", r=6, calibration=pixels)
    ids, _ = _gen(model, pixels, num_return_sequences=2, num_beams=2)
    assert ids.shape[0] == 6
    for i in range(3):
        one, _ = _gen(model, pixels[i : i + 1], num_return_sequences=2, num_beams=2)
        assert torch.equal(one, ids[2 * i : 2 * i + 2])


@pytest.mark.parametrize("name,kw", [("tome", {"r": 8}), ("dtome", {"r": 6})])
def test_sdpa_equals_eager(pixels, name, kw):
    sdpa, eager = _ved("sdpa"), _ved("eager")
    eager.load_state_dict(sdpa.state_dict())
    outs = []
    for m in (sdpa, eager):
        extra = {"calibration": pixels} if name == "dtome" else {}
        tokenthin.apply(m, name, **kw, **extra)
        outs.append(_gen(m, pixels))
        tokenthin.remove(m)
    assert torch.equal(outs[0][0], outs[1][0])
    assert (outs[0][1] - outs[1][1]).abs().max() <= TOL


def test_remove_restores(model, pixels):
    ref_ids, ref_logits = _gen(model, pixels)
    tokenthin.apply(model, "tome", r=8)
    _, logits = _gen(model, pixels)
    assert (logits - ref_logits).abs().max() > 1e-3
    tokenthin.remove(model)
    ids2, logits2 = _gen(model, pixels)
    assert torch.equal(ids2, ref_ids) and torch.equal(logits2, ref_logits)


def test_precomputed_encoder_outputs_fail_clearly(model, pixels):
    with torch.no_grad():
        enc = model.encoder(pixel_values=pixels)
    tokenthin.apply(model, "tome", r=8)
    with torch.no_grad():
        model.encoder(pixel_values=pixels[:1])  # the runtime's last call now has 1 image with 41 tokens
        with pytest.raises(TokenThinError, match="encoder tokens"):
            model(encoder_outputs=enc, decoder_input_ids=torch.full((3, 1), BOS))


# --------------------------------------------------------------------------------------------------
# real weights


@pytest.fixture(scope="module")
def latex():
    for module in ("transformers", "PIL", "matplotlib"):
        pytest.importorskip(module)
    from tokenthin.models import latex_ocr as lo

    try:
        lo.asset_path()
    except lo.LatexOcrMissingError as exc:
        pytest.skip(str(exc))
    return lo, lo.load_latex_ocr(), lo.preprocess(lo.render_formula("x^2+y^2"))


@pytest.mark.real
def test_latex_ocr_reduced_decode(latex):
    lo, model, pv = latex
    full = lo.greedy_decode(model, pv, max_new_tokens=24)
    try:
        for name, kw in (("random", {"keep": 0.5, "site": "output"}), ("tome", {"r": 16})):
            tokenthin.apply(model, name, **kw)
            out = lo.greedy_decode(model, pv, max_new_tokens=24)
            assert isinstance(out[0], str) and tokenthin.info(model).kept[0] < 1024
            tokenthin.remove(model)
        tokenthin.apply(model, "random", keep=1.0, site="output")
        assert lo.greedy_decode(model, pv, max_new_tokens=24) == full
    finally:
        if tokenthin.is_applied(model):
            tokenthin.remove(model)
