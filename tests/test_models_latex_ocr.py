"""The latex-ocr-junia model as a HF VisionEncoderDecoderModel, checked against the package's own runtime.

Tests marked ``real`` need the installed package (``pip install --no-deps latex-ocr-junia==0.1.3``),
transformers, pillow and matplotlib, and skip cleanly without them.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from tokenthin.models import cache, latex_ocr_assets, latex_ocr_convert
from tokenthin.models import latex_ocr as lo

real = pytest.mark.real
TOL = 1e-4
FORMULAS = ("x^2+y^2", r"\frac{a}{b}", r"\sqrt{x}")
MAX_LENGTH = 48  # the package's decoding has no KV cache; keep its greedy runs short


@pytest.fixture(scope="module")
def ocr(tmp_path_factory):
    """Converted model (into a private cache), the package's model, rendered inputs and reference outputs."""
    for module in ("transformers", "PIL", "matplotlib"):
        pytest.importorskip(module)
    try:
        lo.asset_path()
    except lo.LatexOcrMissingError as exc:
        pytest.skip(str(exc))
    cache = tmp_path_factory.mktemp("tokenthin_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOKENTHIN_CACHE", str(cache))
        model = lo.load_latex_ocr()
        cache_file = lo.cache_path()
    raw = [lo.render_math(f) for f in FORMULAS]
    pixels = lo.preprocess(raw)
    ref_ids = lo.reference_generate(pixels, max_length=MAX_LENGTH)
    return {
        "model": model,
        "reference": lo.reference_model(),
        "vocab": lo.load_vocab(),
        "cache": cache,
        "cache_file": cache_file,
        "raw": raw,
        "pixels": pixels,
        "ref_ids": ref_ids,
    }


def _until_eos(row: list[int]) -> list[int]:
    return row[: row.index(lo.EOS_ID) + 1] if lo.EOS_ID in row else row


@real
def test_preprocessing_is_the_packages(ocr, tmp_path):
    for i, image in enumerate(ocr["raw"]):
        path = tmp_path / f"formula{i}.png"
        image.save(path)
        assert torch.equal(lo.preprocess(image), lo.reference_preprocess(path))
        boxed = lo.render_formula(FORMULAS[i])
        assert boxed.size == (lo.IMAGE_WIDTH, lo.IMAGE_HEIGHT) and boxed.mode == "L"
        assert torch.equal(lo.preprocess(boxed), ocr["pixels"][i : i + 1])
    pixels = ocr["pixels"]
    assert pixels.shape == (3, 1, 128, 512) and pixels.dtype == torch.float32
    assert pixels.min() == 0.0 and pixels.max() == 1.0  # black letterbox bars, white paper


@real
def test_encoder_matches_package(ocr):
    with torch.no_grad():
        ours = ocr["model"].encoder(pixel_values=ocr["pixels"]).last_hidden_state
        ref = ocr["reference"].encode(ocr["pixels"])
    assert ours.shape == ref.shape == (3, lo.NUM_PATCHES, 256)
    assert (ours - ref).abs().max() <= TOL
    # the adapter path (interpolate_pos_encoding=True) keeps the trained 16x64 grid untouched
    with torch.no_grad():
        same = ocr["model"].encoder(pixel_values=ocr["pixels"][:1], interpolate_pos_encoding=True).last_hidden_state
        small = ocr["model"].encoder(pixel_values=ocr["pixels"][:1, :, :64, :256], interpolate_pos_encoding=True)
    assert torch.allclose(same, ours[:1], atol=1e-5)
    assert small.last_hidden_state.shape == (1, 8 * 32, 256)


@real
def test_decoder_logits_match_package(ocr):
    """Teacher-forced logits of the whole model against the package, on its own greedy outputs."""
    ids = ocr["ref_ids"]
    with torch.no_grad():
        ours = ocr["model"](pixel_values=ocr["pixels"], decoder_input_ids=ids).logits
        ref = ocr["reference"].decode(ids, ocr["reference"].encode(ocr["pixels"]))
    assert ours.shape == ref.shape == (3, ids.shape[1], 166)
    assert (ours - ref).abs().max() <= TOL


@real
def test_cached_generation_logits_match_package(ocr):
    """Step-by-step logits from generate() (KV cache, cross-attention K/V computed once) vs teacher forcing."""
    out = lo.generate_ids(
        ocr["model"], ocr["pixels"][1:2], MAX_LENGTH - 1, return_dict_in_generate=True, output_logits=True
    )
    steps = torch.stack(out.logits, dim=1)  # (1, n, vocab), before <pad>/<bos> suppression
    with torch.no_grad():
        ref = ocr["reference"].decode(out.sequences[:, :-1], ocr["reference"].encode(ocr["pixels"][1:2]))
    assert (steps - ref).abs().max() <= TOL


