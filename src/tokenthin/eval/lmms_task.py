"""An lmms-eval task over a local JSONL file of (image, question, answer) lines (the format of
:mod:`tokenthin.eval.vqa_data`, shared with ``tokenthin bench --task vqa``); nothing is downloaded.

:func:`write_task` writes ``OUT/NAME/NAME.yaml`` and ``OUT/NAME/data.jsonl`` (the lines with absolute image paths).
The YAML reads the data with the ``datasets`` JSON builder (``dataset_path: json``, ``dataset_kwargs: data_files``)
and names this module's functions for the prompt and the scoring, so the folder needs no Python of its own:

    tokenthin eval-task questions.jsonl --out tasks/           # prints the lmms-eval arguments to use
    python -m lmms_eval --include_path tasks/ --tasks tokenthin_vqa --model tokenthin --model_args ...

Metrics: ``vqa_exact`` and ``vqa_contains`` (see :mod:`tokenthin.eval.vqa_data`), averaged; a file without answers
gets lmms-eval's ``bypass`` metric (answers are logged, nothing is scored).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .vqa_data import contains, exact, read_jsonl

POST_PROMPT = "\nAnswer the question using a single word or phrase."


def doc_to_visual(doc: dict[str, Any]) -> list[Any]:
    from PIL import Image

    with Image.open(doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict[str, Any] | None = None) -> str:
    kw = lmms_eval_specific_kwargs or {}
    return f"{kw.get('pre_prompt', '')}{doc['question']}{kw.get('post_prompt', '')}"


def doc_to_target(doc: dict[str, Any]) -> str:
    return doc["answers"][0] if doc["answers"] else ""


def process_results(doc: dict[str, Any], results: list[str]) -> dict[str, float]:
    pred = results[0] if results else ""
    return {"vqa_exact": exact(pred, doc["answers"]), "vqa_contains": contains(pred, doc["answers"])}


def _yaml(name: str, data: Path, labelled: bool, max_new_tokens: int, post_prompt: str) -> str:
    mod = __name__
    metrics = (
        "".join(
            f"  - metric: {m}\n    aggregation: mean\n    higher_is_better: true\n"
            for m in ("vqa_exact", "vqa_contains")
        )
        if labelled
        else "  - metric: bypass\n"
    )
    process = f"process_results: !function {mod}.process_results\n" if labelled else ""
    return (
        f"# written by tokenthin.eval.lmms_task.write_task; reads {data.name} next to this file\n"
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        f"doc_to_visual: !function {mod}.doc_to_visual\n"
        f"doc_to_text: !function {mod}.doc_to_text\n"
        f"doc_to_target: !function {mod}.doc_to_target\n"
        "generation_kwargs:\n"
        f"  max_new_tokens: {max_new_tokens}\n  temperature: 0\n  num_beams: 1\n  do_sample: false\n"
        f"{process}"
        f"metric_list:\n{metrics}"
        'lmms_eval_specific_kwargs:\n  default:\n    pre_prompt: ""\n'
        f"    post_prompt: {json.dumps(post_prompt)}\n"
        "metadata:\n  - version: 0.0\n"
    )


def write_task(
    data: str | Path,
    out_dir: str | Path,
    name: str = "tokenthin_vqa",
    max_new_tokens: int = 16,
    post_prompt: str = POST_PROMPT,
) -> Path:
    """Write the lmms-eval task ``name`` for the JSONL file ``data`` under ``out_dir/name/``; returns the YAML's
    path. Pass ``--include_path out_dir --tasks name`` to lmms-eval."""
    if not name.isidentifier():
        raise ValueError(f"task name {name!r}: use letters, digits and underscores")
    samples = read_jsonl(data)
    folder = Path(out_dir) / name
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {"id": s.id, "image": str(s.image), "question": s.question, "answers": list(s.answers), "metric": s.metric}
        for s in samples
    ]
    local = (folder / "data.jsonl").resolve()
    local.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    labelled = all(s.answers for s in samples)
    path = folder / f"{name}.yaml"
    path.write_text(_yaml(name, local, labelled, max_new_tokens, post_prompt), encoding="utf-8")
    return path
