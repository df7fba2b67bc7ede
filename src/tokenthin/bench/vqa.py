"""``tokenthin bench --task vqa``: a local VLM answers the questions of a JSONL file with every method x keep.

For each sample (see :mod:`tokenthin.eval.vqa_data` for the file format) the unreduced model answers first
(method ``none``); then every method at every keep fraction (or count) of the visual tokens, with the baselines
``random`` and ``pool`` beside them. Per sample it stores: the answer, accuracy against the references (when the
file has them), agreement with the unreduced answer, and the costs of :mod:`tokenthin.eval.measure` (visual tokens
before / after, prefill FLOPs, prefill time, time to first token, decode step, peak memory). Samples are generated
in batches of ``batch_size``; within a batch every configuration runs in turn, so drift hits all alike.

Data parallel: under ``torchrun --nproc_per_node N -m tokenthin bench ...`` rank r takes the samples whose index
is r modulo N (its GPU ``cuda:LOCAL_RANK``, or the CPU) and appends its rows to ``OUT/RUN/shards/rank-r.jsonl``.
Every row is keyed by its configuration (model, data file, sample, method, budget, site, generation settings; not
the rank), and a rank computes only keys that no shard and no merged file holds, so a run interrupted on any rank
and resumed with ``--resume`` (with any number of processes) neither repeats nor loses a row. When every rank is
done, rank 0 merges the shards into ``results.jsonl`` in a fixed order (sample, then configuration), whatever the
number of processes or the order rows finished in.

``TOKENTHIN_FAULT=r:n`` (a test hook) makes rank r exit abruptly after appending n rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..errors import TokenThinError
from .store import ResultStore, config_key, environment

if TYPE_CHECKING:
    from ..eval.measure import Generation
    from ..eval.vqa_data import VQASample

Texts = dict[str, str]  # sample id -> prompt
Images = dict[str, list[Any]]  # sample id -> its PIL images
BASELINES = ("random", "pool")
REFERENCE = "none"


@dataclass(frozen=True)
class VQARun:
    """What defines a vqa run (everything but the rank goes into each row's key)."""

    model: str
    data: str
    methods: tuple[str, ...]
    keeps: tuple[float | int, ...]
    site: str | None = None
    batch_size: int = 4
    max_new_tokens: int = 16
    dtype: str = "auto"
    seed: int = 0
    repeats: int = 1  # timed generate() calls per batch and configuration; times are their medians

    def configs(self) -> list[tuple[str, float | int]]:
        names = list(dict.fromkeys([m for m in self.methods if m != REFERENCE] + list(BASELINES)))
        return [(REFERENCE, 1.0)] + [(m, k) for m in names for k in self.keeps]


def default_methods() -> list[str]:
    """Every method that acts on a VLM's visual tokens (output or language-model sites) and needs no calibration."""
    from ..methods.base import all_methods

    vlm = ("output", "llm", "output+llm")
    return [n for n, c in all_methods().items() if set(c.sites) & set(vlm) and not hasattr(c, "calibrate")]


def dist_env() -> tuple[int, int]:
    """(rank, world size) from torchrun's environment; (0, 1) without it."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def _barrier(world: int) -> None:
    if world > 1:
        import torch.distributed as dist

        dist.barrier()


def _site(method: str, site: str | None) -> str | None:
    if method == REFERENCE:
        return None
    if site:
        return site
    from ..methods.base import all_methods

    default = getattr(all_methods()[method], "default_site", None)
    return "output" if default == "layers" else None  # merging-in-the-tower methods take keep at the output


def _digest(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


class VQABench:
    """One rank's share of a vqa run; :meth:`run` computes its missing rows, :func:`merge` joins the shards."""

    def __init__(self, run: VQARun, out_dir: Path, resume: bool, run_name: str) -> None:
        from ..eval.loading import load_vlm, pick_device
        from ..eval.vqa_data import read_jsonl

        self.cfg, self.out, self.run_name = run, out_dir, run_name
        self.rank, self.world = dist_env()
        self.samples = read_jsonl(run.data)
        self.data_digest = _digest(run.data)
        existing = _all_rows(out_dir)
        if existing and not resume:
            raise TokenThinError(f"{out_dir} already has results: pass --resume to continue it, or --run NAME")
        _barrier(self.world)  # every rank has looked before any writes
        self.done = {r["key"]: r for r in existing}
        self.store = ResultStore(out_dir / "shards" / f"rank-{self.rank}.jsonl")
        self.device = pick_device(None)
        self.model, self.processor = load_vlm(run.model, device=self.device, dtype=run.dtype)
        self.model_name = Path(run.model).name or run.model
        self.env = environment(self.device)
        self.failed: dict[tuple[str, float | int], str] = {}
        self._fault = _fault_after(self.rank)
        self._written = 0

    def key(self, sample_id: str, method: str, keep: float | int) -> str:
        c = self.cfg
        return config_key(
            {
                "task": "vqa",
                "model": self.model_name,
                "data": self.data_digest,
                "sample": sample_id,
                "method": method,
                "budget": keep if method != REFERENCE else None,
                "site": _site(method, c.site),
                "batch_size": c.batch_size,
                "max_new_tokens": c.max_new_tokens,
                "dtype": c.dtype,
            }
        )

    def run(self) -> None:
        from ..eval.loading import chat_text, question_messages

        mine = [s for s in self.samples if s.index % self.world == self.rank]
        configs = self.cfg.configs()
        refs = {r["sample"]: r.get("answer") for r in self.done.values() if r["method"] == REFERENCE}
        warm = False
        for start in range(0, len(mine), self.cfg.batch_size):
            batch = mine[start : start + self.cfg.batch_size]
            texts = {s.id: chat_text(self.processor, question_messages(s.question)) for s in batch}
            images = {s.id: [s.load_image()] for s in batch}
            for method, keep in configs:
                todo = [s for s in batch if self.key(s.id, method, keep) not in self.done]
                if not todo:
                    continue
                if not warm:  # first calls pay one-off costs: keep them out of the timed rows
                    self._generate(batch, texts, images, max_new=2)
                    warm = True
                if (method, keep) in self.failed:
                    rows = [self._row(s, method, keep, error=self.failed[(method, keep)]) for s in todo]
                else:
                    rows = self._config(todo, texts, images, method, keep, refs)
                for row in rows:
                    self._append(row)

    def _config(
        self,
        todo: list[VQASample],
        texts: Texts,
        images: Images,
        method: str,
        keep: float | int,
        refs: dict[str, str | None],
    ) -> list[dict[str, Any]]:
        from .. import api
        from ..eval.vqa_data import normalize, score

        if method != REFERENCE:
            try:
                api.apply(self.model, method, keep=keep, site=_site(method, self.cfg.site))
            except TokenThinError as e:  # the method cannot act on this model at all: once for the run
                self.failed[(method, keep)] = str(e).split(";")[0]
                return [self._row(s, method, keep, error=self.failed[(method, keep)]) for s in todo]
        try:
            g = self._generate(todo, texts, images, self.cfg.max_new_tokens)
        except TokenThinError as e:  # these inputs (e.g. a keep count above an image's tokens): this batch only
            return [self._row(s, method, keep, error=str(e).split(";")[0]) for s in todo]
        finally:
            if api.is_applied(self.model):
                api.remove(self.model)
        rows = []
        for j, s in enumerate(todo):
            answer = self.processor.tokenizer.decode(g.sequences[j], skip_special_tokens=True).strip()
            if method == REFERENCE:
                refs[s.id] = answer
            ref = refs.get(s.id)
            metrics = {**score(answer, s), **g.sample(j)}
            metrics["agree"] = None if ref is None else float(normalize(answer) == normalize(ref))
            rows.append(self._row(s, method, keep, answer=answer, metrics=metrics, site=g.site))
        return rows

    def _generate(self, todo: list[VQASample], texts: Texts, images: Images, max_new: int) -> Generation:
        from ..eval.loading import encode
        from ..eval.measure import generate_measured

        inputs = encode(
            self.processor, [texts[s.id] for s in todo], [images[s.id] for s in todo], self.device, self.model.dtype
        )
        tok = self.processor.tokenizer
        kw = {
            "max_new_tokens": max_new,
            "eos_token_id": tok.eos_token_id,
            "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        }
        g = generate_measured(self.model, inputs, count_flops=True, **kw)
        more = [generate_measured(self.model, inputs, memory=False, **kw) for _ in range(self.cfg.repeats - 1)]
        for name in ("ttft_s", "prefill_s", "decode_s"):
            setattr(g, name, statistics.median([getattr(x, name) for x in (g, *more)]))
        return g

    def _row(
        self,
        s: VQASample,
        method: str,
        keep: float | int,
        answer: str | None = None,
        metrics: dict[str, Any] | None = None,
        site: str | None = None,
        error: str | None = None,
    ) -> dict[str, Any]:
        row = {
            "key": self.key(s.id, method, keep),
            "run": self.run_name,
            "task": "vqa",
            "model": self.model_name,
            "method": method,
            "budget": keep,
            "baseline": method in BASELINES,
            "site": site,
            "sample": s.id,
            "index": s.index,
            "rank": self.rank,
            "question": s.question,
            "references": list(s.answers),
            "answer": answer,
            "metrics": metrics or {},
            "seed": self.cfg.seed,
            **self.env,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        if error is not None:
            row["error"] = error
        return row

    def _append(self, row: dict[str, Any]) -> None:
        self.store.append(row)
        self.done[row["key"]] = row
        self._written += 1
        if self._fault is not None and self._written >= self._fault:
            os._exit(17)  # the test hook: an abrupt crash, nothing flushed or cleaned up


def _fault_after(rank: int) -> int | None:
    spec = os.environ.get("TOKENTHIN_FAULT", "")
    if not spec:
        return None
    r, n = spec.split(":")
    return int(n) if int(r) == rank else None


def _all_rows(out_dir: Path) -> list[dict[str, Any]]:
    """Rows of the merged file and of every shard, first copy of each key kept."""
    rows: dict[str, dict[str, Any]] = {}
    for path in [out_dir / "results.jsonl", *sorted((out_dir / "shards").glob("rank-*.jsonl"))]:
        for r in ResultStore(path).rows():
            rows.setdefault(r["key"], r)
    return list(rows.values())


def merge(out_dir: Path, run: VQARun) -> list[dict[str, Any]]:
    """Join the shards and the merged file into ``results.jsonl``, ordered by sample then configuration; written
    to a temporary file and renamed, so a reader never sees half a file. Returns the rows."""
    order = {(m, k): i for i, (m, k) in enumerate(run.configs())}
    rows = _all_rows(out_dir)
    rows.sort(key=lambda r: (r["index"], order.get((r["method"], r["budget"]), len(order)), r["key"]))
    tmp = out_dir / "results.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(out_dir / "results.jsonl")
    return rows


def run_vqa(run: VQARun, out_dir: Path, resume: bool, run_name: str) -> list[dict[str, Any]] | None:
    """Run this process's share (see the module docstring); on rank 0, merge and return every row (other ranks:
    ``None``). Under torchrun a gloo process group is started for the barriers (CPU or GPU alike)."""
    rank, world = dist_env()
    started = False
    if world > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("gloo")
            started = True
    try:
        torch.manual_seed(run.seed)
        bench = VQABench(run, out_dir, resume, run_name)
        bench.run()
        _barrier(world)
        return merge(out_dir, run) if rank == 0 else None
    finally:
        if started:
            import torch.distributed as dist

            dist.destroy_process_group()