@real
def test_greedy_decoding_equals_package(ocr):
    texts = lo.greedy_decode(ocr["model"], ocr["pixels"], max_new_tokens=MAX_LENGTH - 1)
    ids = lo.generate_ids(ocr["model"], ocr["pixels"], MAX_LENGTH - 1)
    vocab = ocr["vocab"]
    for row, ref_row, text in zip(ids.tolist(), ocr["ref_ids"].tolist(), texts):
        assert _until_eos(row) == _until_eos(ref_row)
        assert text == vocab.decode(ref_row) and text.strip()
    assert r"\frac" in texts[1] and r"\sqrt" in texts[2]
    # one image at a time gives the same text as the batch
    assert lo.greedy_decode(ocr["model"], ocr["pixels"][2:3], max_new_tokens=MAX_LENGTH - 1) == texts[2:]


@real
def test_vocab_matches_package_tokenizer(ocr):
    from latex_ocr_junia.tokenizer import LatexTokenizer

    theirs = LatexTokenizer.load(lo.asset_path("tokenizer.json"))
    vocab = ocr["vocab"]
    assert len(vocab) == theirs.vocab_size == 166
    text = r"\frac{a}{b}+\sqrt{x}^2 é€"  # € is not in the vocabulary
    assert vocab.encode(text) == theirs.encode(text)
    ids = [*vocab.encode(text), 5, 6]
    assert vocab.decode(ids) == theirs.decode(ids)


@real
def test_model_structure(ocr):
    model = ocr["model"]
    assert type(model).__name__ == "VisionEncoderDecoderModel" and not model.training
    assert type(model.encoder).__name__ == "IJepaModel" and len(model.encoder.layers) == 4
    assert type(model.decoder).__name__ == "MBartForCausalLM" and len(model.decoder.model.decoder.layers) == 4
    assert isinstance(model.encoder.embeddings, lo.LatexOcrEmbeddings)
    assert model.decoder.lm_head.bias is not None
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 + 2 * 4 + 2 + 3 * 4 and all(m.eps == 1e-6 for m in norms)
    assert model.config.encoder._attn_implementation == "sdpa"


@real
def test_cache_is_written_and_reread(ocr, monkeypatch):
    cache_file = ocr["cache_file"]
    assert cache_file.is_file() and cache_file.parent == ocr["cache"]
    assert not [p for p in os.listdir(ocr["cache"]) if p.endswith(".tmp")]
    monkeypatch.setenv("TOKENTHIN_CACHE", str(ocr["cache"]))
    assert lo.cache_path() == cache_file
    monkeypatch.setattr(latex_ocr_convert, "_load_checkpoint", lambda p: pytest.fail("the cache was not used"))
    a, b = ocr["model"].state_dict(), lo.load_latex_ocr().state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@real
def test_uncached_conversion_is_identical_and_writes_nothing(ocr, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENTHIN_CACHE", str(tmp_path / "unused"))
    model = lo.load_latex_ocr(cache=False, attn_implementation="eager")
    assert not (tmp_path / "unused").exists()
    assert model.config.decoder._attn_implementation == "eager"
    a, b = ocr["model"].state_dict(), model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with torch.no_grad():  # eager and SDPA agree
        x = model.encoder(pixel_values=ocr["pixels"][:1]).last_hidden_state
        y = ocr["model"].encoder(pixel_values=ocr["pixels"][:1]).last_hidden_state
    assert (x - y).abs().max() <= 1e-5


@real
def test_bad_cache_is_replaced_and_pt_fallback(ocr, tmp_path, monkeypatch):
    monkeypatch.setenv("TOKENTHIN_CACHE", str(tmp_path))
    path = lo.cache_path()
    path.write_bytes(b"not a tensor file")
    with pytest.warns(UserWarning, match="latex-ocr cache"):
        lo.load_latex_ocr()
    assert path.stat().st_size > 1_000_000  # rewritten
    monkeypatch.setattr(cache, "has_safetensors", lambda: False)
    lo.load_latex_ocr()
    assert lo.cache_path().suffix == ".pt" and lo.cache_path().is_file()


# ------------------------------------------------------------------------------------------------
# no real weights needed


def test_missing_package_names_the_fix(monkeypatch):
    monkeypatch.setattr(latex_ocr_assets, "PACKAGE", "latex_ocr_junia_not_installed")
    with pytest.raises(lo.LatexOcrMissingError, match="pip install --no-deps latex-ocr-junia==0.1.3"):
        lo.load_latex_ocr()


def test_letterbox_geometry():
    pytest.importorskip("PIL")
    wide = np.full((10, 100), 255, dtype=np.uint8)  # scaled 5.12x: 512 x 51, centred vertically
    boxed = np.asarray(lo.letterbox(wide))
    assert boxed.shape == (128, 512)
    assert (boxed[:38] == 0).all() and (boxed[38 + 51 :] == 0).all() and (boxed[38 : 38 + 51] == 255).all()


def test_convert_state_dict_rejects_unknown_tensors():
    with pytest.raises(lo.LatexOcrConversionError, match="no 'patch_embed.proj.weight'"):
        lo.convert_state_dict({"something.else": torch.zeros(1)})
