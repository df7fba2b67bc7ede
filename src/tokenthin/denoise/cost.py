"""Whether merging in a block call can pay for itself: "never slower than unreduced at any ratio".

A block-local method plans once per block call (tomesd: a cosine similarity of every source to every destination,
about ``3/8 N^2 C`` multiply-adds x 2 FLOPs) whatever ``r`` is, while the parts save in proportion to ``r``. At
tiny ratios the planning costs more than it saves (measured on an SD-1.5 64x64 level: ratio 0.02-0.1 ran
1.04-1.07x slower than unreduced). So the runtime skips a block call (merges nothing there, as at ``r == 0``;
``tokenthin.info(model).merged`` shows 0 for it) when the FLOPs its merged parts save are below ``MARGIN`` times
the planning FLOPs. Counted (FLOPs = 2 x multiply-adds, per sample, N tokens of width C, r merged away):

* ``attn``: q / k / v / out projections ``8 r C^2`` + attention ``4 C (N^2 - (N - r)^2)`` (scores and values);
* ``cross``: the query and output projections ``4 r C^2`` (the text length is not known when planning: not counted);
* ``mlp``: a 4x feed-forward ``16 r C^2``;
* planning: a method that reads ``keys`` (similarities) ``N^2 C / 2`` (a bipartite split's N/2 x N/2 scores, an
  upper bound for tomesd's N/4 destinations); one that reads nothing (``random``, ``pool``) 0.

* a soft plan (ToMA: ``tile`` x ``tile`` tiles, one greedy facility-location round per destination of a tile,
  ``tile^2 (N - r) / N`` rounds): the tile-local similarities ``N tile^2 C`` plus ``SOFT_ELEMENT`` per element of
  every round's (N, tile^2) gain update. Those rounds are float64 elementwise passes, far below the matmul rate; the
  constant is fitted to one-thread CPU measurements (2026-12-02: ToMA's plan took 141 / 10.6 / 9.5 ms per call at
  N 4096 C 320 batch 2, N 256 C 1152 batch 2 and N 1024 C 64 batch 1, ratio 0.25, i.e. 240-540 FLOP-equivalents
  per element at the ~80 GFLOP/s the similarity's matmul reaches). Without this term ToMA merged in the terrain
  UNet's 1024-token blocks of width 64, where its planning took 10-23% of the call and the call ran up to 1.18x
  slower.

``MARGIN = 2``: the planning's gathers, sorts and scatters are memory-bound and run at well below the matmul
rate. With it tomesd merges at ratios >= ~0.12 in SD-1.5's 64x64 blocks (N 4096, C 320) and >= ~0.08 at
N 1024, C 640, and skips below. The rule depends only on N, C, r and the parts, so an input is treated the same
in any batch.
"""

from __future__ import annotations

import math

MARGIN = 2.0
SOFT_ELEMENT = 384.0
ENABLED = True  # False: merge whatever the cost (tests on tiny models, whose every block costs less than a plan)


def saved_flops(n: int, r: int, c: int, parts: tuple[str, ...]) -> float:
    """FLOPs per sample the merged parts of one block call save (see the module docstring)."""
    total = 0.0
    if "attn" in parts:
        total += 8 * r * c * c + 4 * c * (n * n - (n - r) ** 2)
    if "cross" in parts:
        total += 4 * r * c * c
    if "mlp" in parts:
        total += 16 * r * c * c
    return total


def plan_flops(n: int, c: int, reads_keys: bool, r: int = 0, soft_tile: int = 0) -> float:
    """FLOPs per sample of planning one block call's merge (``soft_tile``: a soft plan's tile side, 0: none)."""
    if soft_tile:
        t2 = soft_tile * soft_tile
        rounds = math.ceil(t2 * (n - r) / n)
        return n * t2 * c + n * t2 * rounds * SOFT_ELEMENT
    return n * n * c / 2 if reads_keys else 0.0


def worth_merging(n: int, r: int, c: int, parts: tuple[str, ...], reads_keys: bool, soft_tile: int = 0) -> bool:
    """Whether merging ``r`` of ``n`` tokens of width ``c`` in a block saves more than it costs to plan."""
    if r <= 0:
        return False
    return not ENABLED or saved_flops(n, r, c, parts) >= MARGIN * plan_flops(n, c, reads_keys, r, soft_tile)
