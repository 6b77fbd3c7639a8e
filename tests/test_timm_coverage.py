"""scripts/timm_coverage.py: one model per timm family, converted, certified, written as a table."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parents[1] / "scripts" / "timm_coverage.py"


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1] / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env,
                          timeout=900)


@pytest.mark.slow
def test_coverage_table_of_three_families(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    out = tmp_path / "coverage.md"
    result = _run("--families", "resnet,mobilenetv3,mlp_mixer", "--out", str(out))
    assert result.returncode == 0, result.stderr[-2000:]
    page = out.read_text()
    cnn, apart = page.split("## Transformer and token families")
    assert re.search(r"\*\*[0-2] of 2 CNN families convert \(\d+%\)\.\*\*", cnn)
    # resnet's smallest classifier converts, is certified in float64, and its grid holds at 240x208.
    assert re.search(r"\| resnet \| `resnet10t` \| 5\.4M \| 176x176 \| converted \| \d+ \| float64 max rel "
                     r"[0-9.e-]+; map 3x2 at 240x208, stride \(32, 32\); exact_sliding_window False \|", cnn)
    assert re.search(r"\| mobilenetv3 \| `mobilenetv3_small_050` \| ", cnn)
    # the family's other head layouts get a row each: MobileNetV4's BatchNormAct2d after the conv_head
    assert re.search(r"\| mobilenetv3 \| `mobilenetv4_conv_small_035` \| [^\n]* \| converted \| [^\n]*"
                     r"\| [^\n]*BatchNormAct2d[^\n]* \|", cnn)
    assert "| mlp_mixer | `gmlp_ti16_224` | patch tokens (timm.layers.PatchEmbed) |" in apart
    assert "partial" not in page


def test_coverage_refuses_an_unknown_family(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    result = _run("--families", "resnet,no_such_family", "--out", str(tmp_path / "x.md"))
    assert result.returncode == 2
    assert "unknown timm families ['no_such_family']" in result.stderr
    assert not (tmp_path / "x.md").exists()
