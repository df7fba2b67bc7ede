"""``tokenthin bench``: every method at equal analytic FLOPs on one model, next to the baselines, on real data.

For each method and FLOPs budget the runner applies the method (solving the budget into its own ``r`` schedule or
``keep`` count), then measures, against the unreduced model in the same run:

* ``features``: cosine similarity of the pooled ([CLS]) feature;
* ``knn``: Fashion-MNIST test accuracy of a cosine k-NN classifier fitted on unreduced train features;
* ``saliency``: the model's dense head on unmerged patch tokens, Pearson correlation and top-20% IoU with the
  unreduced map;
* ``cost``: analytic FLOPs, tokens per layer, images/s with warm-up and the median of interleaved repeats, the
  time ratio to the unreduced model, peak memory and the share of the forward spent in tokenthin's own ops.

Rows are appended to ``results.jsonl`` one at a time (keyed by a hash of their configuration), so an interrupted
run resumes where it stopped.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from .. import api
from ..adapters.registry import find_adapter
from ..errors import TokenThinError
from ..methods.base import all_methods
from .memory import peak_memory
from .store import ResultStore, config_key, environment
from .variants import CAL, apply_kwargs, base_name

BASELINES = ("random", "pool", "downsample")
TASKS = ("features", "knn", "saliency", "cost")


@dataclass
class BenchModel:
    """A model under test: the encoder, an optional dense head, and how images are prepared."""

    name: str
    encoder: nn.Module
    image_size: int
    head: Callable[[torch.Tensor, tuple[int, int]], torch.Tensor] | None = None  # (patch tokens, grid) -> map


@dataclass
class BenchData:
    images: torch.Tensor  # (N, 3, S, S) pixel values for features / saliency / cost
    calibration: torch.Tensor  # for calibrating methods (dtome)
    knn_train: tuple[torch.Tensor, torch.Tensor] | None = None  # (pixels, labels)
    knn_test: tuple[torch.Tensor, torch.Tensor] | None = None


@dataclass
class BenchConfig:
    methods: tuple[str, ...]
    budgets: tuple[float, ...]
    tasks: tuple[str, ...] = TASKS
    batch_size: int = 8
    repeats: int = 3
    seed: int = 0
    knn_k: int = 20
    extra: dict[str, Any] = field(default_factory=dict)  # recorded in every row's key (e.g. image counts)
    calibration: dict[str, Any] = field(default_factory=dict)  # "+cal" rows: tokenthin.calibrate options (key too)


# ----------------------------------------------------------------------------- metrics


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample Pearson correlation of two (B, ...) maps."""
    a = a.flatten(1).double()
    b = b.flatten(1).double()
    a = a - a.mean(1, keepdim=True)
    b = b - b.mean(1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def top_iou(a: torch.Tensor, b: torch.Tensor, frac: float = 0.2) -> torch.Tensor:
    """Per-sample IoU of the top ``frac`` regions of two (B, ...) maps."""
    a, b = a.flatten(1), b.flatten(1)
    k = max(1, round(frac * a.shape[1]))
    ma = torch.zeros_like(a, dtype=torch.bool).scatter_(1, a.topk(k, dim=1).indices, True)
    mb = torch.zeros_like(b, dtype=torch.bool).scatter_(1, b.topk(k, dim=1).indices, True)
    return (ma & mb).sum(1).double() / (ma | mb).sum(1).double()


def knn_accuracy(
    train: torch.Tensor, train_y: torch.Tensor, test: torch.Tensor, test_y: torch.Tensor, k: int = 20, t: float = 0.07
) -> float:
    """Weighted cosine k-NN (the DINO evaluation protocol: votes weighted by exp(sim / t))."""
    sim = F.normalize(test.float(), dim=1) @ F.normalize(train.float(), dim=1).T
    k = min(k, train.shape[0])
    top, idx = sim.topk(k, dim=1)
    votes = torch.zeros(test.shape[0], int(train_y.max()) + 1)
    votes.scatter_add_(1, train_y[idx], (top / t).exp())
    return (votes.argmax(1) == test_y).float().mean().item()


# ----------------------------------------------------------------------------- runner


def _cal_metrics(cal: Any) -> dict[str, Any]:
    """What a calibrated row records about its calibration: cost, fidelity on the calibration images, plan."""
    if cal is None:
        return {}
    return {
        "calibration_s": cal.seconds,
        "calibration_images": cal.images,
        "calibration_forwards": cal.forwards,
        "calibration_fidelity": cal.fidelity,
        "calibration_default_fidelity": cal.baseline_fidelity,
        "calibrated_schedule": cal.to_dict(),
    }


def _fit_metrics(plan: dict[str, Any]) -> dict[str, Any]:
    """A calibrating method's (dtome's) FLOPs fit on the calibration images: target, realised, threshold offset."""
    c = plan.get("calibration")
    if not c or c.get("flops_target") is None:
        return {}
    return {"flops_realised_calibration": c["flops_realised_calibration"], "threshold_offset": c["offset"]}


def _batches(x: torch.Tensor, bs: int) -> Iterator[torch.Tensor]:
    for i in range(0, x.shape[0], bs):
        yield x[i : i + bs]


class Runner:
    def __init__(self, model: BenchModel, data: BenchData, cfg: BenchConfig, store: ResultStore, run: str) -> None:
        self.m, self.data, self.cfg, self.store, self.run = model, data, cfg, store, run
        self.device = next(model.encoder.parameters()).device
        self.env = environment()
        self.adapter = find_adapter(model.encoder)
        self._ref: dict[str, Any] = {}
        self._cal: dict[tuple[str, float], Any] = {}  # (method, budget) -> CalibratedSchedule
        self._sample_flops: list[float] = []  # realised FLOPs fraction of each image of the last _encode

    # --- forward helpers
    @torch.no_grad()
    def _encode(self, x: torch.Tensor, dense: bool, desc: str = "") -> tuple[torch.Tensor, torch.Tensor | None]:
        feats, maps = [], []
        batches = list(_batches(x, self.cfg.batch_size))
        self._sample_flops = []
        for xb in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not desc):
            out = self.m.encoder(pixel_values=xb.to(self.device))
            if api.is_applied(self.m.encoder):
                self._sample_flops.extend(api.info(self.m.encoder).sample_flops or [])
            feats.append(out.pooler_output.float().cpu())
            if dense and self.m.head is not None:
                p = self.adapter.num_protected
                g = (xb.shape[-2] // self.adapter.patch[0], xb.shape[-1] // self.adapter.patch[1])
                maps.append(self.m.head(out.last_hidden_state[:, p:], g).float().cpu())
        return torch.cat(feats), (torch.cat(maps) if maps else None)

    def reference(self) -> dict[str, Any]:
        """Unreduced outputs, computed once."""
        if self._ref:
            return self._ref
        dense = "saliency" in self.cfg.tasks and self.m.head is not None
        feats, maps = self._encode(self.data.images, dense, "reference: images")
        self._ref = {"features": feats, "maps": maps}
        if "knn" in self.cfg.tasks and self.data.knn_train is not None and self.data.knn_test is not None:
            tr, _ = self._encode(self.data.knn_train[0], False, "reference: k-NN train")
            te, _ = self._encode(self.data.knn_test[0], False, "reference: k-NN test")
            self._ref["knn_train"] = tr
            self._ref["knn_full"] = knn_accuracy(tr, self.data.knn_train[1], te, self.data.knn_test[1], self.cfg.knn_k)
        return self._ref

    def _key(self, method: str, budget: float, task: str) -> str:
        c = self.cfg
        return config_key(
            {
                "model": self.m.name,
                "method": method,
                "budget": budget,
                "task": task,
                "seed": c.seed,
                "batch_size": c.batch_size,
                "repeats": c.repeats,
                "image_size": self.m.image_size,
                **c.extra,
                **({"calibration": c.calibration} if method.endswith(CAL) else {}),
            }
        )

    def _row(self, method: str, budget: float, task: str, schedule: str, flops: float, metrics: dict) -> dict:
        return {
            "key": self._key(method, budget, task),
            "run": self.run,
            "model": self.m.name,
            "method": method,
            "budget": budget,
            "task": task,
            "baseline": method in BASELINES,
            "schedule": schedule,
            "flops": flops,
            "metrics": metrics,
            "seed": self.cfg.seed,
            **self.env,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }

    def _flops_from_info(self) -> float:
        """Analytic FLOPs fraction realised by the last :meth:`_encode`, averaged over all its images (each at its
        own counts: dynamic methods differ per image; before 0.1.x only the last batch was averaged)."""
        f = self._sample_flops
        assert f, "the encoder host gives its dimensions"
        return sum(f) / len(f)

    # --- one method at one budget
    def measure(self, method: str, budget: float) -> list[dict]:
        todo = [t for t in self.cfg.tasks if not self.store.has(self._key(method, budget, t))]
        todo = [t for t in todo if t != "knn" or self.data.knn_test is not None]
        todo = [t for t in todo if t != "saliency" or self.m.head is not None]
        if not todo:
            return []
        ref = self.reference()
        enc = self.m.encoder
        base = base_name(method)
        extra = (
            {"calibration": self.data.calibration.to(self.device)} if hasattr(all_methods()[base], "calibrate") else {}
        )
        cal = self.calibrated(base, budget) if method.endswith(CAL) else None
        budget_kw: dict[str, Any] = {"schedule": cal} if cal is not None else {"flops": budget, **extra}
        budget_kw.update(apply_kwargs(method))  # METHOD+official: its parity mode
        torch.manual_seed(self.cfg.seed)
        rows = []
        with api.applied(enc, base, image_size=self.m.image_size, unmerge=True, **budget_kw):
            plan = api.explain(enc)["applied"]
            schedule = plan["schedule"]
            feats, maps = self._encode(self.data.images, "saliency" in todo)
            flops = self._flops_from_info()
            if "features" in todo:
                cos = F.cosine_similarity(feats, ref["features"], dim=-1)
                rows.append(
                    self._row(
                        method,
                        budget,
                        "features",
                        schedule,
                        flops,
                        {
                            "cosine_mean": cos.mean().item(),
                            "cosine_min": cos.min().item(),
                            **_cal_metrics(cal),
                            **_fit_metrics(plan),
                        },
                    )
                )
            if "saliency" in todo and maps is not None and ref["maps"] is not None:
                rows.append(
                    self._row(
                        method,
                        budget,
                        "saliency",
                        schedule,
                        flops,
                        {
                            "pearson": pearson(maps, ref["maps"]).mean().item(),
                            "iou20": top_iou(maps, ref["maps"]).mean().item(),
                        },
                    )
                )
            if "knn" in todo:
                te, _ = self._encode(self.data.knn_test[0], False)
                knn_flops = self._flops_from_info()  # its own images: a dynamic method realises other FLOPs there
                acc = knn_accuracy(ref["knn_train"], self.data.knn_train[1], te, self.data.knn_test[1], self.cfg.knn_k)
                full = ref["knn_full"]
                rows.append(
                    self._row(
                        method,
                        budget,
                        "knn",
                        schedule,
                        knn_flops,
                        {"accuracy": acc, "accuracy_full": full, "retained": acc / max(full, 1e-12)},
                    )
                )
            if "cost" in todo:
                rows.append(self._row(method, budget, "cost", schedule, flops, self._cost(flops)))
        for r in rows:
            self.store.append(r)
        return rows

    def calibrated(self, method: str, budget: float) -> Any:
        """The schedule calibrated for ``method`` at ``budget`` on the calibration images (one greedy pass serves
        every budget of the run; a budget the joint pass cannot reach is retried alone)."""
        from ..calibration import calibrate

        if (method, budget) not in self._cal:
            x = self.data.calibration.to(self.device)
            opts = dict(self.cfg.calibration)
            if all_methods()[method].kind == "prune":  # one pruning site: every site is tried whatever the merge search
                opts["search"] = "greedy"
            try:
                found = calibrate(self.m.encoder, method, flops=list(self.cfg.budgets), images=x, **opts)
                self._cal.update({(method, b): s for b, s in zip(self.cfg.budgets, found)})
            except TokenThinError:
                self._cal[(method, budget)] = calibrate(self.m.encoder, method, flops=budget, images=x, **opts)
        return self._cal[(method, budget)]

    @torch.no_grad()
    def _cost(self, flops: float) -> dict[str, Any]:
        """Time the reduced model against an unreduced forward of the same batch, alternating, same run."""
        enc = self.m.encoder
        rt = api.runtime_of(enc)
        xb = self.data.images[: self.cfg.batch_size].to(self.device)
        n = xb.shape[0]
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)

        def timed(fn: Callable[[], object]) -> float:
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            return time.perf_counter() - t0

        def full() -> None:
            rt.detach()  # the unreduced model, same weights, same process
            try:
                enc(pixel_values=xb)
            finally:
                rt.attach()

        def reduced() -> None:
            enc(pixel_values=xb)

        full()
        reduced()
        tf, tr = [], []
        for _ in range(self.cfg.repeats):
            tf.append(timed(full))
            tr.append(timed(reduced))
        t_full, t_red = statistics.median(tf), statistics.median(tr)
        rt.measure, rt.overhead_s = True, 0.0
        try:
            t_meas = timed(reduced)
        finally:
            rt.measure = False
        with peak_memory(self.device, exclude=(xb,)) as mem_red:
            reduced()
        with peak_memory(self.device, exclude=(xb,)) as mem_full:
            full()
        info = api.info(enc)
        return {
            "flops_fraction": flops,
            "tokens_out": sum(info.kept) / len(info.kept),
            "tokens_per_layer": info.tokens_per_layer,
            "img_per_s": n / t_red,
            "img_per_s_full": n / t_full,
            "time_ratio": t_red / t_full,
            "speedup": t_full / t_red,
            "predicted_speedup": 1.0 / flops,
            "peak_mem_mb": mem_red["mb"],
            "peak_mem_mb_full": mem_full["mb"],
            "overhead_share": rt.overhead_s / t_meas,
        }

    def run_all(self) -> list[dict]:
        combos = [(m, b) for b in self.cfg.budgets for m in self.cfg.methods]
        out = []
        self.skipped: list[str] = []
        for m, b in tqdm(combos, desc="bench", unit="config"):
            try:
                out.extend(self.measure(m, b))
            except TokenThinError as e:  # e.g. a budget this method cannot reach on this model: say so, go on
                self.skipped.append(f"{m} at {b}: {e}")
                tqdm.write(f"skipped {m} at {b:.2f} FLOPs: {e}")
        return out
