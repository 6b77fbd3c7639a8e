"""``fcconv bench [NAME]...``: run the benchmark scripts of the source tree and stream their output.

The benchmarks are the scripts in the repository's ``bench/`` folder (they print ratios measured side
by side in one run). They ship with the source, not with the wheel: the command looks for ``bench/``
beside the package's source tree, then in the current folder.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

import click

from fcconv.cli._app import fail

__all__ = ["command", "find_benchmarks"]


def _candidates() -> list[Path]:
    import fcconv

    package = Path(fcconv.__file__).resolve().parent  # <root>/src/fcconv
    folders = [package.parent.parent / "bench", Path.cwd() / "bench"]
    return list(dict.fromkeys(f.resolve() for f in folders))


def find_benchmarks() -> dict[str, Path]:
    """The benchmark scripts, ``{name: path}``, from the first ``bench/`` folder that has any.

    Raises:
        FcconvError: if no ``bench/`` folder with scripts is found (e.g. in an installed wheel).
    """
    for folder in _candidates():
        if folder.is_dir():
            scripts = {p.stem: p for p in sorted(folder.glob("*.py")) if not p.name.startswith("_")}
            if scripts:
                return scripts
    searched = " and ".join(repr(str(f)) for f in _candidates())
    fail(f"No benchmarks found (looked in {searched}). They ship with the source, not the wheel: run "
         "fcconv bench from a clone of the repository.")


def _select(scripts: dict[str, Path], names: tuple[str, ...]) -> list[Path]:
    chosen = []
    for name in names:
        key = Path(name).stem
        matches = [s for s in scripts if s == key] or [s for s in scripts if s.startswith(key)]
        if len(matches) != 1:
            what = "matches several benchmarks" if matches else "is not a benchmark"
            fail(f"{name!r} {what}; choose from {', '.join(scripts)} (fcconv bench --list).")
        chosen.append(scripts[matches[0]])
    return chosen or list(scripts.values())


def _run(script: Path, args: list[str]) -> int:
    """Run one script with this Python, echoing its output line by line as it comes."""
    command_line = [sys.executable, "-u", str(script), *args]
    click.echo(f"$ {' '.join(shlex.quote(a) for a in ['python', *command_line[2:]])}")
    with subprocess.Popen(command_line, cwd=script.parent.parent, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, bufsize=1) as process:
        try:
            for line in process.stdout or ():
                click.echo(line, nl=False)
            return process.wait()
        except KeyboardInterrupt:
            process.kill()
            raise


@click.command(
    "bench",
    epilog="""\b
Examples:
  fcconv bench --list
  fcconv bench --quick
  fcconv bench dense_vs_sliding
  fcconv bench conv_matrix --args "--repeat 50"

\b
Run from a clone of the repository: the benchmarks are not part of the wheel.""",
)
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--quick", is_flag=True, help="Pass --quick: fewer repeats, a smoke test.")
@click.option("--args", "extra", default="", metavar="'ARGS'", help="More arguments for the scripts.")
@click.option("--list", "list_only", is_flag=True, help="List the benchmarks and exit.")
def command(names: tuple[str, ...], quick: bool, extra: str, list_only: bool) -> None:
    """Run the benchmarks NAME... (default: all) and stream what they print.

    Each benchmark times the converted and the original computation side by side in one run and
    prints their ratio.
    """
    scripts = find_benchmarks()
    if list_only:
        for name, path in scripts.items():
            click.echo(f"{name:24} {path}")
        return
    args = (["--quick"] if quick else []) + shlex.split(extra)
    failed = []
    for script in _select(scripts, names):
        status = _run(script, args)
        if status != 0:
            failed.append(f"{script.name} (exit status {status})")
    if failed:
        fail(f"Benchmark failed: {', '.join(failed)}; its output is above.")
