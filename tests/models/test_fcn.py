"""Tests for fcconv.models: convolutionalize, FullyConvolutional and sliding_window on small models.

The torchvision zoo is in test_torchvision_models.py; the head rewrite in test_head.py, the
sliding window in test_sliding.py. Every comparison runs in float64, where the
converted model and the reference differ only by summation order (~1e-16 relative).
"""

from __future__ import annotations

import copy
import io
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from small_nets import DTYPE, TOL, LeNet, dense_and_reference, lenet, state_of
from torch import nn

from fcconv.errors import FcconvError, NotEquivalentError
from fcconv.models import (
    FullyConvolutional,
    UnfoldConv2d,
    convolutionalize,
)
from fcconv.models.modules import _unfold_matmul

# ----------------------------------------------------------------------------------------------
# LeNet: structure, outputs, exactness against the sliding window


def test_lenet_structure_and_geometry() -> None:
    fcn = convolutionalize(lenet(), (3, 32, 32), head_impl="conv")
    gm = fcn.graph_module
    assert not any(isinstance(m, nn.Linear) for m in gm.modules())
    assert isinstance(gm.fc1, nn.Conv2d) and gm.fc1.kernel_size == (5, 5)
    assert isinstance(gm.fc2, nn.Conv2d) and gm.fc2.kernel_size == (1, 1)
    assert isinstance(gm.bn, nn.BatchNorm2d)
    assert "view" not in gm.code and "size" not in gm.code
    assert fcn.stride == (4, 4) and fcn.window == (32, 32) and fcn.min_size == (32, 32)
    assert fcn.exact_sliding_window
    assert fcn.num_classes == 10
    assert fcn.grid_shape((32, 32)) == (1, 1)
    assert fcn.grid_shape((45, 33)) == (4, 1)
    assert fcn.window_of((1, 2)) == (4, 8, 36, 40)


@pytest.mark.parametrize("head", ["conv", "matmul", "auto"])
@pytest.mark.parametrize("size", [(32, 32), (44, 32), (45, 33), (57, 71), (36, 35), (64, 40)])
def test_lenet_dense_equals_sliding_window(head: str, size: tuple[int, int]) -> None:
    model = lenet()
    fcn = convolutionalize(model, (3, 32, 32), head_impl=head)
    x = torch.randn(2, 3, *size, dtype=DTYPE)
    dense, reference = dense_and_reference(model, fcn, x)
    assert dense.shape[2:] == fcn.grid_shape(size)
    grid = reference.shape[2:]
    # The dense grid has the sliding grid's cells, and one more per dim where the last window
    # would pass the border by pixels that the network discards (floor in its poolings).
    assert all(d - r in (0, 1) for d, r in zip(dense.shape[2:], grid))
    if all((s - w) % t == 0 for s, w, t in zip(size, fcn.window, fcn.stride)):
        assert dense.shape == reference.shape
    torch.testing.assert_close(dense[..., : grid[0], : grid[1]], reference, **TOL)


@settings(max_examples=12, deadline=None)
@given(h=st.integers(32, 61), w=st.integers(32, 61), n=st.integers(1, 2))
def test_lenet_any_size_matches_sliding_window(h: int, w: int, n: int) -> None:
    model = lenet()
    fcn = convolutionalize(model, (3, 32, 32))
    x = torch.randn(n, 3, h, w, dtype=DTYPE)
    dense, reference = dense_and_reference(model, fcn, x)
    assert dense.shape == (n, 10, *fcn.grid_shape((h, w)))
    g = reference.shape[2:]
    torch.testing.assert_close(dense[..., : g[0], : g[1]], reference, **TOL)


def test_lenet_training_size_equals_model() -> None:
    model = lenet()
    fcn = convolutionalize(model, (3, 32, 32))
    x = torch.randn(5, 3, 32, 32, dtype=DTYPE)
    with torch.no_grad():
        expected, got = model(x), fcn(x)
    assert got.shape == (5, 10, 1, 1)
    torch.testing.assert_close(got.flatten(1), expected, **TOL)


