"""Models as the zoo writes them: Linear subclasses, sizes that must be multiples of the stride,
modules kept whole because they trace badly, compiled and scripted modules (issue 9)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fcconv import assert_equivalent, convolutionalize
from fcconv.errors import FcconvError, NotEquivalentError
from fcconv.models import FullyConvolutional

DTYPE = torch.float64


def check_converts(model: nn.Module, size: int, larger: tuple[int, int], **kwargs: object
                   ) -> FullyConvolutional:
    """Converts at ``size``, equals the model there (float64, certified) and maps ``larger``."""
    model = model.to(DTYPE).eval()
    fcn = convolutionalize(model, (3, size, size), **kwargs)  # type: ignore[arg-type]
    assert_equivalent(model, fcn, inputs=torch.randn(2, 3, size, size, dtype=DTYPE))
    with torch.no_grad():
        out = fcn(torch.randn(1, 3, *larger, dtype=DTYPE))
    assert tuple(out.shape[2:]) == fcn.grid_shape(larger)
    assert fcn.grid_shape(larger) != (1, 1)
    return fcn


class MyLinear(nn.Linear):
    """Like ``timm.layers.Linear``: a subclass whose forward calls ``F.linear``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class SubclassHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.fc = MyLinear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.adaptive_avg_pool2d(F.relu(self.conv(x)), 1).flatten(1))


def test_linear_subclass_head_becomes_a_conv() -> None:
    torch.manual_seed(0)
    fcn = check_converts(SubclassHead(), 15, (31, 23))
    assert not any(isinstance(m, nn.Linear) for m in fcn.modules())
    assert fcn.stride == (2, 2)


class TwoStrides(nn.Module):
    """Branches at strides 2 and 4 added after an upsampling: runs only at sizes 16 + 4k."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = nn.Conv2d(3, 4, 3, stride=4, padding=1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x) + F.interpolate(self.b(x), scale_factor=2.0)
        return self.fc(y.mean((2, 3)))


def test_model_running_only_at_some_sizes_states_them() -> None:
    torch.manual_seed(0)
    fcn = check_converts(TwoStrides(), 16, (32, 24))
    assert fcn.size_modulus == (4, 4) and fcn.stride == (2, 2)
    assert fcn.accepts((20, 24)) and not fcn.accepts((17, 16))
    assert fcn.accepted_sizes() == "H = 4k >= 16, W = 4k >= 16"
    assert "accepted sizes: H = 4k >= 16, W = 4k >= 16" in repr(fcn)
    with pytest.raises(FcconvError, match=r"^This model accepts spatial sizes H = 4k >= 16, W = 4k "
                                          r">= 16; got \(17, 16\)\..*\(16, 16\) or \(20, 16\)"):
        fcn(torch.randn(1, 3, 17, 16, dtype=DTYPE))
    with pytest.raises(FcconvError, match=r"^This model accepts"):
        fcn.grid_shape((18, 16))
    assert fcn.geometry()["size_modulus"] == (4, 4)


class SizeBranch(nn.Module):
    """Control flow on the input size, like timm's ConvMlp: fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] < 3:
            x = F.pad(x, (1, 1, 1, 1))
        return self.conv(x)


class WithSizeBranch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2)
        self.block = SizeBranch()
        self.fc = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.block(self.stem(x)).amax((2, 3)))


def test_known_leaf_modules_are_kept_whole_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    from fcconv.models import tracing

    torch.manual_seed(0)
    with pytest.raises(NotEquivalentError,
                       match=r"^Cannot trace WithSizeBranch .*leaf_modules=\[SizeBranch\]"):
        convolutionalize(WithSizeBranch().eval(), (3, 15, 15))
    monkeypatch.setattr(tracing, "KNOWN_LEAVES", {f"{__name__}.SizeBranch"})
    fcn = check_converts(WithSizeBranch(), 15, (27, 21))
    assert fcn.stride == (2, 2)


def test_compiled_module_converts_through_orig_mod() -> None:
    torch.manual_seed(0)
    model = SubclassHead().to(DTYPE).eval()
    compiled = torch.compile(model)
    fcn = convolutionalize(compiled, (3, 15, 15))
    assert_equivalent(model, fcn, inputs=torch.randn(2, 3, 15, 15, dtype=DTYPE))


def test_scripted_module_gets_a_message_that_fits() -> None:
    scripted = torch.jit.script(SubclassHead().eval())
    with pytest.raises(NotEquivalentError, match=r"^Cannot convolutionalize a TorchScript module "
                                                 r"\(RecursiveScriptModule\).*before torch.jit.script"):
        convolutionalize(scripted, (3, 15, 15))


class TfSame(nn.Module):
    """TensorFlow "same" padding computed from the input size (timm's Conv2dSame, MaxPool2dSame)."""

    def __init__(self) -> None:
        super().__init__()
        conv_same = pytest.importorskip("timm.layers.conv2d_same")
        pool_same = pytest.importorskip("timm.layers.pool2d_same")
        self.conv = conv_same.Conv2dSame(3, 4, 3, stride=2)
        self.pool = pool_same.MaxPool2dSame(3, stride=2)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.pool(F.relu(self.conv(x))).mean((2, 3)))


def test_tf_same_padding_has_its_closed_form_geometry() -> None:
    torch.manual_seed(0)
    fcn = check_converts(TfSame(), 16, (29, 23))
    assert fcn.stride == (4, 4) and fcn.size_modulus == (1, 1) and not fcn.exact_sliding_window
    for size in (16, 17, 19, 20, 21, 33):  # ceil(ceil(S / 2) / 2) - 4 + 1 cells
        with torch.no_grad():
            out = fcn(torch.randn(1, 3, size, 16, dtype=DTYPE))
        assert out.shape[2] == fcn.grid_shape((size, 16))[0] == -(-size // 4) - 3
