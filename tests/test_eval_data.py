"""Local VQA data (JSONL), answer scoring, and the lmms-eval task written over it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tokenthin.errors import TokenThinError
from tokenthin.eval.lmms_task import doc_to_text, doc_to_visual, process_results, write_task
from tokenthin.eval.tiny import make_vqa_data
from tokenthin.eval.vqa_data import contains, exact, normalize, read_jsonl, score


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return make_vqa_data(tmp_path)


def test_reads_the_demo_file_with_resolved_images(data: Path) -> None:
    samples = read_jsonl(data)
    assert [s.id for s in samples] == [f"q{i}" for i in range(6)] and [s.index for s in samples] == list(range(6))
    assert all(s.image.is_absolute() and s.image.is_file() for s in samples)
    assert samples[0].answers == ("red",) and samples[0].metric == "exact"
    assert samples[2].load_image().size == (400, 200)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "not JSON"),
        ('{"question": "q"}', "'image' and 'question'"),
        ('{"image": "images/0.png", "question": "q", "answer": 3}', "'answer' must be"),
        ('{"image": "images/0.png", "question": "q", "metric": "bleu"}', "metric 'bleu'"),
        ('{"image": "nope.png", "question": "q"}', "does not exist"),
        ('{"image": "images/0.png", "question": "q", "id": "q0"}', "appears twice"),
    ],
)
def test_bad_lines_fail_naming_the_line(data: Path, line: str, message: str) -> None:
    data.write_text(data.read_text() + line + "\n")
    with pytest.raises(TokenThinError, match=message) as e:
        read_jsonl(data)
    assert f"{data}:7" in str(e.value)


def test_scoring() -> None:
    assert normalize("  The Red, car! ") == "red car"
    assert exact("A tree.", ["tree"]) == 1.0 and exact("a tree house", ["tree"]) == 0.0
    assert contains("it is a tree house", ["tree"]) == 1.0 and contains("street", ["tree"]) == 0.0
    assert contains("anything", [""]) == 0.0


def test_score_follows_the_metric_named_in_the_line(tmp_path: Path, data: Path) -> None:
    lines = data.read_text().splitlines()
    row = json.loads(lines[0]) | {"metric": "contains", "answers": ["red", "crimson"]}
    data.write_text("\n".join([json.dumps(row), *lines[1:]]) + "\n")
    s = read_jsonl(data)[0]
    assert score("it is red", s) == {"exact": 0.0, "contains": 1.0, "correct": 1.0}
    row = {"image": row["image"], "question": "q"}  # no answer: nothing to score
    data.write_text(json.dumps(row) + "\n")
    assert score("red", read_jsonl(data)[0]) == {"exact": None, "contains": None, "correct": None}


def test_written_task_is_self_contained_yaml_over_the_data(tmp_path: Path, data: Path) -> None:
    yaml = pytest.importorskip("yaml")
    path = write_task(data, tmp_path / "tasks", name="my_vqa", max_new_tokens=5)
    text = path.read_text()

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_constructor("!function", lambda loader, node: ("fn", loader.construct_scalar(node)))
    cfg = yaml.load(text, Loader=Loader)
    local = Path(cfg["dataset_kwargs"]["data_files"]["test"])
    assert cfg["task"] == "my_vqa" and cfg["dataset_path"] == "json" and local == path.parent / "data.jsonl"
    assert cfg["generation_kwargs"]["max_new_tokens"] == 5
    assert cfg["doc_to_visual"] == ("fn", "tokenthin.eval.lmms_task.doc_to_visual")
    assert [m["metric"] for m in cfg["metric_list"]] == ["vqa_exact", "vqa_contains"]
    docs = [json.loads(x) for x in local.read_text().splitlines()]
    assert len(docs) == 6 and Path(docs[0]["image"]).is_absolute() and docs[0]["answers"] == ["red"]
    assert doc_to_visual(docs[2])[0].size == (400, 200)
    assert doc_to_text(docs[0], cfg["lmms_eval_specific_kwargs"]["default"]).endswith("single word or phrase.")
    assert process_results(docs[0], ["Red."]) == {"vqa_exact": 1.0, "vqa_contains": 1.0}
    with pytest.raises(ValueError, match="task name"):
        write_task(data, tmp_path, name="bad-name")


def test_unlabelled_data_gets_the_bypass_metric(tmp_path: Path, data: Path) -> None:
    rows = [json.loads(x) for x in data.read_text().splitlines()]
    data.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "answer"}) + "\n" for r in rows))
    text = write_task(data, tmp_path).read_text()
    assert "metric: bypass" in text and "process_results" not in text


def test_command_line_writes_a_checkpoint_with_demo_data_and_a_task(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tokenthin.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["tiny-vlm", "llava", str(tmp_path / "q"), "--image-size", "112"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "q" / "config.json").exists() and (tmp_path / "q" / "processor_config.json").exists()
    data = tmp_path / "q" / "data" / "vqa.jsonl"
    assert len(read_jsonl(data)) == 6
    res = runner.invoke(app, ["eval-task", str(data), "--out", str(tmp_path / "tasks"), "--name", "mine"])
    assert res.exit_code == 0 and "--include_path" in res.output and "--tasks mine" in res.output
    assert (tmp_path / "tasks" / "mine" / "mine.yaml").exists()
    assert runner.invoke(app, ["tiny-vlm", "gpt", str(tmp_path / "x")]).exit_code != 0