def test_padded_network_differs_from_sliding_window() -> None:
    model = lenet(pad=2)  # the classic LeNet-5 on 28x28 inputs
    fcn = convolutionalize(model, (3, 28, 28))
    assert not fcn.exact_sliding_window
    x = torch.randn(1, 3, 44, 44, dtype=DTYPE)
    dense, reference = dense_and_reference(model, fcn, x)
    assert dense.shape == reference.shape
    # Interior crops see real pixels where the model saw zero padding: the cells differ...
    assert (dense - reference).abs().max() > 1e-3
    # ...but at the training size the conversion is exact.
    x0 = torch.randn(2, 3, 28, 28, dtype=DTYPE)
    with torch.no_grad():
        torch.testing.assert_close(fcn(x0).flatten(1), model(x0), **TOL)


def test_ceil_mode_is_not_exact() -> None:
    fcn = convolutionalize(lenet(ceil_mode=True), (3, 32, 32))
    assert not fcn.exact_sliding_window


# ----------------------------------------------------------------------------------------------
# The source model, in place, dtype, device, requires_grad


def test_source_model_unchanged() -> None:
    model = lenet()
    before = state_of(model)
    modules_before = [(n, type(m)) for n, m in model.named_modules()]
    x = torch.randn(3, 3, 32, 32, dtype=DTYPE)
    with torch.no_grad():
        y_before = model(x)
    fcn = convolutionalize(model, (3, 32, 32))
    with torch.no_grad():
        fcn(torch.randn(2, 3, 40, 40, dtype=DTYPE))
        for p in fcn.parameters():  # training the FCN must not touch the source
            p.add_(1.0)
    assert [(n, type(m)) for n, m in model.named_modules()] == modules_before
    after = model.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_before, rtol=0, atol=0)
    assert not model.training and not fcn.training


def test_inplace_changes_and_shares_the_source() -> None:
    model = lenet()
    weight = model.fc1.weight
    fcn = convolutionalize(model, (3, 32, 32), inplace=True, head_impl="conv")
    assert isinstance(model.fc1, nn.Conv2d) and isinstance(model.bn, nn.BatchNorm2d)
    assert fcn.graph_module.fc1 is model.fc1
    assert model.fc1.weight.data_ptr() == weight.data_ptr()


def test_new_modules_keep_dtype_and_requires_grad() -> None:
    model = lenet()
    model.fc1.weight.requires_grad_(False)
    fcn = convolutionalize(model, (3, 32, 32), head_impl="conv")
    gm = fcn.graph_module
    assert gm.fc1.weight.dtype == DTYPE and not gm.fc1.weight.requires_grad
    assert gm.fc1.bias.requires_grad and gm.fc2.weight.requires_grad
    assert gm.bn.running_mean.dtype == DTYPE
    assert all(p.device == torch.device("cpu") for p in fcn.parameters())


def test_train_mode_flags_kept() -> None:
    # A model in training mode without BatchNorm or Dropout converts, and keeps its mode.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 5),
                          nn.GELU(), nn.Linear(5, 3)).to(DTYPE).train()
    fcn = convolutionalize(model, (3, 8, 8))
    assert fcn.training and all(m.training for m in fcn.graph_module.modules())
    x = torch.randn(2, 3, 8, 8, dtype=DTYPE)
    torch.testing.assert_close(fcn(x).flatten(1), model(x), **TOL)


def _bn_dropout_head() -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.Linear(72, 3), nn.BatchNorm1d(3),
                         nn.Dropout())


def test_training_mode_with_batchnorm_or_dropout_is_refused() -> None:
    model = _bn_dropout_head().train()
    before = state_of(model)
    with pytest.raises(FcconvError, match=r"^Sequential is in training mode and contains BatchNorm1d "
                       r"'3', Dropout '4', whose output depends on the batch or on chance.*"
                       r"Call model\.eval\(\) first"):
        convolutionalize(model, (1, 8, 8))
    # fcconv never switches the user's model to eval, nor changes it
    assert all(m.training for m in model.modules())
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # in eval mode the same model converts
    fcn = convolutionalize(model.eval(), (1, 8, 8))
    assert isinstance(fcn.graph_module.get_submodule("3"), nn.BatchNorm2d)


def test_submodule_left_in_training_mode_is_refused() -> None:
    model = _bn_dropout_head().eval()
    model[4].train()
    with pytest.raises(FcconvError, match=r"^Sequential contains, in training mode, Dropout '4'"):
        convolutionalize(model, (1, 8, 8))


class FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(72, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.dropout(self.conv(x).flatten(1), 0.5, training=self.training))


