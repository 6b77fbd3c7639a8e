"""The one error family of fcconv.

Every error fcconv raises on bad input is an :class:`FcconvError`, itself a :class:`ValueError`, so
``except ValueError`` keeps working. Messages state what was expected, what was given and what to do.
"""

from __future__ import annotations

__all__ = ["FcconvError", "NotEquivalentError"]


class FcconvError(ValueError):
    """Bad input to fcconv: wrong shapes, types or options. The message says how to fix it."""


class NotEquivalentError(FcconvError):
    """A module cannot become what was asked, or two modules are not the same function."""
