"""Batched greedy selectors vs per-token Python loops (not a test).

For N = 576 and N = 2880 tokens of dimension D = 1024, keeping 10 % (B = 1), times
``max_min_diversity``, ``k_center_greedy`` and ``coverage_greedy`` against straightforward
per-token loop versions defined below, checks that both pick the same tokens and prints a
table. Both versions first build the same N x N similarity matrix (one matmul, "similarity"
column); the selection itself is timed separately ("select" columns: the batched time is the
public function's total minus the similarity) and end to end.

    PYTHONPATH=src python benchmarks/bench_select.py [--device cpu] [--repeat 3]
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    from tokenthin.ops.coverage import coverage_greedy
    from tokenthin.ops.diversity import k_center_greedy, max_min_diversity
    from tokenthin.ops.similarity import normalize
except ImportError:  # running from a checkout without PYTHONPATH=src
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from tokenthin.ops.coverage import coverage_greedy
    from tokenthin.ops.diversity import k_center_greedy, max_min_diversity
    from tokenthin.ops.similarity import normalize


# --------------------------------------------------------------------------- loop versions
# One sample at a time; every selection step visits the tokens one by one in Python. They
# keep each token's running score (nearest-selected distance, coverage gain) so that the
# large sizes finish in seconds, and they build the float32 similarities the same way as
# the batched code, so the picks must agree exactly.


def _argmax_over(tokens, score) -> int:
    best, best_score = -1, -math.inf
    for j in tokens:
        s = score(j)
        if best < 0 or s > best_score:  # strict: lowest index wins ties
            best, best_score = j, s
    return best


def _farthest_first_loop(dist: torch.Tensor, elig: list[int], start: int, k: int) -> list[int]:
    nearest = dict.fromkeys(elig, math.inf)
    chosen = [start]
    while len(chosen) < k:
        row = dist[chosen[-1]].tolist()
        for j in elig:  # per-token update of the distance to the nearest selected token
            if row[j] < nearest[j]:
                nearest[j] = row[j]
        taken = set(chosen)
        chosen.append(_argmax_over([j for j in elig if j not in taken], nearest.__getitem__))
    return sorted(chosen)


def cosine_distance(x: torch.Tensor) -> torch.Tensor:
    xn = normalize(x)
    return 1.0 - xn @ xn.T


def coverage_matrix(x: torch.Tensor, cand: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    xn = normalize(x)
    logits = (xn @ xn.T) / temperature
    logits[:, ~cand] = -math.inf
    sim = torch.softmax(logits, dim=-1) / max(int(cand.sum()), 1)
    sim[~cand] = 0.0  # the references are the eligible tokens
    return sim.T.contiguous()  # columns[i]: how token i covers every reference


def loop_max_min(x: torch.Tensor, dist: torch.Tensor, cand: torch.Tensor, k: int) -> list[int]:
    elig = [j for j, ok in enumerate(cand.tolist()) if ok]
    elig_t = torch.tensor(elig)

    def isolation(j: int) -> float:  # nearest other eligible token
        column = dist[elig_t, j]
        column = column[elig_t != j]
        return float(column.min()) if column.numel() else math.inf

    return _farthest_first_loop(dist, elig, _argmax_over(elig, isolation), k)


def loop_k_center(x: torch.Tensor, dist: torch.Tensor, cand: torch.Tensor, k: int) -> list[int]:
    xn = normalize(x)
    elig = [j for j, ok in enumerate(cand.tolist()) if ok]
    mean = xn[elig].mean(dim=0)
    first = _argmax_over(elig, lambda i: float((xn[i] * mean).sum()))
    return _farthest_first_loop(dist, elig, first, k)


def loop_coverage(x: torch.Tensor, columns: torch.Tensor, cand: torch.Tensor, k: int) -> list[int]:
    elig = [j for j, ok in enumerate(cand.tolist()) if ok]
    covered = torch.zeros(columns.shape[0])
    chosen: list[int] = []
    while len(chosen) < k:
        taken = set(chosen)
        best = _argmax_over(
            [i for i in elig if i not in taken],
            lambda i, cov=covered: float((columns[i] - cov).clamp(min=0).sum()),
        )
        chosen.append(best)
        covered = torch.maximum(covered, columns[best])
    return sorted(chosen)


# --------------------------------------------------------------------------- harness


def _tokens(n: int, d: int, seed: int) -> torch.Tensor:
    """Clustered features (like image patches: a few dozen regions plus noise)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(64, d, generator=g)
    assign = torch.randint(0, 64, (n,), generator=g)
    return centers[assign] + 0.7 * torch.randn(n, d, generator=g)


def _time(fn, repeat: int, sync) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs of the batched version (median)")
    parser.add_argument("--sizes", default="576,2880")
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--keep", type=float, default=0.1)
    args = parser.parse_args()

    device = torch.device(args.device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} CPU threads, B=1, D={args.dim}")
    header = (
        f"{'N':>5} {'k':>4} {'selector':<18} {'similarity':>10} {'select batched':>14} {'select loop':>11} "
        f"{'select speedup':>14} {'end-to-end':>10} {'same picks':>10}"
    )
    print(header + "\n" + "-" * len(header))
    all_same = True
    for n in (int(s) for s in args.sizes.split(",")):
        k = round(args.keep * n)
        x_cpu = _tokens(n, args.dim, seed=n)
        cand_cpu = torch.ones(n, dtype=torch.bool)
        cand_cpu[0] = False  # a protected CLS-like token
        x, cand = x_cpu[None].to(device), cand_cpu[None].to(device)
        cases = [
            ("max_min_diversity", max_min_diversity, loop_max_min, lambda x=x_cpu: cosine_distance(x)),
            ("k_center_greedy", k_center_greedy, loop_k_center, lambda x=x_cpu: cosine_distance(x)),
            ("coverage_greedy", coverage_greedy, loop_coverage, lambda x=x_cpu, c=cand_cpu: coverage_matrix(x, c)),
        ]
        for name, batched, loop, prep in cases:
            batched(x, k, cand)  # warm-up
            t_batched, picks = _time(lambda b=batched, a=(x, k, cand): b(*a), args.repeat, sync)
            t_prep, matrix = _time(prep, args.repeat, lambda: None)
            t_loop, loop_picks = _time(lambda f=loop, a=(x_cpu, matrix, cand_cpu, k): f(*a), 1, lambda: None)
            sel = max(t_batched - t_prep, 1e-6)
            same = picks[0].cpu().tolist() == loop_picks
            all_same &= same
            print(
                f"{n:>5} {k:>4} {name:<18} {t_prep * 1e3:>8.1f}ms {sel * 1e3:>12.1f}ms {t_loop * 1e3:>9.1f}ms "
                f"{t_loop / sel:>13.0f}x {(t_prep + t_loop) / t_batched:>9.1f}x {'yes' if same else 'NO':>10}"
            )
    if not all_same:
        raise SystemExit("batched and loop selections differ")


if __name__ == "__main__":
    main()