def test_functional_dropout_in_training_mode_is_refused() -> None:
    with pytest.raises(FcconvError, match=r"^FunctionalDropout is in training mode and contains "
                       r"node 'dropout' \(dropout\(\.\.\., training=True\)\)"):
        convolutionalize(FunctionalDropout().train(), (1, 8, 8))
    convolutionalize(FunctionalDropout().eval(), (1, 8, 8))


def test_gradients_flow_through_the_fcn() -> None:
    fcn = convolutionalize(lenet(), (3, 32, 32), head_impl="matmul")
    fcn(torch.randn(1, 3, 40, 40, dtype=DTYPE)).sum().backward()
    assert fcn.graph_module.fc1.weight.grad is not None


# ----------------------------------------------------------------------------------------------
# 1d and 3d


class Net1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


class Net3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(2, 4, 3, stride=2)
        self.fc = nn.Linear(4 * 3 * 3 * 3, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.conv(x), 1))


@pytest.mark.parametrize("head", ["conv", "matmul"])
@pytest.mark.parametrize(("net", "shape", "size"), [
    (Net1d, (2, 16), (26,)),
    (Net3d, (2, 8, 8, 8), (12, 11, 10)),
])
def test_one_and_three_spatial_dims(net: type[nn.Module], shape: tuple[int, ...],
                                    size: tuple[int, ...], head: str) -> None:
    torch.manual_seed(5)
    model = net().to(DTYPE).eval()
    fcn = convolutionalize(model, shape, head_impl=head)
    assert fcn.exact_sliding_window and fcn.stride == (2,) * len(size)
    x = torch.randn(2, shape[0], *size, dtype=DTYPE)
    dense, reference = dense_and_reference(model, fcn, x)
    assert dense.shape[2:] == fcn.grid_shape(size)
    torch.testing.assert_close(dense[(..., *(slice(0, g) for g in reference.shape[2:]))], reference, **TOL)
    assert len(fcn.window_of((1,) * len(size))) == 2 * len(size)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("kernel", [(2, 3, 2), (1, 1, 1)])
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_unfold_matmul_equals_conv(ndim: int, kernel: tuple[int, ...], batch: int) -> None:
    torch.manual_seed(6)
    conv = [nn.Conv1d, nn.Conv2d, nn.Conv3d][ndim - 1](3, 4, kernel[:ndim]).to(DTYPE)
    x = torch.randn(batch, 3, *(5, 6, 4)[:ndim], dtype=DTYPE)
    torch.testing.assert_close(_unfold_matmul(x, conv.weight, conv.bias), conv(x), **TOL)
    unbiased = conv(x) - conv.bias.view(-1, *[1] * ndim)
    torch.testing.assert_close(_unfold_matmul(x, conv.weight, None), unbiased, **TOL)


def test_unfold_conv_state_dict_is_the_conv_one() -> None:
    conv = nn.Conv2d(3, 4, 2)
    unfold = UnfoldConv2d(3, 4, 2)
    assert unfold.state_dict().keys() == conv.state_dict().keys()
    unfold.load_state_dict(conv.state_dict())
    x = torch.randn(1, 3, 5, 5)
    unfold.method = "matmul"
    torch.testing.assert_close(unfold(x), conv(x))
    assert "method='matmul'" in repr(unfold)


# ----------------------------------------------------------------------------------------------
# Errors


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if x.sum() > 0:
            x = x * 2
        return self.fc(x.flatten(1))


class Gate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if x.sum() > 0 else x


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.gate = Gate()
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.gate(self.conv(x)).flatten(1))


def test_control_flow_error_names_the_module() -> None:
    with pytest.raises(NotEquivalentError, match=r"^Cannot trace Branchy with torch.fx in the model's own"):
        convolutionalize(Branchy().eval(), (3, 8, 8))
    with pytest.raises(NotEquivalentError,
                       match=r"^Cannot trace GatedNet with torch.fx inside module 'gate' \(Gate\).*"
                       r"leaf_modules=\[Gate\]"):
        convolutionalize(GatedNet().eval(), (3, 8, 8))


