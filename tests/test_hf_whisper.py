"""Token reduction in WhisperForConditionalGeneration: the audio encoder as a host, generate() with its KV cache."""

from __future__ import annotations

import pytest
import torch

import tokenthin
from tokenthin.adapters.hf_whisper import AudioLayout, HFWhisperAdapter, speech_frames
from tokenthin.adapters.registry import find_adapter
from tokenthin.errors import TokenThinError
from tokenthin.methods.base import all_methods

transformers = pytest.importorskip("transformers")

STEPS = 5
START, PAD, EOS = 0, 1, 2
MEL, TOKENS = 8, 40  # 80 mel frames -> 40 audio tokens
TOL = 1e-4


def _whisper(attn: str = "sdpa", seed: int = 0) -> torch.nn.Module:
    cfg = transformers.WhisperConfig(
        vocab_size=64, num_mel_bins=MEL, d_model=32, encoder_layers=3, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=TOKENS,
        max_target_positions=32, pad_token_id=PAD, bos_token_id=START, eos_token_id=EOS, decoder_start_token_id=START,
        suppress_tokens=None, begin_suppress_tokens=None, attn_implementation=attn,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = transformers.WhisperForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # the default init makes every clip decode the same tokens
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    return _whisper()


@pytest.fixture(scope="module")
def feats() -> torch.Tensor:
    return torch.randn(3, MEL, 2 * TOKENS, generator=torch.Generator().manual_seed(3))


@pytest.fixture(autouse=True)
def _clean(model):
    yield
    if tokenthin.is_applied(model):
        tokenthin.remove(model)


def _gen(model, x, **kw) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy generate() for exactly STEPS new tokens: (sequences, logits (B, STEPS, V))."""
    with torch.no_grad():
        out = model.generate(
            x, max_new_tokens=STEPS, min_new_tokens=STEPS, output_logits=True, return_dict_in_generate=True, **kw
        )
    return out.sequences, torch.stack(out.logits, 1)


def _cases() -> list[tuple[str, str]]:
    out = []
    for name, cls in all_methods().items():
        if cls.needs_prompt or "cls_attn" in cls.signals:  # prompt readers / [CLS] scorers: refused (tested below)
            continue
        if cls.resizes_input:  # resizes an image: refused on audio (as on text, tests/test_solver.py)
            continue
        if hasattr(cls, "calibrate"):  # calibrates on inputs: test_calibrating_method_runs_on_audio
            continue
        for site in cls.sites:
            if site in ("layers", "output"):
                out.append((name, site))
            elif site == "layer":
                out.append((name, "layer:1"))
    return out


CASES = _cases()
METHODS = sorted({m for m, _ in CASES})


def _apply(model, name, x, site, zero=False):
    cls = all_methods()[name]
    if cls.kind == "merge" and site == "layers":
        kw: dict = {"r": 0 if zero else 4}
    else:
        kw = {"keep": 1.0 if zero else 0.5}
    return tokenthin.apply(model, name, site=site, **kw)


def test_detected(model, feats):
    adapter = find_adapter(model)
    assert isinstance(adapter, HFWhisperAdapter) and adapter.default_layout.grid == (1, TOKENS)
    tokenthin.apply(model, "tome", r=2)
    ex = tokenthin.explain(model)
    assert ex["adapter"] == "HFWhisperAdapter" and ex["tokens"] == TOKENS and "input" not in ex["sites"]
    assert sum("cross-attention" in t for t in ex["touched_modules"]) == 2


@pytest.mark.parametrize("name,site", CASES)
def test_zero_budget_is_identity(model, feats, name, site):
    ref_ids, ref_logits = _gen(model, feats)
    _apply(model, name, feats, site, zero=True)
    ids, logits = _gen(model, feats)
    assert torch.equal(ids, ref_ids)
    assert (logits - ref_logits).abs().max() <= 1e-5


@pytest.mark.parametrize("name,site", CASES)
def test_batch_equals_single(model, feats, name, site):
    _apply(model, name, feats, site)
    ids, logits = _gen(model, feats)
    assert max(tokenthin.info(model).kept) < TOKENS
    for i in range(feats.shape[0]):
        ids1, logits1 = _gen(model, feats[i : i + 1])
        assert torch.equal(ids1, ids[i : i + 1])
        assert (logits1 - logits[i : i + 1]).abs().max() <= TOL


@pytest.mark.parametrize("name", ["tome", "pool", "divprune", "random"])
def test_sdpa_equals_eager(feats, name):
    sdpa, eager = _whisper("sdpa"), _whisper("eager")
    outs = []
    for m in (sdpa, eager):
        _apply(m, name, feats, "layers" if name == "tome" else "layer:1")
        outs.append(_gen(m, feats))
        tokenthin.remove(m)
    assert torch.equal(outs[0][0], outs[1][0])
    assert (outs[0][1] - outs[1][1]).abs().max() <= TOL


@pytest.mark.parametrize("name", METHODS)
def test_remove_restores_exactly(model, feats, name):
    ref_ids, ref_logits = _gen(model, feats)
    _apply(model, name, feats, "output" if "output" in all_methods()[name].sites else "layers")
    _gen(model, feats)
    tokenthin.remove(model)
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())
    ids, logits = _gen(model, feats)
    assert torch.equal(ids, ref_ids) and torch.equal(logits, ref_logits)


def test_reduction_changes_the_decode_and_reaches_cross_attention(model, feats):
    """Every cross-attention call (every step, cached keys or not, beams repeated) gets log(size) of the tokens."""
    _, ref_logits = _gen(model, feats)
    tokenthin.apply(model, "tome", r=6)
    seen: list[torch.Tensor] = []

    def spy(_m, _args, kwargs):
        seen.append(kwargs["attention_mask"])

    cross = [layer.encoder_attn for layer in model.model.decoder.layers]
    spies = [m.register_forward_pre_hook(spy, with_kwargs=True) for m in cross]
    try:
        _gen(model, feats, num_beams=2)
    finally:
        for h in spies:
            h.remove()
    info = tokenthin.info(model)
    assert len(seen) == 2 * STEPS and info.kept == [TOKENS - 2 * 6] * 3  # r=6 after layers 0 and 1
    expect = info.size.clamp_min(1e-6).log().repeat_interleave(2, 0)[:, None, None, :]
    assert all(mask.shape == expect.shape and torch.equal(mask, expect) for mask in seen)
    _, logits = _gen(model, feats)
    assert (logits - ref_logits).abs().max() > 1e-3  # the reduction is not a no-op


def test_speech_mask_from_attention_mask_and_features(model):
    # like WhisperFeatureExtractor's output: values in [max - 2, max] (log-mel clamped to 8 decades, scaled by 1/4),
    # the zero padding exactly at the floor
    x = 0.5 + 1.5 * torch.rand(2, MEL, 2 * TOKENS, generator=torch.Generator().manual_seed(5))
    x[:, 0, 0] = 2.0  # max 2.0, floor 0.0
    x[0, :, 30:] = 0.0  # clip 0: 30 mel frames of audio, then padding
    x[1, :, 51:] = 0.0
    mask = torch.zeros(2, 2 * TOKENS, dtype=torch.long)
    mask[0, :30], mask[1, :51] = 1, 1
    expect = torch.zeros(2, TOKENS, dtype=torch.bool)
    expect[0, :15], expect[1, :26] = True, True  # token j covers mel frames 2j, 2j + 1
    assert torch.equal(speech_frames(x, None, TOKENS), expect)
    assert torch.equal(speech_frames(x, mask, TOKENS), expect)
    layout, batch, _ = find_adapter(model).call_layout((x,), {"attention_mask": mask})
    assert isinstance(layout, AudioLayout) and batch == 2 and layout.padding is None  # silence stays content
    assert torch.equal(layout.speech, expect)


def test_bad_input_and_sites_fail_clearly(model, feats):
    with pytest.raises(TokenThinError, match="input"):
        tokenthin.apply(model, "downsample", keep=0.5)
    tokenthin.apply(model, "pool", keep=0.5)
    with pytest.raises(TokenThinError, match="frames"), torch.no_grad():
        model.model.encoder(feats[..., :-2])
    for name in ("vtc_cls", "fastervlm"):
        if name in all_methods():
            with pytest.raises(TokenThinError, match="CLS|cls"):
                tokenthin.apply(model, name, keep=0.5, replace=True)
                _gen(model, feats)


def test_calibrating_method_runs_on_audio(model, feats):
    """dtome calibrates its thresholds by calling the host with its own inputs (Adapter.call_args)."""
    tokenthin.apply(model, "dtome", r=2, calibration=feats)
    seq, _ = _gen(model, feats)
    kept = tokenthin.info(model).sample_tokens
    assert seq.shape[0] == feats.shape[0] and max(kept[-1]) < TOKENS
