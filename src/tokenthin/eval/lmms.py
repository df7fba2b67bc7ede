"""The ``tokenthin`` model for lmms-eval (0.7.x): any VLM tokenthin has a host for, with a method and budget applied.

    python -m lmms_eval --model tokenthin \\
        --model_args pretrained=/models/llava-1.5-7b-hf,method=visionzip,keep=64 \\
        --tasks mme --batch_size 8 --output_path out/ --log_samples

lmms-eval finds it through the Python entry point group ``lmms_eval.models`` (tokenthin's ``pyproject.toml`` declares
``tokenthin = "tokenthin.eval:lmms_manifest"``; lmms-eval's registry reads that group at import), so nothing is
forked or patched. Data-parallel: ``accelerate launch --num_processes N -m lmms_eval --model tokenthin ...`` runs one
full copy of the model per process (``cuda:LOCAL_RANK``) on its share of the requests; on CPUs,
``ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...`` (``--multi_gpu`` picks accelerate's
torch.distributed launcher, the variable its multi-CPU gloo mode).

``--model_args`` (comma-separated ``key=value``): ``pretrained`` (a local checkpoint directory or a cached model id;
nothing is downloaded), ``method`` (a tokenthin method; omitted or ``none``: the unreduced model), ``keep`` / ``r``
/ ``flops`` / ``site`` (the budget and site, as ``tokenthin.apply`` takes them: ``keep=64`` is a count,
``keep=0.25`` a fraction), ``dtype`` (auto: the checkpoint's own on a GPU, float32 on the CPU; float32, float16,
bfloat16), ``attn_implementation``, ``device``, ``batch_size``, ``log_dir`` (per-sample log folder, default
``tokenthin_logs``; ``none`` turns it off), ``memory`` (peak memory per batch, default true), ``count_flops``
(prefill FLOPs per batch, default false); any other key is a parameter of the method.

Prompts: lmms-eval's chat messages (``doc_to_messages``, or its default user turn of ``doc_to_visual`` images then
``doc_to_text``) rendered by the processor's chat template; generation is greedy unless the task asks otherwise,
``max_new_tokens`` 1024 unless the task says, stop strings (``until``) cut the text after generation (``llava_hf``
ignores them; a task's default stop is the end-of-sequence token, where both agree). These are the choices of
lmms-eval's own ``llava_hf`` model, so without a method the answers equal it on the same checkpoint (a test holds
them to it); unlike it, batches above 1 are generated together (left padding). lmms-eval's ``qwen2_vl`` model
differs: it re-encodes images as JPEG and resizes them with ``qwen_vl_utils``; this model feeds the processor the
task's images, resized by the processor's own ``min_pixels`` / ``max_pixels``.

Per-sample log: ``LOG_DIR/<run>_rank<r>.jsonl``, one line per request: task, doc id, the answer, the visual tokens
before / after, the language model's prompt length, time to first token, prefill, decode time and steps, peak
memory (see :mod:`tokenthin.eval.measure`), batch size. lmms-eval's own sample log gets ``input_tokens`` (the
language model's prompt length after reduction) and ``output_tokens``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from pathlib import Path
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, Instance, TokenCounts
from lmms_eval.api.model import lmms
from lmms_eval.protocol import ChatMessages

from .. import api
from ..bench.timing import set_reduced
from ..errors import TokenThinError
from .loading import chat_text, encode, load_vlm, pick_device, resolve_dtype
from .measure import generate_measured

_LMMS_EXTRAS = ("max_batch_size",)  # keys lmms-eval adds to every model's arguments


def register() -> None:
    """Register ``tokenthin`` in an lmms-eval imported in this process (for a checkout that is not pip-installed,
    where the entry point is not visible)."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    from . import lmms_manifest

    MODEL_REGISTRY_V2.register_manifest(lmms_manifest(), overwrite=True)


