"""The one error family of fcconv.

Every error fcconv raises on bad input is an :class:`FcconvError`, itself a :class:`ValueError`, so
``except ValueError`` keeps working. Messages state what was expected, what was given and what to do.
"""

from __future__ import annotations

__all__ = ["FcconvError", "ModuleRunError", "NotEquivalentError"]


class FcconvError(ValueError):
    """Bad input to fcconv: wrong shapes, types or options. The message says how to fix it."""


class NotEquivalentError(FcconvError):
    """A module cannot become what was asked, or two modules are not the same function."""


class ModuleRunError(FcconvError):
    """A module given to fcconv failed when run on the inputs fcconv made for it.

    Attributes:
        role: which module failed (``"reference"``, ``"candidate"``, ...).
        input_shape: the shape of the input it was given.
        cause: the module's own error message.
    """

    def __init__(self, message: str, *, role: str, input_shape: tuple[int, ...], cause: str) -> None:
        super().__init__(message)
        self.role = role
        self.input_shape = input_shape
        self.cause = cause
