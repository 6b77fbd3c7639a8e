"""A batch norm after the global pooling (timm's mobilenetv4 head) converts, and a model fcconv cannot
convert raises an FcconvError naming the node, never a raw PyTorch error (issue 14, 13)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fcconv.models.head as head_module
from fcconv import assert_equivalent, convolutionalize
from fcconv.errors import FcconvError, NotEquivalentError

DTYPE = torch.float64


def _generic(bn: nn.modules.batchnorm._BatchNorm) -> nn.modules.batchnorm._BatchNorm:
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 2)
        bn.bias.uniform_(-1, 1)
    return bn


class PooledNormHead(nn.Module):
    """Like timm's MobileNetV3/V4 ``forward_head``: pool, 1x1 conv_head, a batch norm (as
    ``BatchNormAct2d`` traces: ``F.batch_norm`` on ``(N, C, 1, 1)``), act, flatten, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, stride=2), nn.ReLU())
        self.conv_head = nn.Conv2d(6, 8, 1, bias=False)
        self.norm = _generic(nn.BatchNorm2d(8))
        self.classifier = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_head(F.adaptive_avg_pool2d(self.features(x), 1))
        x = F.batch_norm(x, self.norm.running_mean, self.norm.running_var, self.norm.weight, self.norm.bias,
                         False, 0.1, self.norm.eps)
        return self.classifier(F.relu(x).flatten(1))


def test_a_batch_norm_on_the_pooled_map_converts() -> None:
    torch.manual_seed(0)
    model = PooledNormHead().to(DTYPE).eval()
    fcn = convolutionalize(model, (3, 15, 15))
    assert_equivalent(model, fcn, inputs=torch.randn(2, 3, 15, 15, dtype=DTYPE))
    assert not any(isinstance(m, nn.BatchNorm1d) for m in fcn.modules())
    with torch.no_grad():
        out = fcn(torch.randn(1, 3, 31, 23, dtype=DTYPE))
    assert tuple(out.shape[2:]) == fcn.grid_shape((31, 23)) != (1, 1)


class BrokenNorm(nn.Module):
    """A BatchNorm1d applied to a 4-d map: PyTorch refuses it when the model runs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm1d(4)
        self.fc = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x)).flatten(1))


def test_a_model_that_fails_on_its_input_is_named_by_node() -> None:
    with pytest.raises(NotEquivalentError, match=r"^BrokenNorm on its training input \(3, 8, 8\) fails "
                                                 r"at node 'bn' \(module 'bn': BatchNorm1d.*ValueError: "
                                                 r"expected 2D or 3D input \(got 4D input\)"):
        convolutionalize(BrokenNorm().eval(), (3, 8, 8))


def test_a_raw_error_while_converting_the_head_is_named_by_node(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: object, **kwargs: object) -> nn.Module:
        raise RuntimeError("boom")

    monkeypatch.setattr(head_module, "linear_to_conv", broken)
    with pytest.raises(FcconvError, match=r"^Cannot convolutionalize node '_2' \(module '2': Linear.*\): "
                                          r"RuntimeError: boom\. This is a bug in fcconv"):
        convolutionalize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)).eval(),
                         (3, 8, 8))


# timm's mobilenetv4: every member has this head (global_pool, conv_head, BatchNormAct2d, flatten,
# classifier); its bodies differ: plain convs, anti-aliased convs, hybrid (attention).
MOBILENETV4 = ["mobilenetv4_conv_small_035", "mobilenetv4_hybrid_medium_075"]  # aa_medium: 10 min


@pytest.mark.slow
@pytest.mark.parametrize("name", MOBILENETV4)
def test_timm_mobilenetv4_converts(name: str) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).to(DTYPE).eval()
    fcn = convolutionalize(model, (3, 224, 224))
    assert_equivalent(model, fcn, inputs=torch.randn(1, 3, 224, 224, dtype=DTYPE))
    with torch.no_grad():
        out = fcn(torch.randn(1, 3, 288, 320, dtype=DTYPE))
    assert tuple(out.shape) == (1, 1000, *fcn.grid_shape((288, 320))) and out.shape[2:] != (1, 1)