class TokenThinVLM(lmms):
    """A local VLM checkpoint with a tokenthin method applied (see the module docstring for the arguments)."""

    is_simple = False

    def __init__(
        self,
        pretrained: str,
        method: str | None = None,
        keep: float | int | None = None,
        r: int | None = None,
        flops: float | None = None,
        site: str | None = None,
        device: str | None = None,
        dtype: str = "auto",
        attn_implementation: str | None = None,
        batch_size: int | str = 1,
        log_dir: str | None = "tokenthin_logs",
        memory: bool = True,
        count_flops: bool = False,
        **params: Any,
    ) -> None:
        super().__init__()
        from accelerate import Accelerator

        for k in _LMMS_EXTRAS:
            params.pop(k, None)
        no_gpu = not torch.cuda.is_available()
        on_cpu = no_gpu or device == "cpu"
        self.accelerator = Accelerator(cpu=no_gpu)  # lmms-eval made its own first: this shares its state
        self._rank = self.accelerator.process_index
        self._world_size = self.accelerator.num_processes
        if self._world_size == 1 and int(os.environ.get("WORLD_SIZE", 1)) > 1:
            raise TokenThinError(
                "accelerate sees one process but WORLD_SIZE="
                f"{os.environ['WORLD_SIZE']}: on CPUs run `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu "
                "--num_processes N -m lmms_eval ...` so that accelerate uses its multi-CPU (gloo) mode"
            )
        if on_cpu:
            dev = torch.device("cpu")
        elif self._world_size > 1 or not device:
            dev = pick_device(None, self.accelerator.local_process_index)
        else:
            dev = torch.device(device)
        self._device = dev
        self._model, self.processor = load_vlm(
            pretrained, device=dev, dtype=resolve_dtype(dtype, dev), attn_implementation=attn_implementation
        )
        self._tokenizer = self.processor.tokenizer
        if not str(batch_size).isdigit():
            raise TokenThinError(f"batch_size={batch_size!r}: give a number (automatic batch sizes are not supported)")
        self.batch_size_per_gpu = int(batch_size)
        self.method = None if method in (None, "", "none") else str(method)
        self.budget = {k: v for k, v in (("keep", keep), ("r", r), ("flops", flops)) if v is not None}
        if self.method is not None:
            api.apply(self._model, self.method, site=site, **self.budget, **params)
        elif self.budget or site or params:
            raise TokenThinError(f"budget / site / method parameters given without a method: {self.budget or params}")
        self.memory, self.count_flops = bool(memory), bool(count_flops)
        self._log = self._open_log(log_dir, Path(str(pretrained)).name)

    # ---- lmms-eval's model interface

    @property
    def model(self) -> torch.nn.Module:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def eot_token_id(self) -> int:
        return self._tokenizer.eos_token_id

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "the tokenthin model generates answers: use lmms-eval tasks whose output_type is generate_until"
        )

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("the tokenthin model does not run multi-round tasks yet")

    def generate_until(self, requests: list[Instance]) -> list[GenerationResult]:
        from tqdm import tqdm

        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[2], sort_keys=True, default=str), []).append(i)
        results: list[GenerationResult | None] = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="Model Responding")
        for idx in groups.values():
            for s in range(0, len(idx), self.batch_size):
                chunk = idx[s : s + self.batch_size]
                for i, res in zip(chunk, self._batch([requests[i] for i in chunk])):
                    results[i] = res
                bar.update(len(chunk))
        bar.close()
        return results  # type: ignore[return-value]

    # ---- one batch

    def _batch(self, reqs: list[Instance]) -> list[GenerationResult]:
        texts, images, meta = [], [], []
        for req in reqs:
            _ctx, to_messages, _gen, doc_id, task, split = req.args
            msgs = ChatMessages(messages=to_messages(self.task_dict[task][split][doc_id]))
            imgs, videos, _ = msgs.extract_media()
            if videos:
                raise NotImplementedError("the tokenthin model takes images; this task gives videos")
            texts.append(chat_text(self.processor, msgs.model_dump()["messages"]))
            images.append([im.convert("RGB") for im in imgs])
            meta.append((task, doc_id))
        gen = dict(reqs[0].args[2])
        until = gen.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new = int(gen.pop("max_new_tokens", 1024))
        temperature = float(gen.pop("temperature", 0) or 0)
        kw: dict[str, Any] = {"num_beams": int(gen.pop("num_beams", 1) or 1)}
        if temperature > 0:
            kw.update(do_sample=True, temperature=temperature, top_p=gen.pop("top_p", None))
        with_img = [i for i, ims in enumerate(images) if ims]
        out: dict[int, GenerationResult] = {}
        for part, reduced in ((with_img, True), ([i for i in range(len(reqs)) if not images[i]], False)):
            if part:
                for i, res in zip(part, self._generate(part, texts, images, meta, reduced, max_new, until, kw)):
                    out[i] = res
        return [out[i] for i in range(len(reqs))]

    def _generate(
        self,
        part: list[int],
        texts: list[str],
        images: list[list[Any]],
        meta: list[tuple[str, Any]],
        reduced: bool,
        max_new: int,
        until: list[str],
        kw: dict[str, Any],
    ) -> list[GenerationResult]:
        inputs = encode(
            self.processor, [texts[i] for i in part], [images[i] for i in part], self._device, self._model.dtype
        )
        rt = api.runtime_of(self._model) if api.is_applied(self._model) else None
        if rt is not None:
            set_reduced(rt, reduced)  # a prompt without an image has nothing to reduce: run it unreduced
        try:
            g = generate_measured(
                self._model,
                inputs,
                max_new_tokens=max_new,
                eos_token_id=self.eot_token_id,
                pad_token_id=self.eot_token_id,
                memory=self.memory,
                count_flops=self.count_flops,
                **kw,
            )
        finally:
            if rt is not None:
                set_reduced(rt, True)
        res = []
        for j, i in enumerate(part):
            text = self._tokenizer.decode(g.sequences[j], skip_special_tokens=True)
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop)[0]
            row = g.sample(j)
            self._write(meta[i], text, row, g.site)
            res.append(
                GenerationResult(text, TokenCounts(input_tokens=row["llm_tokens"], output_tokens=row["new_tokens"]))
            )
        return res

    # ---- per-sample log

    def _open_log(self, log_dir: str | None, name: str) -> Path | None:
        if log_dir in (None, "", "none", "None"):
            return None
        stamp = [_dt.datetime.now().strftime("%Y%m%d-%H%M%S")]
        if self._world_size > 1:  # one name for the run: rank 0's clock
            from accelerate.utils import broadcast_object_list

            broadcast_object_list(stamp, from_process=0)
        stamp = stamp[0]
        tag = self.method or "none"
        path = Path(log_dir) / f"{stamp}_{name}_{tag}_rank{self._rank}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("", encoding="utf-8")
        return path

    def _write(self, meta: tuple[str, Any], text: str, row: dict[str, Any], site: str | None) -> None:
        if self._log is None:
            return
        task, doc_id = meta
        line = {"task": task, "doc_id": doc_id, "rank": self._rank, "method": self.method or "none", **self.budget}
        line.update(site=site, answer=text, **row)
        with open(self._log, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line, default=str) + "\n")
