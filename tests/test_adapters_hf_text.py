"""BERT-family text hosts (hf_text): every encoder method on tiny random BertModel / RobertaModel / DistilBertModel,
with the caller's padding. Invariants: zero budget identical, remove() exact, a padded batch equals each sample run
alone without padding, SDPA equals eager, padding never reaches a real token, size-weighted mean pooling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import tokenthin
from tokenthin.adapters.hf_text import HFTextAdapter, mean_pool, pool_weights
from tokenthin.adapters.registry import find_adapter
from tokenthin.methods.base import all_methods

transformers = pytest.importorskip("transformers")

VOCAB, LENGTHS = 120, (24, 19, 13, 24)
SIZE = dict(vocab_size=VOCAB, max_position_embeddings=64)
BERT = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64, **SIZE)


def _bert(attn: str) -> nn.Module:
    return transformers.BertModel(transformers.BertConfig(**BERT, attn_implementation=attn))


def _bert_cls(attn: str) -> nn.Module:
    cfg = transformers.BertConfig(**BERT, num_labels=3, attn_implementation=attn)
    return transformers.BertForSequenceClassification(cfg)


def _roberta(attn: str) -> nn.Module:
    cfg = transformers.RobertaConfig(**{**BERT, "max_position_embeddings": 66}, attn_implementation=attn)
    return transformers.RobertaModel(cfg)


def _distilbert(attn: str) -> nn.Module:
    cfg = transformers.DistilBertConfig(dim=32, n_layers=3, n_heads=4, hidden_dim=64, **SIZE, attn_implementation=attn)
    return transformers.DistilBertModel(cfg)


HOSTS = {"bert": _bert, "bert-cls": _bert_cls, "roberta": _roberta, "distilbert": _distilbert}
SKIP = {"dtome"}  # calibrates on inputs: covered by its own tests on images
METHODS = [
    n
    for n, c in all_methods().items()
    if n not in SKIP and not c.needs_prompt and {"layers", "layer", "output"} & set(c.sites) and not c.resizes_input
]  # resizes_input: needs an image (refused here: tests/test_solver.py)


def build(host: str, attn: str = "sdpa") -> nn.Module:
    torch.manual_seed(0)
    return HOSTS[host](attn).eval()


def batch(pad_id: int = 0, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (4, 24): [CLS]=2 first, [SEP]=3 last of each sample, padding ``pad_id``."""
    g = torch.Generator().manual_seed(seed)
    n = max(LENGTHS)
    ids = torch.randint(5, VOCAB, (len(LENGTHS), n), generator=g)
    mask = torch.zeros(len(LENGTHS), n, dtype=torch.long)
    for i, length in enumerate(LENGTHS):
        ids[i, 0], ids[i, length - 1] = 2, 3
        ids[i, length:] = pad_id
        mask[i, :length] = 1
    return ids, mask


def run(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask)
    if hasattr(out, "logits"):
        return {"logits": out.logits}
    res = {"cls": out.last_hidden_state[:, 0], "mean": mean_pool(model, out.last_hidden_state, mask)}
    if getattr(out, "pooler_output", None) is not None:
        res["pooler"] = out.pooler_output
    return res


def budget(method: str, zero: bool = False) -> dict:
    cls = all_methods()[method]
    if cls.kind == "merge" and "layers" in cls.sites:
        return {"r": 0 if zero else 2}
    return {"keep": 1.0 if zero else 0.5, "site": "layer:0"}


def diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.parametrize("host", HOSTS)
def test_detected_as_a_text_host(host: str) -> None:
    model = build(host)
    adapter = find_adapter(model)
    assert isinstance(adapter, HFTextAdapter)
    assert adapter.num_protected == 1 and len(adapter.layers) == 3
    ex = tokenthin.explain(model)
    assert ex["adapter"] == "HFTextAdapter" and "layers" in ex["sites"] and "input" not in ex["sites"]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("host", ["bert", "distilbert"])
def test_zero_budget_is_identity_and_remove_exact(host: str, method: str) -> None:
    model = build(host)
    ids, mask = batch()
    ref = run(model, ids, mask)
    tokenthin.apply(model, method, **budget(method, zero=True))
    assert diff(ref, run(model, ids, mask)) <= 1e-5
    tokenthin.apply(model, method, replace=True, **budget(method))
    reduced = run(model, ids, mask)
    assert max(tokenthin.info(model).kept) < max(LENGTHS)
    tokenthin.remove(model)
    assert diff(ref, run(model, ids, mask)) == 0.0 and diff(ref, reduced) > 0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("host", HOSTS)
