"""The examples of README.md and docs/*.md run as written.

Every fenced ```python block is executed; the blocks of one file run in order in one namespace, in
a temporary folder (so files they write land there). A block whose lines start with ``>>>`` is a
doctest: its printed output is checked too (``...`` stands for any text). A block tagged
```python no-run is only shown, never run: prefer making it run. A block is slow (whole torchvision
models, VGG's 100-million-weight fc6) when its text matches ``SLOW``; it and every later block of
its file are marked ``slow`` (``make test-fast`` skips them).

The ``fcconv ...`` commands of README.md's ```sh blocks run too, in order, through the real entry
point (slow: they build torchvision models), except ``fcconv bench`` (``make bench`` runs it).
"""

from __future__ import annotations

import doctest
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SLOW = re.compile(r"torchvision\.models|Linear\(25088")
_FENCE = re.compile(r"^```(\w*)([^\n]*)\n(.*?)^```", re.S | re.M)


@dataclass(frozen=True)
class Block:
    path: Path
    index: int
    line: int
    language: str
    tags: tuple[str, ...]
    code: str

    @property
    def doctest(self) -> bool:
        return self.code.lstrip().startswith(">>>")

    @property
    def name(self) -> str:
        where = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{where}:{self.line}"


def blocks(path: Path, language: str) -> list[Block]:
    text = path.read_text(encoding="utf-8")
    found = []
    for match in _FENCE.finditer(text):
        if match.group(1) == language:
            line = text.count("\n", 0, match.start()) + 1
            found.append(Block(path, len(found), line, language, tuple(match.group(2).split()),
                               match.group(3)))
    return found


def _cases() -> list[Any]:
    cases = []
    for path in DOCS:
        slow = False
        for block in blocks(path, "python"):
            slow = slow or bool(SLOW.search(block.code))
            marks = [pytest.mark.slow] if slow else []
            if "no-run" in block.tags:
                marks.append(pytest.mark.skip(reason="tagged no-run"))
            cases.append(pytest.param(block, marks=marks, id=block.name))
    return cases


# Per docs file: how many blocks ran, their namespace and their working folder (files that one block
# writes are read by the next, as a reader running the page top to bottom would).
_namespaces: dict[Path, tuple[int, dict[str, Any], Path]] = {}


def _run(block: Block, namespace: dict[str, Any]) -> None:
    if not block.doctest:
        exec(compile(block.code, block.name, "exec"), namespace)  # noqa: S102 - the docs' own examples
        return
    parser = doctest.DocTestParser()
    test = parser.get_doctest(block.code, namespace, block.name, str(block.path), block.line)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    runner.run(test, clear_globs=False)
    failures, _ = runner.summarize(verbose=False)
    assert failures == 0, f"{block.name}: the doctest's output differs (see the report above)"


@pytest.mark.parametrize("block", _cases())
def test_python_block_runs_as_written(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    # The blocks before this one, in a namespace and folder kept from the previous test of the same file.
    done, namespace, folder = _namespaces.get(block.path, (0, {}, tmp_path))
    if done > block.index:
        done, namespace, folder = 0, {}, tmp_path
    monkeypatch.chdir(folder)
    for earlier in blocks(block.path, "python")[done:block.index]:
        if "no-run" not in earlier.tags:
            _run(earlier, namespace)
    _namespaces.pop(block.path, None)
    _run(block, namespace)
    _namespaces[block.path] = (block.index + 1, namespace, folder)


def _readme_commands() -> list[list[str]]:
    commands = []
    for block in blocks(ROOT / "README.md", "sh"):
        for line in block.code.replace("\\\n", " ").splitlines():  # a trailing backslash continues
            words = shlex.split(line, comments=True)
            if words[:1] == ["fcconv"] and words[1:2] != ["bench"]:
                commands.append(words[1:])
    return commands


def test_readme_has_commands() -> None:
    assert len(_readme_commands()) >= 5


@pytest.mark.slow
def test_readme_commands_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from fcconv.cli import app

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("FCCONV_DEBUG", raising=False)
    for args in _readme_commands():
        result = CliRunner().invoke(app, args, prog_name="fcconv")
        assert result.exit_code == 0, (shlex.join(["fcconv", *args]), result.output, result.exception)


def test_a_doctest_block_checks_its_output(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("```python\n>>> 1 + 1\n3\n```\n\n```python no-run\nundefined_name\n```\n",
                    encoding="utf-8")
    wrong, shown = blocks(page, "python")
    assert wrong.doctest and shown.tags == ("no-run",)
    with pytest.raises(AssertionError, match="the doctest's output differs"):
        _run(wrong, {})
