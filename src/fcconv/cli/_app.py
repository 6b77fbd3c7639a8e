"""The machinery every command shares: the lazy command group, the one error path, option types.

* :class:`LazyGroup` lists commands from a registry of module names and imports a command's module
  only when that command runs, so ``fcconv --help`` stays fast and a missing optional dependency
  (or a broken module) breaks only its own command.
* :func:`run_with_errors` is the one error path: an :class:`~fcconv.errors.FcconvError`, an
  ``OSError`` or any other exception a command lets through prints one line ``Error: <message>``
  to stderr and exits 1; click's usage errors exit 2; the full traceback only with
  ``FCCONV_DEBUG=1``.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import click

from fcconv._io import check_output_path
from fcconv._shapes import check_input_shape
from fcconv.errors import FcconvError

__all__ = [
    "DEBUG_ENV",
    "CommandError",
    "InputShape",
    "LazyGroup",
    "NumberList",
    "OutputPath",
    "debug_enabled",
    "fail",
    "for_the_command_line",
    "one_line",
    "run_with_errors",
    "step",
]

DEBUG_ENV = "FCCONV_DEBUG"
_DEBUG_HINT = f"set {DEBUG_ENV}=1 for the traceback"


def debug_enabled() -> bool:
    """True when ``FCCONV_DEBUG`` asks for full tracebacks (any value but empty, 0, false, no)."""
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def one_line(message: object) -> str:
    """``message`` on one line: newlines and runs of spaces become single spaces."""
    return " ".join(str(message).split())


class CommandError(click.ClickException):
    """A failed command: click prints ``Error: <message>`` on stderr and exits 1."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(one_line(message))


# Library messages advise Python arguments the command line does not have. Exact phrases first,
# then every clause (between ". " + capital and "; ") that still names one is replaced by the
# command line's way.
_CLI_PHRASES = (
    ("after output_map, ", ""),
    ("parameter_rounding=True", "--parameter-rounding"),
    (", or pass the module in leaf_modules if it lies in the feature extractor", ""),
    (", or pass its module in leaf_modules if it already is", ""),
)
_CLI_WAYS = {
    "output_map": "the command line compares both outputs flattened, in their own order: give --input "
                  "a shape at which both give the same values (for a file from fcconv convert, the "
                  "training size it records, the default); relating other layouts needs the Python API, "
                  "fcconv.compare",
    "input_map": "on the command line both models get inputs of shape (N, *--input): give --input the "
                 "per-sample shape both accept",
    "example_inputs": "on the command line --input is the per-sample shape, without the batch size",
    "leaf_modules": "the command line cannot keep submodules whole (leaf modules): make that forward "
                    "free of data-dependent control flow and of fixed sizes, or convert the model in "
                    "Python with fcconv.convolutionalize and its leaf_modules argument",
}
# Arguments the command line has as options: layout='HWC' -> --layout HWC, plane={'T': 0} -> --plane T=0.
_CLI_OPTIONS = (
    (re.compile(r"\blayout='(\w+)'"), r"--layout \1"),
    (re.compile(r"\bplane=\{([^}]*)\}"), lambda m: "--plane " + ",".join(
        "=".join(p.strip().strip("'\"") for p in pair.split(":")) for pair in m.group(1).split(","))),
    (re.compile(r"\bplane=(\w+)"), r"--plane \1"),
    (re.compile(r"\b(Drop|drop) (layout|plane)\b"), r"\1 --\2"),
    (re.compile(r"\bplane picks\b"), "--plane picks"),
    (re.compile(r"\bPass level=(\d+)"), r"Pass --level \1"),
    (re.compile(r"\bPass level between\b"), "Pass --level between"),
    (re.compile(r"\bpass level= one of them\b", re.IGNORECASE), "pass --level one of them"),
)
_PYTHON_ONLY = re.compile(r"\b(" + "|".join(_CLI_WAYS) + r")\b")
_CLAUSE = re.compile(r"(?<=[.;])\s+(?=[A-Z(])|(?<=;)\s+")


def for_the_command_line(message: str) -> str:
    """``message`` with advice about Python-only arguments (``output_map=...``) made the CLI's."""
    for python, cli in _CLI_PHRASES:
        message = message.replace(python, cli)
    for pattern, option in _CLI_OPTIONS:
        message = pattern.sub(option, message)
    if not _PYTHON_ONLY.search(message):
        return message
    clauses = _CLAUSE.split(message)
    for i, clause in enumerate(clauses):
        found = _PYTHON_ONLY.search(clause)
        if found:
            way = _CLI_WAYS[found.group(1)]
            end = clause.rstrip()[-1] if clause.rstrip()[-1] in ".;" else ""
            sentence = i == 0 or clauses[i - 1].endswith(".")
            clauses[i] = (way[0].upper() + way[1:] if sentence else way) + (end or ".")
    return " ".join(clauses)


def _describe(error: BaseException) -> str:
    """The one-line message for an exception a command let through."""
    if isinstance(error, FcconvError):
        return for_the_command_line(one_line(error))
    if isinstance(error, OSError):
        # "[Errno 13] Permission denied: 'x'" -> "Permission denied: 'x'", with the file names.
        parts = [error.strerror or one_line(error)]
        names = [n for n in (error.filename, error.filename2) if n is not None]
        if names:
            parts.append(": " + " -> ".join(repr(os.fsdecode(n)) for n in names))
        return "".join(parts) + "."
    if isinstance(error, MemoryError):
        return f"Out of memory. Use a smaller --input or model ({_DEBUG_HINT})."
    text = one_line(error) or "(no message)"
    return f"unexpected {type(error).__name__}: {text} ({_DEBUG_HINT}; please report it if it is a bug)"


