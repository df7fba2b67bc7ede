"""Exception types. Every message names the fix."""

from __future__ import annotations


class TokenThinError(Exception):
    """Base class of every error tokenthin raises on purpose."""


class UnknownMethodError(TokenThinError, KeyError):
    """The method name is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class UnsupportedModelError(TokenThinError, TypeError):
    """No adapter recognises the model."""


class BudgetError(TokenThinError, ValueError):
    """A budget (r, keep, flops) is missing, malformed or out of range for the token count."""


class SiteError(TokenThinError, ValueError):
    """The method cannot act at the requested site, or the model has no such site."""


class AlreadyAppliedError(TokenThinError, RuntimeError):
    """tokenthin is already applied to this model."""


class NotAppliedError(TokenThinError, RuntimeError):
    """remove() or info() on a model tokenthin is not applied to."""


class InputMismatchError(TokenThinError, ValueError):
    """Inputs have a dtype or device the model does not (or a shape the plan cannot serve)."""


class MissingDependencyError(TokenThinError, ImportError):
    """An optional dependency (or a registry package holding real weights) is not installed."""
