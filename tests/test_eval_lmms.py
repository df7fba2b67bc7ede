"""The lmms-eval path: the ``tokenthin`` model found through its entry point, a tiny LLaVA checkpoint, a local task
over a 6-line JSONL (no downloads). Without a method it answers as lmms-eval's own ``llava_hf``; with one, the
per-sample log holds the budget; ``accelerate launch`` runs it on 2 CPU processes."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tokenthin.eval.tiny import make_vqa_data, save_tiny

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lmms_eval") is None, reason="lmms-eval not installed")
ROOT = Path(__file__).resolve().parents[1]


def _entry_point(root: Path) -> Path:
    """A dist-info folder declaring tokenthin's ``lmms_eval.models`` entry point, as ``pip install`` of this checkout
    writes it (pyproject.toml), for a checkout run from src/ without reinstalling."""
    d = root / "ep" / "tokenthin_lmms_entry-0.dist-info"
    d.mkdir(parents=True)
    (d / "METADATA").write_text("Metadata-Version: 2.1\nName: tokenthin-lmms-entry\nVersion: 0\n")
    (d / "entry_points.txt").write_text("[lmms_eval.models]\ntokenthin = tokenthin.eval:lmms_manifest\n")
    return root / "ep"


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> dict:
    w = tmp_path_factory.mktemp("lmms")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(_entry_point(w)), os.environ.get("PYTHONPATH", "")]),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "HF_HOME": str(w / "hf"),
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    return {
        "dir": w,
        "ckpt": save_tiny("llava", w / "tiny-llava", image_size=112),
        "data": make_vqa_data(w),
        "env": env,
    }


@pytest.fixture(scope="module")
def driven(work: dict) -> dict:
    out = work["dir"] / "driver.json"
    cmd = [sys.executable, str(ROOT / "tests" / "lmms_driver.py"), work["ckpt"], work["data"], work["dir"], out]
    proc = subprocess.run([str(c) for c in cmd], env=work["env"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return json.loads(out.read_text())


def _log(folder: Path) -> list[dict]:
    (path,) = folder.glob("*.jsonl")
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_without_a_method_the_answers_are_lmms_evals_own(driven: dict) -> None:
    ref, none = driven["reference"], driven["none"]
    assert none["backend"] == "tokenthin.eval.lmms.TokenThinVLM (chat)"
    assert "llava_hf" in ref["backend"] or ref["backend"] == "transformers generate"
    first = {k: v[0] if isinstance(v, list) else v for k, v in ref["answers"].items()}
    assert {k: v[0] for k, v in none["answers"].items()} == first  # batch 3 with left padding vs batch 1
    assert len(first) == 6


def test_task_metrics_are_scored_against_the_file(driven: dict) -> None:
    """Task B's references are the reference answers for 3 of 6 lines: the unreduced model scores exactly 0.5."""
    assert driven["none"]["metrics"]["vqa_exact,none"] == 0.5
    assert driven["none"]["metrics"]["vqa_contains,none"] >= 0.5


def test_per_sample_log_holds_the_budget(driven: dict, work: dict) -> None:
    rows = _log(work["dir"] / "log_vz")
    assert sorted(r["doc_id"] for r in rows) == list(range(6))
    for r in rows:
        assert (r["method"], r["keep"], r["site"]) == ("visionzip", 16, "output")
        assert (r["visual_tokens"], r["kept"], r["visual_after"]) == (64, 16, 16)
        assert r["llm_tokens"] == r["prompt_tokens"] - 48 and r["batch_size"] == 3
        assert r["ttft_s"] >= r["prefill_s"] > 0 and r["peak_mb"] > 0 and 1 <= r["new_tokens"] <= 8
        counts = driven["visionzip"]["token_counts"][str(r["doc_id"])][0]
        assert counts == {"input_tokens": r["llm_tokens"], "output_tokens": r["new_tokens"]}
        assert driven["visionzip"]["answers"][str(r["doc_id"])][0] == r["answer"]
    unreduced = _log(work["dir"] / "log_none")
    assert all(r["kept"] == r["visual_tokens"] == 64 and r["method"] == "none" for r in unreduced)


@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="accelerate not installed")
def test_accelerate_launch_two_cpu_processes(driven: dict, work: dict) -> None:
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if accelerate is None:
        pytest.skip("no accelerate launcher")
    w = work["dir"]
    # --multi_gpu picks accelerate's torch.distributed launcher, ACCELERATE_USE_CPU its multi-CPU (gloo) mode; on GPUs
    # it is `accelerate launch --num_processes N` alone
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(29100 + os.getpid() % 400)]
    cmd += ["-m", "lmms_eval", "--model", "tokenthin", "--tasks", "tokenthin_vqa", "--batch_size", "2"]
    args = f"pretrained={work['ckpt']},method=visionzip,keep=16,log_dir={w / 'log_dp'}"
    cmd += ["--model_args", args, "--include_path", str(w / "tasks_b"), "--output_path", str(w / "out_dp")]
    cmd += ["--log_samples"]
    env = {**work["env"], "ACCELERATE_USE_CPU": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    logs = sorted((w / "log_dp").glob("*.jsonl"))
    assert [p.name.rsplit("_", 1)[1] for p in logs] == ["rank0.jsonl", "rank1.jsonl"]
    rows = [json.loads(x) for p in logs for x in p.read_text().splitlines()]
    assert sorted(r["doc_id"] for r in rows) == list(range(6)) and {r["rank"] for r in rows} == {0, 1}
    assert all(r["kept"] == 16 and r["batch_size"] <= 2 for r in rows)
    single = {k: v[0] for k, v in driven["visionzip"]["answers"].items()}
    assert {str(r["doc_id"]): r["answer"] for r in rows} == single  # data-parallel = one process
    (samples,) = (w / "out_dp").rglob("*samples_tokenthin_vqa.jsonl")
    docs = [json.loads(x) for x in samples.read_text().splitlines()]
    assert sorted(d["doc_id"] for d in docs) == list(range(6))  # gathered on rank 0, none lost or doubled
    assert "vqa_exact" in proc.stdout
