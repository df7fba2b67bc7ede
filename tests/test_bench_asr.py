"""The ASR bench end to end on the real Whisper tiny.en and two pocketsphinx clips."""

from __future__ import annotations

import pytest

from tokenthin.bench.asr import format_asr_table, run_asr_bench
from tokenthin.bench.speech import SpeechDataMissingError, clips
from tokenthin.models.whisper import WhisperMissingError, model_dir


@pytest.mark.real
def test_asr_bench_rows_and_table():
    pytest.importorskip("transformers")
    try:
        model_dir()
        clips()
    except (WhisperMissingError, SpeechDataMissingError) as exc:
        pytest.skip(str(exc))
    rows = run_asr_bench(["pool", "fastervlm"], keeps=(0.5,), n_clips=2, max_new_tokens=24, baselines=False)
    full, pool, cls = rows
    assert full["method"] == "none" and full["wer_full"] == 0.0
    assert pool["method"] == "pool" and pool["tokens"] == 750
    assert 0 <= pool["exact"] <= 1 and pool["wer_full"] >= 0 and pool["memory_ratio"] > 0
    assert pool["generate_time_ratio"] > 0 and 0 <= pool["own_share"] < 1
    assert "error" in cls  # Whisper has no [CLS] token: the row says why instead of numbers
    table = format_asr_table(rows)
    assert "| pool | 0.50 |" in table and "n/a" in table
