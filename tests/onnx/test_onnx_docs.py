"""The python blocks of docs/deploy.md run as written, in order, in a fresh folder."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("torchvision")

DOC = Path(__file__).parent.parent.parent / "docs" / "deploy.md"


@pytest.mark.slow
def test_deploy_md_python_blocks_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    for block in blocks:
        exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - the docs are ours
    assert (tmp_path / "resnet18-fcn.onnx").is_file() and (tmp_path / "resnet18-conv-only.onnx").is_file()
