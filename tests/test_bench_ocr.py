"""The OCR bench's pure helpers (the bench itself needs the real latex-ocr weights)."""

from __future__ import annotations

from tokenthin.bench.ocr import format_ocr_table, formulas, levenshtein, normalised_edit


def test_levenshtein():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein("", "abc") == 3 and levenshtein("abc", "") == 3
    assert levenshtein("same", "same") == 0
    assert normalised_edit("", "") == 0.0
    assert normalised_edit("ab", "ba") == 1.0
    assert normalised_edit("abcd", "abce") == 0.25


def test_formulas_are_deterministic_and_varied():
    a, b = formulas(12, seed=0), formulas(12, seed=0)
    assert a == b and len(set(a)) == 12
    assert formulas(12, seed=1) != a
    text = "".join(a)
    for piece in (r"\frac", r"\sqrt", r"\sum", "^{"):
        assert piece in text


def test_format_table():
    rows = [
        {
            "method": "tome",
            "keep": 0.5,
            "exact": 1.0,
            "edit": 0.0,
            "decode_time_ratio": 0.9,
            "encode_time_ratio": 1.0,
            "memory_ratio": 0.6,
            "own_share": 0.012,
            "tokens": 512.0,
        },
        {"method": "fastervlm", "keep": 0.5, "error": "no [CLS] token"},
    ]
    table = format_ocr_table(rows)
    assert table.count("\n") == 3 and "| tome | 0.50 | 1.00 | 0.000 | 0.90 | 1.00 | 0.60 | 1.2% | 512 |" in table
    assert "n/a: no [CLS] token" in table


def test_bench_cli_ocr_task_validates_its_arguments() -> None:
    from typer.testing import CliRunner

    from tokenthin.cli import app

    res = CliRunner().invoke(app, ["bench", "--task", "ocr,features"])
    flat = " ".join(res.output.replace("│", " ").split())
    assert res.exit_code != 0 and "give --task ocr alone" in flat


def test_bench_cli_ocr_passes_its_options(monkeypatch, tmp_path) -> None:
    from typer.testing import CliRunner

    from tokenthin.bench import ocr
    from tokenthin.cli import app

    seen = {}

    def fake(methods, keeps, n_formulas, repeats, seed):
        seen.update(methods=methods, keeps=keeps, n=n_formulas, repeats=repeats)
        return [
            {
                "method": "tome",
                "keep": 0.5,
                "exact": 1.0,
                "edit": 0.0,
                "decode_time_ratio": 0.9,
                "encode_time_ratio": 1.0,
                "tokens": 512,
            }
        ]

    monkeypatch.setattr(ocr, "run_ocr_bench", fake)
    res = CliRunner().invoke(
        app,
        [
            "bench",
            "--task",
            "ocr",
            "--formulas",
            "5",
            "--methods",
            "tome",
            "--budgets",
            "0.5,0.1",
            "--out",
            str(tmp_path),
        ],
    )
    assert res.exit_code == 0, res.output
    assert seen["n"] == 5 and seen["keeps"] == (0.5, 0.1) and "tome" in seen["methods"]
    assert (tmp_path / "latex-ocr" / "ocr.md").read_text().startswith("| method |")