def run_with_errors(callback: Callable[[], Any]) -> Any:
    """Run ``callback``, turning every error but click's own into one line and exit status 1.

    Click's exceptions (usage errors, exit 2; ``ctx.exit``; ``Abort``) pass through unchanged.
    With ``FCCONV_DEBUG=1`` the original exception propagates, with its traceback.
    """
    try:
        return callback()
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except KeyboardInterrupt:
        raise click.Abort() from None
    except Exception as error:  # noqa: BLE001 - the one error path of the command line
        if debug_enabled():
            raise
        raise CommandError(_describe(error)) from None


def fail(message: str) -> NoReturn:
    """Stop the command with ``Error: <message>`` and exit status 1."""
    raise CommandError(message)


class LazyGroup(click.Group):
    """A click group whose commands live in modules imported only when they run.

    Args:
        lazy_commands: ``{name: (module, short_help)}``; the module defines a click command named
            ``command``. The short help is shown by ``--help`` without importing the module.
    """

    def __init__(self, *args: Any, lazy_commands: dict[str, tuple[str, str]] | None = None,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy_commands = dict(lazy_commands or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*super().list_commands(ctx), *self.lazy_commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands or cmd_name not in self.lazy_commands:
            return super().get_command(ctx, cmd_name)
        module_name, short_help = self.lazy_commands[cmd_name]
        try:
            module = importlib.import_module(module_name)
            command = module.command
            if not isinstance(command, click.Command):
                raise TypeError(f"{module_name}.command is a {type(command).__name__}, not a click command")
        except Exception as error:  # noqa: BLE001 - a broken command must not break the others
            if debug_enabled():
                raise
            command = _unavailable(cmd_name, short_help, error)
        self.commands[cmd_name] = command
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = []
        for name in self.list_commands(ctx):
            if name in self.lazy_commands and name not in self.commands:
                rows.append((name, self.lazy_commands[name][1]))
            else:
                command = self.get_command(ctx, name)
                if command is not None and not command.hidden:
                    rows.append((name, command.get_short_help_str(formatter.width)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)

    def invoke(self, ctx: click.Context) -> Any:
        return run_with_errors(lambda: super(LazyGroup, self).invoke(ctx))


def _unavailable(name: str, short_help: str, error: BaseException) -> click.Command:
    """A stand-in for a command whose module cannot be imported: it explains why and exits 1."""
    if isinstance(error, ModuleNotFoundError) and error.name and not error.name.startswith("fcconv"):
        fix = f"install it, e.g. pip install 'fcconv[cli,models]' (missing module {error.name!r})"
    else:
        fix = f"its module failed to import: {type(error).__name__}: {one_line(error)}"

    @click.command(name=name, short_help=f"{short_help} [unavailable]", add_help_option=False,
                   context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def unavailable() -> None:
        fail(f"The '{name}' command is not available: {fix}.")

    return unavailable


# --------------------------------------------------------------------------------------------
# Option types


_INTEGER = re.compile(r"[+-]?[0-9]+")


class InputShape(click.ParamType):
    """A per-sample shape ``C,H,W`` (also ``CxHxW``, ``(C, H, W)``); rank 2 to 4, positive."""

    name = "C,H,W"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        text = str(value).strip().strip("()[]").strip()
        # One size between every two separators: "512x7x7x", "3,,224" and ",3,224" are refused.
        parts = re.split(r"\s*[,x×*]\s*|\s+", text)
        if not all(_INTEGER.fullmatch(p) for p in parts):
            empty = " (an empty size: a separator at an end or two in a row)" if "" in parts and text else ""
            self.fail(
                f"expected a per-sample shape C,H,W of 2 to 4 positive integers such as 3,224,224 "
                f"or 3x224x224 (no batch size); got {value!r}{empty}.", param, ctx,
            )
        shape = tuple(int(p) for p in parts)
        try:  # rank and sizes: the library's one check, so the CLI accepts what the API accepts
            return check_input_shape(shape, what="--input")
        except FcconvError as error:
            self.fail(f"{error} On the command line: e.g. 3,224,224 or 3x224x224.", param, ctx)


class NumberList(click.ParamType):
    """A comma-separated list of floats, e.g. ``0.485,0.456,0.406``."""

    name = "X,Y,..."

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> tuple[float, ...]:
        if isinstance(value, tuple):
            return value
        try:
            numbers = tuple(float(p) for p in str(value).replace(" ", "").split(",") if p)
        except ValueError:
            numbers = ()
        if not numbers:
            self.fail(f"expected comma-separated numbers such as 0.5,0.5,0.5; got {value!r}.", param, ctx)
        return numbers


class OutputPath(click.Path):
    """An output file path, checked before any work by :func:`fcconv._io.check_output_path`."""

    def __init__(self, *, what: str = "the output", suffixes: tuple[str, ...] | None = None) -> None:
        super().__init__(dir_okay=False, writable=False, path_type=Path)
        self.what, self.suffixes = what, suffixes

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path:
        path = Path(os.fsdecode(super().convert(value, param, ctx)))
        try:
            return check_output_path(path, what=self.what, suffixes=self.suffixes)
        except FcconvError as error:
            self.fail(str(error), param, ctx)


def _stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


@contextmanager
def step(message: str, *, quiet: bool = False) -> Iterator[None]:
    """Print ``message ...`` to stderr, run the block, then ``done (1.2 s)``: progress on long work.

    Printed only when stderr is a terminal, so that piped or captured output holds just the results
    and, on failure, the one error line.
    """
    if quiet or not _stderr_is_terminal():
        yield
        return
    click.echo(f"{message} ...", err=True, nl=False)
    start = time.perf_counter()
    try:
        yield
    except BaseException:
        click.echo(" failed", err=True)
        raise
    click.echo(f" done ({time.perf_counter() - start:.1f} s)", err=True)