@pytest.mark.parametrize("leaf", ["type", "instance", "name"])
def test_leaf_modules_make_it_traceable(leaf: str) -> None:
    torch.manual_seed(7)
    model = GatedNet().to(DTYPE).eval()
    leaves = {"type": [Gate], "instance": [model.gate], "name": ["gate"]}[leaf]
    fcn = convolutionalize(model, (3, 8, 8), leaf_modules=leaves)
    x = torch.randn(2, 3, 8, 8, dtype=DTYPE)
    with torch.no_grad():
        torch.testing.assert_close(fcn(x).flatten(1), model(x), **TOL)
    assert isinstance(fcn.graph_module.gate, Gate)


class LinearOnMap(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.lin = nn.Linear(6, 6)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.lin(self.conv(x)).flatten(1))


class FixedPool(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.avgpool = nn.AdaptiveAvgPool2d(4)  # 6x6 to 4x4: no fixed pool (6x6 to 3x3 is one)
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.conv(x)), 1))


class BatchNormOnWindow(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm1d(4 * 6 * 6)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.bn(self.conv(x).flatten(1)))


class SortHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cumsum(self.fc(self.conv(x).flatten(1)), dim=1)


class FixedReshape(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.fc = nn.Linear(4 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).reshape(-1, 4, 36).reshape(-1, 4, 6, 6)
        return self.fc(x.flatten(1))


@pytest.mark.parametrize(("model", "message"), [
    (LinearOnMap, r"^Cannot convolutionalize node 'lin' \(module 'lin': Linear.*a spatial dim"),
    (FixedPool, r"^Cannot convolutionalize node 'avgpool' \(module 'avgpool': AdaptiveAvgPool2d.*"
                r"neither the identity, a global pool nor a pool whose output size divides"),
    (BatchNormOnWindow, r"^Cannot convolutionalize node 'bn' .*Fold it into the following Linear"),
    (SortHead, r"^Cannot convolutionalize node 'cumsum' \(call to torch.cumsum\)"),
    (FixedReshape, r"^The converted model on input \(3, \d+, \d+\) fails at node 'reshape"),
])
def test_unconvertible_graphs_name_the_node(model: type[nn.Module], message: str) -> None:
    with pytest.raises(NotEquivalentError, match=message):
        convolutionalize(model().eval(), (3, 8, 8))


class PermutedFlatten(nn.Module):
    """A conv, then the map's dims permuted by ``how``, then flatten and a Linear."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.c = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(72, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.c(x)
        if self.how == "nhwc":
            y = y.permute(0, 2, 3, 1)
        elif self.how == "transpose":
            y = y.transpose(2, 3)
        elif self.how == "movedim":
            y = torch.relu(torch.movedim(y, 1, -1))
        elif self.how == "swapaxes":
            y = y.swapaxes(1, 3)
        elif self.how == "round_trip":  # permuted and back: the identity, converts
            y = y.permute(0, 2, 3, 1).permute(0, 3, 1, 2)
        return self.fc(y.flatten(1))


@pytest.mark.parametrize(("how", "node", "order", "fix"), [
    ("nhwc", "permute", r"\(N, H, W, C\)", r"view\(-1, 6, 6, 2\)\.permute\(0, 3, 1, 2\)"),
    ("transpose", "transpose", r"\(N, C, W, H\)", r"view\(-1, 2, 6, 6\)\.permute\(0, 1, 3, 2\)"),
    ("movedim", "movedim", r"\(N, H, W, C\)", r"permute\(0, 3, 1, 2\)"),
    ("swapaxes", "swapaxes", r"\(N, W, H, C\)", r"permute\(0, 3, 2, 1\)"),
])
def test_flatten_of_a_permuted_map_is_refused(how: str, node: str, order: str, fix: str) -> None:
    with pytest.raises(NotEquivalentError, match=(
            r"^Cannot convolutionalize node 'flatten' \(method Tensor\.flatten\): it flattens a "
            rf"\(\d+, \d+, \d+\) map whose dims node '{node}' .* put in the order {order} instead of "
            r"\(N, C, H, W\); a flatten of a permuted \(e\.g\. NHWC, channels-last\) map is not "
            r"supported.*Flatten the NCHW map.*permute the Linear's weight columns to NCHW order.*"
            rf"model\.fc\.weight\.data = .*{fix}")):
        convolutionalize(PermutedFlatten(how).eval(), (1, 8, 8))


def test_suggested_fix_for_a_channels_last_flatten_works() -> None:
    torch.manual_seed(3)
    model = PermutedFlatten("nhwc").to(DTYPE).eval()
    fixed = copy.deepcopy(model)
    fixed.how = "none"  # flatten the NCHW map...
    fixed.fc.weight.data = fixed.fc.weight.data.view(-1, 6, 6, 2).permute(0, 3, 1, 2).reshape(
        fixed.fc.out_features, -1)  # ...with the weight columns in NCHW order, as the error says
    x = torch.randn(2, 1, 8, 8, dtype=DTYPE)
    fcn = convolutionalize(fixed, (1, 8, 8))
    with torch.no_grad():
        torch.testing.assert_close(fcn(x).flatten(1), model(x), **TOL)


def test_permutation_undone_before_the_flatten_converts() -> None:
    torch.manual_seed(4)
    model = PermutedFlatten("round_trip").to(DTYPE).eval()
    fcn = convolutionalize(model, (1, 8, 8))
    x = torch.randn(1, 1, 11, 9, dtype=DTYPE)
    dense, reference = dense_and_reference(model, fcn, x)
    torch.testing.assert_close(dense, reference, **TOL)


class PermutedAfterPool(nn.Module):
    """The permute comes after an adaptive pooling that is the identity, inside the head."""

    def __init__(self, pool_after: bool) -> None:
        super().__init__()
        self.pool_after = pool_after
        self.c = nn.Conv2d(1, 2, 3)
        self.pool = nn.AdaptiveAvgPool2d((6, 6))
        self.fc = nn.Linear(72, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool_after:  # transpose, then the pooling to the training size
            return self.fc(self.pool(self.c(x).transpose(2, 3)).flatten(1))
        return self.fc(self.pool(self.c(x)).permute(0, 2, 3, 1).flatten(1))


def test_permuted_map_in_the_head_is_refused() -> None:
    with pytest.raises(NotEquivalentError, match=r"^Cannot convolutionalize node 'flatten' .*it flattens a "
                       r"\(6, 6, 2\) map whose dims node 'permute' .*\(N, H, W, C\).*not supported"):
        convolutionalize(PermutedAfterPool(False).eval(), (1, 8, 8))
    with pytest.raises(NotEquivalentError, match=r"^Cannot convolutionalize node 'pool' .*it pools a "
                       r"\(2, 6, 6\) map whose dims node 'transpose' .*\(N, C, W, H\).*not supported"):
        convolutionalize(PermutedAfterPool(True).eval(), (1, 8, 8))


def test_model_without_head_or_map_is_refused() -> None:
    class Scalar(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.sum(dim=(1, 2, 3))

    with pytest.raises(NotEquivalentError, match=r"^Cannot convolutionalize node 'sum.*Only a flatten"):
        convolutionalize(Scalar(), (3, 8, 8))


def test_model_failing_at_input_shape() -> None:
    with pytest.raises(NotEquivalentError, match=r"^LeNet on its training input \(3, 30, 30\) fails at node"):
        convolutionalize(lenet(), (3, 30, 30))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"input_shape": (3, 0, 32)}, r"^input_shape sizes must be positive"),
    ({"input_shape": (3, 32, 32), "head_impl": "fast"}, r"^head_impl must be one of"),
    ({"input_shape": (3, 32, 32), "leaf_modules": [nn.Linear(2, 2)]}, r"^leaf_modules holds a Linear"),
    ({"input_shape": (3, 32, 32), "leaf_modules": 3}, r"^leaf_modules must be"),
])
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(FcconvError, match=message):
        convolutionalize(lenet(), **kwargs)


def test_not_a_module() -> None:
    with pytest.raises(FcconvError, match=r"^convolutionalize expects an nn.Module"):
        convolutionalize(lambda x: x, (3, 8, 8))  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# The wrapper: geometry, checks, repr, checkpoint


def test_geometry_methods_and_checks() -> None:
    fcn = convolutionalize(lenet(), (3, 32, 32))
    geometry = fcn.geometry()
    assert geometry == {
        "input_shape": (3, 32, 32), "stride": (4, 4), "window": (32, 32), "min_size": (32, 32),
        "exact_sliding_window": True, "head_impl": "auto", "num_classes": 10,
    }
    assert "stride=(4, 4)" in repr(fcn) and "exact_sliding_window=True" in repr(fcn)
    assert fcn.grid_shape(40) == (3, 3)
    with pytest.raises(FcconvError, match=r"^An input of spatial size \(31, 40\) gives no cell"):
        fcn.grid_shape((31, 40))
    with pytest.raises(FcconvError, match=r"^spatial must be 2 integer"):
        fcn.grid_shape((40,))
    with pytest.raises(FcconvError, match=r"^cell indices must be >= 0"):
        fcn.window_of((-1, 0))
    with pytest.raises(FcconvError, match=r"^FullyConvolutional expects inputs \(N, 3, \*spatial\)"):
        fcn(torch.randn(1, 3, 31, 40, dtype=DTYPE))
    with pytest.raises(FcconvError, match=r"^FullyConvolutional expects inputs"):
        fcn(torch.randn(1, 4, 32, 32, dtype=DTYPE))


@pytest.mark.parametrize("head", ["conv", "matmul"])
def test_checkpoint_round_trip(head: str) -> None:
    model = lenet()
    fcn = convolutionalize(model, (3, 32, 32), head_impl=head)
    with torch.no_grad():
        for p in fcn.parameters():
            p.mul_(1.5)
    buffer = io.BytesIO()
    torch.save({"state_dict": fcn.state_dict(), "geometry": fcn.geometry()}, buffer)
    buffer.seek(0)
    checkpoint = torch.load(buffer, weights_only=True)
    fresh = LeNet().to(DTYPE).eval()
    loaded = FullyConvolutional.from_state_dict(fresh, checkpoint)
    assert loaded.geometry() == fcn.geometry()
    x = torch.randn(2, 3, 41, 37, dtype=DTYPE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), fcn(x), **TOL)
    # the state dict does not depend on the head: a conv-head checkpoint loads into matmul
    other_head = "conv" if head == "matmul" else "matmul"
    other = convolutionalize(LeNet().to(DTYPE).eval(), (3, 32, 32), head_impl=other_head)
    other.load_state_dict(checkpoint["state_dict"])


def test_checkpoint_geometry_mismatch() -> None:
    fcn = convolutionalize(lenet(), (3, 32, 32))
    geometry = dict(fcn.geometry(), stride=(2, 2))
    with pytest.raises(FcconvError, match=r"^The saved geometry has stride=\(2, 2\)"):
        FullyConvolutional.from_state_dict(LeNet().to(DTYPE), fcn.state_dict(), geometry)
    with pytest.raises(FcconvError, match=r"^from_state_dict needs the geometry"):
        FullyConvolutional.from_state_dict(LeNet().to(DTYPE), fcn.state_dict())


def test_deepcopy_of_fcn_works() -> None:
    fcn = convolutionalize(lenet(), (3, 32, 32))
    clone = copy.deepcopy(fcn)
    x = torch.randn(1, 3, 40, 40, dtype=DTYPE)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), fcn(x), rtol=0, atol=0)


def test_checkpoint_of_fcconv_0_1_loads() -> None:
    """fcconv 0.1 saved ``head`` and ``outputs``; they are now ``head_impl`` and ``num_classes``."""
    fcn = convolutionalize(lenet(), (3, 32, 32), head_impl="matmul")
    old = {k: v for k, v in fcn.geometry().items() if k not in ("head_impl", "num_classes")}
    old.update(head="matmul", outputs=10)
    loaded = FullyConvolutional.from_state_dict(LeNet().to(DTYPE).eval(), fcn.state_dict(), old)
    assert loaded.head_impl == "matmul" and loaded.num_classes == 10
    assert loaded.geometry() == fcn.geometry()


def test_a_converted_model_pickles_and_computes_the_same(tmp_path: Path) -> None:
    # What torch.save(fcn) and a dask worker process need: fx re-traces on unpickling.
    import pickle

    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).double().eval()
    fcn = convolutionalize(model, (2, 8, 8))
    x = torch.rand(1, 2, 13, 11, dtype=torch.float64)
    arrived = pickle.loads(pickle.dumps(fcn))
    assert isinstance(arrived, FullyConvolutional)
    assert torch.equal(arrived(x), fcn(x))
    assert (arrived.stride, arrived.window, arrived.exact_sliding_window) == (fcn.stride, fcn.window, False)
    torch.save(fcn, tmp_path / "fcn.pt")
    assert torch.equal(torch.load(tmp_path / "fcn.pt", weights_only=False)(x), fcn(x))
