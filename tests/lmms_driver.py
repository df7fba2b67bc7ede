"""Run by tests/test_eval_lmms.py in a subprocess (lmms-eval changes global logging and warning filters): evaluates a
tiny checkpoint on local tasks through lmms-eval's Python API and writes the answers, metrics and logs as JSON.

    python tests/lmms_driver.py CKPT DATA.jsonl WORK_DIR OUT.json

1. the reference: lmms-eval's own ``llava_hf`` model at batch 1 (or, where it cannot be imported, plain Hugging Face
   ``generate`` with the same prompt), on task A (the data's own answers);
2. task B: the same questions, references = the reference answers for the first 3 lines and a wrong one for the rest;
3. ``tokenthin`` without a method at batch 3, and with ``visionzip`` keeping 16 visual tokens at batch 3, on task B.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _plain_generate(ckpt: str, task_yaml: Path) -> dict[str, str]:
    """Answers of the untouched model with lmms-eval's chat prompt (its default user turn: image, then text)."""
    import torch

    from tokenthin.eval.lmms_task import POST_PROMPT, doc_to_visual
    from tokenthin.eval.loading import load_vlm

    model, proc = load_vlm(ckpt, device="cpu", dtype="float32")
    docs = [json.loads(x) for x in (task_yaml.parent / "data.jsonl").read_text().splitlines()]
    out = {}
    for i, doc in enumerate(docs):
        img = doc_to_visual(doc)[0]
        msgs = [
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": doc["question"] + POST_PROMPT}]}
        ]
        text = proc.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        inputs = proc(images=[img], text=text, return_tensors="pt")
        eos = proc.tokenizer.eos_token_id
        with torch.inference_mode():
            seq = model.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=eos, eos_token_id=eos)
        out[str(i)] = proc.tokenizer.decode(seq[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return out


def main(ckpt: str, data: str, work: str, out: str) -> None:
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.models import get_model
    from lmms_eval.tasks import TaskManager

    from tokenthin.eval.lmms_task import write_task
    from tokenthin.eval.tiny import make_vqa_data

    w = Path(work)
    res: dict = {}

    def evaluate(name: str, model: str, args: str, batch: int, tasks: Path) -> dict[str, str]:
        tm = TaskManager(include_path=str(tasks), include_defaults=False)
        r = simple_evaluate(
            model=model, model_args=args, tasks=["tokenthin_vqa"], batch_size=batch, device="cpu", task_manager=tm
        )
        samples = r["samples"]["tokenthin_vqa"]
        res[name] = {
            "answers": {str(s["doc_id"]): s["filtered_resps"] for s in samples},
            "token_counts": {str(s["doc_id"]): s.get("token_counts") for s in samples},
            "metrics": {k: v for k, v in r["results"]["tokenthin_vqa"].items() if isinstance(v, float)},
            "backend": r["config"]["model_backend"],
        }
        return {k: v[0] if isinstance(v, list) else v for k, v in res[name]["answers"].items()}

    task_a = write_task(data, w / "tasks_a", max_new_tokens=8)
    try:
        get_model("llava_hf")
        ref = evaluate("reference", "llava_hf", f"pretrained={ckpt},device_map=cpu", 1, task_a.parent.parent)
    except ImportError:  # its module imports decord
        ref = _plain_generate(ckpt, task_a)
        res["reference"] = {"answers": ref, "backend": "transformers generate"}
    answers = [ref[str(i)] for i in range(3)] + ["no such answer"] * 3
    task_b = write_task(make_vqa_data(w / "data_b", answers=answers), w / "tasks_b", max_new_tokens=8)
    evaluate("none", "tokenthin", f"pretrained={ckpt},log_dir={w / 'log_none'}", 3, task_b.parent.parent)
    args = f"pretrained={ckpt},method=visionzip,keep=16,log_dir={w / 'log_vz'}"
    evaluate("visionzip", "tokenthin", args, 3, task_b.parent.parent)
    Path(out).write_text(json.dumps(res, default=str))


if __name__ == "__main__":
    main(*sys.argv[1:])
