"""Text-embedding fidelity bench on the real all-MiniLM-L6-v2: how much of the unreduced sentence embedding survives.

Data: WordNet 3.0 example sentences and a retrieval set (see :mod:`tokenthin.bench.text_data`). The unreduced model
embeds everything once (mean pooling over the attention mask, L2-normalised, as sentence-transformers does); then,
for every method and keep fraction of each sentence's word-piece tokens ([CLS] kept on top) at site ``layer:k``
(default: after layer 1 of 6, so four layers run on the reduced tokens), the reduced model's embeddings (pooled with
token sizes: :func:`tokenthin.adapters.hf_text.pool_weights`) are compared with the unreduced ones:

* ``cosine``: mean cosine similarity of the sentence embeddings to the unreduced model's (``cos_p5``: its 5th
  percentile);
* ``agreement``: the share of queries whose top-1 corpus entry (cosine) is the unreduced model's top-1, both sides
  embedded by the model under test; ``recall``: the share whose top-1 is the query's own synset (the unreduced
  model's is in the header row ``full``);
* ``time``: wall-clock ratio reduced/full of embedding the sentences, full and reduced runs alternating in the same
  process; ``own``: the share of the reduced run spent in tokenthin's own code (scoring, matching, merging);
* ``tokens``: tokens entering the last layer over tokens entering the first (mean per sentence, padding excluded).

Batches are padded (``batch_size`` sentences, in data order); a ``keep`` fraction is of each sentence's own tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from .timing import alternate
from .variants import apply_kwargs, base_name

BASELINES = ("random", "pool")


def _top1(queries: torch.Tensor, corpus: torch.Tensor) -> torch.Tensor:
    return (queries @ corpus.T).argmax(1)


def run_text_bench(
    methods: Sequence[str],
    keeps: Sequence[float] = (0.75, 0.5, 0.25),
    n_sentences: int = 192,
    n_queries: int = 100,
    layer: int = 1,
    batch_size: int = 64,
    repeats: int = 2,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """One row per (method, keep), after a ``full`` row with the unreduced model's retrieval recall. ``random`` and
    ``pool`` are always included. A method that cannot run here (an input-site method, one that calibrates on
    images) gets a row with an ``"error"`` instead of numbers."""
    from .. import api
    from ..adapters.hf_text import pool_weights
    from ..errors import TokenThinError
    from ..models import minilm
    from . import text_data

    model, tokenizer = minilm.load_minilm(), minilm.load_minilm_tokenizer()
    sentences = text_data.sentences(n_sentences, seed=seed)
    rs = text_data.retrieval_set(n_queries, seed=seed)
    targets = torch.tensor(rs.targets)

    def embed(texts: Sequence[str]) -> torch.Tensor:
        with torch.inference_mode():
            return minilm.embed(model, tokenizer, texts, batch_size=batch_size)

    def embed_counted(texts: Sequence[str]) -> tuple[torch.Tensor, int, int]:
        """Embeddings, and the real tokens entering the first and the last layer (summed over sentences)."""
        out, n_in, n_out = [], 0, 0
        for start in range(0, len(texts), batch_size):
            batch = minilm.tokenize(tokenizer, texts[start : start + batch_size])
            with torch.inference_mode():
                hidden = model(**batch).last_hidden_state
                out.append(minilm.mean_pool(hidden, pool_weights(model, hidden, batch["attention_mask"])))
            info = api.info(model)
            n_in, n_out = n_in + sum(info.sample_tokens[0]), n_out + sum(info.sample_tokens[-1])
        return torch.cat(out), n_in, n_out

    full = embed(sentences)
    full_q, full_c = embed(rs.queries), embed(rs.corpus)
    full_top = _top1(full_q, full_c)
    rows: list[dict[str, Any]] = [
        {"method": "full", "keep": 1.0, "recall": float((full_top == targets).float().mean())}
    ]
    names = list(dict.fromkeys([*methods, *BASELINES]))
    for name, keep in tqdm([(n, k) for n in names for k in keeps], desc="text", unit="config"):
        row: dict[str, Any] = {"method": name, "keep": keep}
        try:
            api.apply(model, base_name(name), keep=keep, site=f"layer:{layer}", **apply_kwargs(name))
            rt = api.runtime_of(model)
            try:
                emb, t_in, t_out = embed_counted(sentences)
                top = _top1(embed(rs.queries), embed(rs.corpus))
                rt.measure, rt.overhead_s = True, 0.0  # tokenthin's own time, over the reduced runs below
                t = {k: v[0] for k, v in alternate(rt, repeats, (lambda: embed(sentences),)).items()}
                own = rt.overhead_s / max(t[True], 1e-9)
                rt.measure = False
            finally:
                api.remove(model)
        except TokenThinError as exc:
            rows.append({**row, "error": str(exc).split(";")[0]})
            continue
        cos = (emb * full).sum(1)
        rows.append(
            {
                **row,
                "cosine": float(cos.mean()),
                "cos_p5": float(torch.quantile(cos, 0.05)),
                "agreement": float((top == full_top).float().mean()),
                "recall": float((top == targets).float().mean()),
                "time_ratio": t[True] / t[False],
                "own_share": own,
                "tokens": t_out / t_in,
            }
        )
    return rows


def format_text_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of :func:`run_text_bench` rows."""
    lines = [
        "| method | keep | cosine | cos p5 | top-1 agreement | recall@1 | time | own time | tokens |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if r["method"] == "full":
            lines.append(f"| full | 1.00 | 1.000 | 1.000 | 1.00 | {r['recall']:.2f} | 1.00 | - | 1.00 |")
        elif "error" in r:
            lines.append(f"| {r['method']} | {r['keep']:.2f} | n/a: {r['error']} | | | | | | |")
        else:
            lines.append(
                f"| {r['method']} | {r['keep']:.2f} | {r['cosine']:.3f} | {r['cos_p5']:.3f} | {r['agreement']:.2f} | "
                f"{r['recall']:.2f} | {r['time_ratio']:.2f} | {100 * r['own_share']:.1f}% | {r['tokens']:.2f} |"
            )
    return "\n".join(lines)
