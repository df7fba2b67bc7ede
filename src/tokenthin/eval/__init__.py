"""Evaluate a vision-language model with a token-reduction method applied.

* :mod:`tokenthin.eval.tiny`: tiny random checkpoints laid out like LLaVA-1.5, LLaVA-NeXT, Qwen2-VL and Qwen2.5-VL,
  saved with their processors (for smoke tests; random weights say nothing about quality);
* :mod:`tokenthin.eval.loading`: load a local checkpoint and its processor, build prompts;
* :mod:`tokenthin.eval.measure`: batched greedy generation with per-sample visual-token counts, prefill time, time to
  first token, decode time and peak memory;
* :mod:`tokenthin.eval.lmms`: the ``tokenthin`` model for lmms-eval (needs ``pip install tokenthin[eval]``);
* :mod:`tokenthin.eval.lmms_task`: an lmms-eval task over a local JSONL file of (image, question, answer) lines.

Nothing here imports lmms-eval unless :mod:`tokenthin.eval.lmms` is imported.
"""


def lmms_manifest():
    """The ``lmms_eval.models`` entry point: registers the model ``tokenthin``
    (:class:`tokenthin.eval.lmms.TokenThinVLM`) with lmms-eval's model registry."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="tokenthin", chat_class_path="tokenthin.eval.lmms.TokenThinVLM")