def test_padded_batch_equals_each_sample_alone(host: str, method: str) -> None:
    model = build(host)
    ids, mask = batch()
    tokenthin.apply(model, method, **budget(method))
    together = run(model, ids, mask)
    kept = tokenthin.info(model).kept
    for i, length in enumerate(LENGTHS):
        alone = run(model, ids[i : i + 1, :length], None)
        assert tokenthin.info(model).kept == [kept[i]]
        for key, v in alone.items():
            assert torch.allclose(together[key][i : i + 1], v, atol=2e-5, rtol=1e-4), (key, i)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("host", ["bert", "roberta"])
def test_padding_never_reaches_a_real_token(host: str, method: str) -> None:
    model = build(host)
    ids, mask = batch(pad_id=0)
    other, _ = batch(pad_id=77)  # same real tokens, different garbage under the padding
    tokenthin.apply(model, method, **budget(method))
    a, b = run(model, ids, mask), run(model, other, mask)
    assert diff(a, b) <= 1e-5
    source = tokenthin.info(model).source
    assert source is not None and bool((source[mask == 0] == -1).all())  # padding maps to no output token


@pytest.mark.parametrize("method", METHODS)
def test_sdpa_equals_eager(method: str) -> None:
    sdpa, eager = build("bert", "sdpa"), build("bert", "eager")
    ids, mask = batch()
    for m in (sdpa, eager):
        tokenthin.apply(m, method, **budget(method))
    assert diff(run(sdpa, ids, mask), run(eager, ids, mask)) <= 1e-4


@pytest.mark.parametrize("method", ["tome", "pitome", "pool"])
def test_mean_pool_of_reduced_equals_unmerged(method: str) -> None:
    """A merged token of size s counts s times: pooling the reduced output with its sizes equals pooling the output
    unmerged back onto the original tokens with the caller's mask."""
    model = build("bert")
    ids, mask = batch()
    tokenthin.apply(model, method, **budget(method))
    reduced = run(model, ids, mask)["mean"]
    weights = pool_weights(model, model(input_ids=ids, attention_mask=mask).last_hidden_state, mask)
    assert weights.shape[1] < ids.shape[1] and float(weights.max()) > 1  # some token stands for several
    tokenthin.apply(model, method, replace=True, unmerge=True, **budget(method))
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert full.shape[1] == ids.shape[1]
    assert torch.allclose(mean_pool(model, full, mask), reduced, atol=1e-5)


def test_keep_fraction_is_of_each_samples_own_tokens() -> None:
    model = build("bert")
    ids, mask = batch()
    tokenthin.apply(model, "random", keep=0.5, site="layer:0")
    run(model, ids, mask)
    assert tokenthin.info(model).kept == [1 + round(0.5 * (n - 1)) for n in LENGTHS]


def test_flops_budget_is_solved_for_the_length_fed() -> None:
    """flops= is planned per padded length; on unpadded batches every sample takes the plan. (With padding, a short
    sample may not take an r-per-layer plan solved for the longest: that is an error naming the input.)"""
    model = build("bert")
    ids, _ = batch()
    tokenthin.apply(model, "tome", flops=0.7)
    for n in (24, 16):
        run(model, ids[:, :n], None)
        tokens = tokenthin.info(model).tokens_per_layer
        assert tokens[0] == n and tokens[-1] <= tokens[1] < n  # the solver may merge all of it early (tiny model)
    ids, mask = batch()
    with pytest.raises(tokenthin.TokenThinError, match="too large for this input"):
        run(model, ids, mask)


def test_bad_masks_and_decoders_are_refused() -> None:
    model = build("bert")
    ids, mask = batch()
    tokenthin.apply(model, "tome", r=2)
    with pytest.raises(tokenthin.TokenThinError, match="padding mask"):
        model(input_ids=ids, attention_mask=mask[:, None, None, :])
    left = mask.flip(1)
    with pytest.raises(tokenthin.TokenThinError, match="right padding"):
        model(input_ids=ids, attention_mask=left)
    decoder = transformers.BertModel(transformers.BertConfig(**BERT, is_decoder=True))
    with pytest.raises(tokenthin.TokenThinError, match="BERT-family"):
        tokenthin.apply(decoder, "tome", r=2)


@pytest.mark.parametrize("method", ["tome", "random", "pool"])
def test_block_site_on_padded_text(method: str) -> None:
    """Site block on a padded batch: every layer computes on half of each sentence's tokens, the output keeps every
    token, and a padded batch gives what each sentence gives alone (padding garbage never matters)."""
    model = build("bert")
    ids, mask = batch()
    other, _ = batch(pad_id=77)
    tokenthin.apply(model, method, keep=0.5, site="block")
    together = run(model, ids, mask)
    assert diff(together, run(model, other, mask)) <= 1e-5
    for i, length in enumerate(LENGTHS):
        alone = run(model, ids[i : i + 1, :length], None)
        assert max(tokenthin.info(model).tokens_per_layer) < length
        for key, v in alone.items():
            assert torch.allclose(together[key][i : i + 1], v, atol=2e-5, rtol=1e-4), (key, i)
