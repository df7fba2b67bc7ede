"""Joint calibration of the input size and the merge schedule (``resize-tome``): the candidates
:func:`tokenthin.calibrate` scores on the calibration images, as plain schedules (no model here).

For a FLOPs target ``t``: the image as given and every smaller size the ``downsample`` baseline offers that costs at
least ``t - 0.01`` unreduced, each with ToMe's merge schedule for ``t`` at that size (the FLOPs solver's default rule,
``smooth``: :func:`tokenthin.solver.solve`), and the largest smaller size that meets ``t`` with no merging at all (the
``downsample`` baseline itself). ``resize-tome``'s own ``flops=`` solve picks one of these by a fixed rule (the
largest size whose schedule keeps ``min_keep`` of its patches); calibration picks the most faithful one instead.
"""

from __future__ import annotations

from collections.abc import Callable

from .. import solver
from ..budget import Schedule
from ..errors import BudgetError


def joint_candidates(
    target: float,
    n_patches: int,
    num_layers: int,
    input_patches: Callable[[float], int],
    flops_of: Callable[[Schedule], float],
    rule: str = solver.DEFAULT_RULE,
) -> list[Schedule]:
    """The (input size x merge schedule) candidates for ``target``, largest input first; each a site ``layers``
    schedule with ``input_keep`` (None: the image as given)."""
    L = num_layers

    def cost(f: float | None, rs: tuple[int, ...]) -> float:
        return flops_of(Schedule("layers", L, r=rs, input_keep=f))

    found = solver.resized_candidates(target, rule, n_patches, L - 1, input_patches, cost)
    if not found:
        raise BudgetError(
            f"flops={target} is unreachable by resizing and merging on this input ({n_patches} patches); give a "
            "larger target"
        )
    return [Schedule("layers", L, r=rs, input_keep=f) for f, rs, _ in found]
