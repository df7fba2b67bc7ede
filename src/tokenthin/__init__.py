"""tokenthin: training-free token merging and pruning for pretrained transformers."""

from .api import applied, apply, explain, hosts, info, is_applied, methods, remove, runtime_of, support
from .calibration import CalibratedSchedule, calibrate
from .errors import (
    AlreadyAppliedError,
    BudgetError,
    InputMismatchError,
    NotAppliedError,
    SiteError,
    TokenThinError,
    UnknownMethodError,
    UnsupportedModelError,
)
from .runtime import TokenInfo

__version__ = "0.1.0"

__all__ = [
    "AlreadyAppliedError",
    "BudgetError",
    "CalibratedSchedule",
    "InputMismatchError",
    "NotAppliedError",
    "SiteError",
    "TokenInfo",
    "TokenThinError",
    "UnknownMethodError",
    "UnsupportedModelError",
    "__version__",
    "applied",
    "apply",
    "calibrate",
    "explain",
    "hosts",
    "info",
    "is_applied",
    "methods",
    "remove",
    "runtime_of",
    "support",
]
