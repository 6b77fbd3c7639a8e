"""Tests for fcconv.models.receptive: the proven receptive field against the gradient footprint.

A cell depends on an input pixel where the gradient of the cell with respect to that pixel is
nonzero for some input; the footprint over a few random positive inputs (so that ReLUs and max
pools route through every tap) must equal the field's box clipped to the image, in float64.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from small_nets import LYING_CASES, Lying, PadSame
from torch import nn

import fcconv
from fcconv.errors import FcconvError
from fcconv.models.receptive import Analysis, ReceptiveField, analyze

DTYPE = torch.float64


@pytest.fixture(autouse=True)
def _threads(one_thread: None) -> None:
    torch.manual_seed(0)


def _footprint(model: nn.Module, size: tuple[int, ...], cells: list[tuple[int, ...]],
               channels: int = 3, samples: int = 3) -> list[tuple[int, ...] | None]:
    """Bounding box (*starts, *ends) of the input pixels each cell's gradient reaches."""
    x = torch.rand(samples * len(cells), channels, *size, dtype=DTYPE) + 0.1
    x.requires_grad_(True)
    out = model(x)
    weights = torch.rand(out.shape[1], dtype=DTYPE) + 0.5  # a plain sum of a softmax is constant
    total = sum((out[(slice(k * samples, (k + 1) * samples), slice(None), *cell)] * weights).sum()
                for k, cell in enumerate(cells))
    (grad,) = torch.autograd.grad(total, x)
    boxes = []
    for k in range(len(cells)):
        support = (grad[k * samples:(k + 1) * samples] != 0).any(0).any(0)
        nz = support.nonzero()
        boxes.append(tuple(nz.min(0).values.tolist()) + tuple((nz.max(0).values + 1).tolist())
                     if len(nz) else None)
    return boxes


def _clip(box: tuple[int, ...], size: tuple[int, ...]) -> tuple[int, ...]:
    n = len(size)
    return tuple(max(b, 0) for b in box[:n]) + tuple(min(b, s) for b, s in zip(box[n:], size))


def _check_field(model: nn.Module, a: Analysis, size: tuple[int, ...], channels: int = 3,
                 samples: int = 3) -> None:
    """Corner, interior and last cell: the field's box clipped to the image is the footprint."""
    assert a.field is not None
    with torch.no_grad():
        grid = model(torch.zeros(1, channels, *size, dtype=DTYPE)).shape[2:]
    cells = sorted({(0,) * len(size), tuple(g // 2 for g in grid), tuple(g - 1 for g in grid)})
    for cell, box in zip(cells, _footprint(model, size, cells, channels, samples)):
        assert box == _clip(a.field.box(cell), size), (cell, a.field)


def _fcn(model: nn.Module, shape: tuple[int, ...], **kwargs: object) -> fcconv.FullyConvolutional:
    """The model converted in float64, with generic BatchNorm parameters: timm zero-initialises
    the last BatchNorm of each residual block, which would cut its branch out of the gradient."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return fcconv.convolutionalize(model.eval().to(DTYPE), shape, **kwargs)


# ----------------------------------------------------------------------------------------------
# ReceptiveField


def test_box_accepts_numpy_ints_and_0d_tensors() -> None:
    field = ReceptiveField(stride=(4, 2), offset=(-3, 0), extent=(10, 5))
    assert field.box((1, 2)) == (1, 4, 11, 9)
    assert field.box((np.int64(1), torch.tensor(2))) == (1, 4, 11, 9)
    assert field.box(np.array([1, 2])) == (1, 4, 11, 9)
    assert ReceptiveField((2,), (0,), (3,)).box(np.int32(2)) == (4, 7)


@pytest.mark.parametrize("cell", [(1,), (1, 2, 3), (1.5, 2), (-1, 0), "ab"])
def test_box_refuses_bad_cells(cell: object) -> None:
    with pytest.raises(FcconvError, match="cell must be 2"):
        ReceptiveField((1, 1), (0, 0), (3, 3)).box(cell)


def test_analyze_refuses_bad_shape() -> None:
    gm = torch.fx.symbolic_trace(nn.Conv2d(3, 4, 3))
    with pytest.raises(FcconvError, match="input_shape must have rank 2 to 4"):
        analyze(gm, (224, 224, 3, 1, 1))


# ----------------------------------------------------------------------------------------------
# Small nets


class Plain(nn.Module):
    """No padding anywhere: max and avg pools, a residual add of two branches, a channel cat."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 6, 3)
        self.pool = nn.MaxPool2d(2)
        self.a = nn.Conv2d(6, 4, 3, dilation=2)
        self.b = nn.Conv2d(6, 4, 5)
        self.conv2 = nn.Conv2d(8, 8, 3, stride=2)
        self.fc = nn.Linear(8 * 2 * 2, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = torch.cat([self.a(x), self.b(x) * 0.5], 1)
        x = F.avg_pool2d(F.gelu(self.conv2(x)), 2)
        return self.fc(torch.flatten(x, 1))


def test_plain_net_is_exact_and_its_field_is_the_gradient_footprint() -> None:
    model = Plain()
    fcn = _fcn(model, (3, 32, 32))
    for size in [(40, 33), (57, 48)]:
        a = analyze(fcn.graph_module, (3, *size))
        assert a.local and a.exact_sliding_window and not a.size_dependent
        assert a.why_not_local is None and a.why_not_exact is None
        assert a.field is not None and a.field.stride == fcn.stride and a.field.offset == (0, 0)
        assert a.field.extent == (28, 28)  # the window is 32, but floor modes drop its last 4 px
        _check_field(fcn, a, size)
        x = torch.randn(2, 3, *size, dtype=DTYPE)
        with torch.no_grad():
            dense = fcn(x)
        reference = fcconv.sliding_window(model, x, window=fcn.window, stride=fcn.stride, progress=False)
        assert ((dense - reference).abs().max() / reference.abs().max()).item() <= 1e-12


def test_tf_same_padding_moves_the_field_with_the_input_size() -> None:
    fcn = _fcn(PadSame(), (3, 16, 16))
    fields = {}
    for size in [(33, 34), (34, 35)]:
        a = analyze(fcn.graph_module, (3, *size))
        assert a.local and a.size_dependent and not a.exact_sliding_window
        assert "pads the map" in str(a.why_not_exact)
        _check_field(fcn, a, size)
        fields[size] = a.field
    assert fields[(33, 34)].offset != fields[(34, 35)].offset  # the field moved


def test_timm_std_conv2d_same_pads_dynamically_only_where_timm_does() -> None:
    from timm.layers import StdConv2dSame

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            return isinstance(m, StdConv2dSame) or super().is_leaf_module(m, name)

    for conv, sized in [(StdConv2dSame(3, 4, 3, stride=2), True), (StdConv2dSame(3, 4, 3, padding=1), False)]:
        root = nn.Sequential(conv)
        a = analyze(torch.fx.GraphModule(root, Tracer().trace(root)), (3, 11, 12))
        assert a.local and a.size_dependent == sized and a.field is not None
        assert a.field.offset == ((-1, 0) if sized else (-1, -1))


def test_timm_conv2d_same_kept_whole_is_read_with_its_dynamic_padding() -> None:
    from timm.layers import Conv2dSame

    model = nn.Sequential(Conv2dSame(3, 4, 3, stride=2), nn.ReLU(), Conv2dSame(4, 4, 4, stride=2),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 3))
    fcn = _fcn(model, (3, 16, 16), leaf_modules=[Conv2dSame])
    offsets = set()
    for size in [(33, 34), (34, 36)]:
        a = analyze(fcn.graph_module, (3, *size))
        assert a.local and a.size_dependent and not a.exact_sliding_window
        _check_field(fcn, a, size)
        offsets.add(a.field.offset if a.field else None)
    assert len(offsets) == 2


# ----------------------------------------------------------------------------------------------
# Nets whose dense map is not the sliding window although nothing pads


@pytest.mark.parametrize(("middle", "node", "why"), LYING_CASES)
def test_nets_with_global_statistics_or_positions_are_not_local(middle: str, node: str, why: str) -> None:
    fcn = _fcn(Lying(middle), (3, 9, 9))
    a = analyze(fcn.graph_module, (3, 20, 17))
    assert not a.local and not a.exact_sliding_window
    assert a.why_not_local is not None and a.why_not_local.startswith(f"node '{node}'")
    assert why in a.why_not_local
    assert a.why_not_exact == a.why_not_local
    assert (a.field is None) == (middle != "coords")  # positions do not change what a cell reads


def test_the_same_net_without_them_is_exact() -> None:
    a = analyze(_fcn(Lying("none"), (3, 9, 9)).graph_module, (3, 20, 17))
    assert a.local and a.exact_sliding_window and a.field == ReceptiveField((2, 2), (0, 0), (9, 9))


# ----------------------------------------------------------------------------------------------
# Whole models


@pytest.mark.slow
def test_resnet18_field_is_the_gradient_footprint_at_two_sizes() -> None:
    torchvision = pytest.importorskip("torchvision")
    fcn = _fcn(torchvision.models.resnet18(), (3, 224, 224))
    for size in [(320, 288), (257, 300)]:
        a = analyze(fcn.graph_module, (3, *size))
        assert a.local and not a.exact_sliding_window and not a.size_dependent
        assert str(a.why_not_exact).startswith("node 'conv1' (Conv2d): pads the map")
        assert a.field == ReceptiveField((32, 32), (-217, -217), (627, 627))
        _check_field(fcn, a, size, samples=2)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mobilenet_v3_small", "efficientnet_b0"])
def test_squeeze_excitation_is_not_local(name: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    fcn = _fcn(getattr(torchvision.models, name)(), (3, 224, 224))
    a = analyze(fcn.graph_module, (3, 256, 256))
    assert not a.local and a.field is None
    assert "AdaptiveAvgPool2d): pools to a fixed output size (global)" in str(a.why_not_local)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "offset", "extent"), [
    ("convnext_tiny", -828, 1880),  # channels-last LayerNorm, stochastic depth (eval: identity)
    ("densenet121", -1021, 2263),   # concatenations
    ("shufflenet_v2_x0_5", -263, 719),  # channel shuffle, chunk
])
def test_torchvision_models_are_local(name: str, offset: int, extent: int) -> None:
    torchvision = pytest.importorskip("torchvision")
    fcn = fcconv.convolutionalize(getattr(torchvision.models, name)().eval(), (3, 224, 224))
    a = analyze(fcn.graph_module, (3, 288, 320))
    assert a.local and not a.exact_sliding_window and not a.size_dependent
    assert a.field == ReceptiveField((32, 32), (offset, offset), (extent, extent))


@pytest.mark.slow
def test_timm_conv2d_same_model_is_size_dependent() -> None:
    timm = pytest.importorskip("timm")
    from timm.layers import Conv2dSame

    model = timm.create_model("tf_efficientnet_b0", pretrained=False).eval()
    fcn = fcconv.convolutionalize(model, (3, 224, 224), leaf_modules=[Conv2dSame])
    a = analyze(fcn.graph_module, (3, 288, 320))
    assert a.size_dependent and not a.local  # its squeeze-excitation blocks pool globally
    assert str(a.why_not_exact).startswith("node 'conv_stem' (Conv2dSame): pads the map")


@pytest.mark.slow
def test_timm_resnet10t_field_is_the_gradient_footprint() -> None:
    timm = pytest.importorskip("timm")
    fcn = _fcn(timm.create_model("resnet10t", pretrained=False), (3, 224, 224))
    size = (257, 300)
    a = analyze(fcn.graph_module, (3, *size))
    assert a.local and not a.exact_sliding_window
    _check_field(fcn, a, size, samples=2)


# ----------------------------------------------------------------------------------------------
# Any stack of sliding ops, in 1d, 2d and 3d


class Stack(nn.Module):
    """Convs, pools and pads with the given parameters; a residual 1x1 branch where shapes allow."""

    def __init__(self, ndim: int, layers: list[tuple[str, int, int, int, int, bool]]) -> None:
        super().__init__()
        self.ndim, self.layers = ndim, layers
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[ndim - 1]
        self.convs = nn.ModuleList(conv(2, 2, k, stride=s, padding=p, dilation=d)
                                   for _, k, s, p, d, _ in layers)
        self.skip = conv(2, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pool = (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)[self.ndim - 1]
        for (kind, k, s, p, d, ceil), conv in zip(self.layers, self.convs):
            if kind == "conv":
                x = conv(x) + self.skip(x) if s == 1 and 2 * p == d * (k - 1) else conv(x)
            elif kind == "pool":
                x = pool(x, k, s, min(p, k // 2), ceil_mode=ceil)
            else:
                x = F.pad(x, [p, k % 3] * self.ndim)
        return x


@given(ndim=st.integers(1, 3), data=st.data())
@settings(max_examples=30, deadline=None)
def test_any_stack_of_sliding_ops_has_the_gradient_footprint_as_field(ndim: int, data: st.DataObject) -> None:
    layer = st.tuples(st.sampled_from(["conv", "conv", "pool", "pad"]), st.integers(1, 4), st.integers(1, 3),
                      st.integers(0, 2), st.integers(1, 2), st.booleans())
    layers = data.draw(st.lists(layer, min_size=1, max_size=4))
    size = tuple(data.draw(st.lists(st.integers(24, 40), min_size=ndim, max_size=ndim)))
    model = Stack(ndim, layers).to(DTYPE)
    try:
        a = analyze(torch.fx.symbolic_trace(model), (2, *size))
    except FcconvError as e:  # the stack shrinks the input to nothing
        assert "Cannot analyze the graph at input shape" in str(e)
        assume(False)
    assert a.local and a.field is not None
    pads = any(p if kind == "conv" else (min(p, k // 2) or ceil) if kind == "pool" else p or k % 3
               for kind, k, _, p, _, ceil in layers)
    assert a.exact_sliding_window == (not pads)
    with torch.no_grad():
        grid = model(torch.zeros(1, 2, *size, dtype=DTYPE)).shape[2:]
    cells = [tuple(data.draw(st.integers(0, g - 1)) for g in grid) for _ in range(2)]
    for cell, box in zip(cells, _footprint(model, size, cells, channels=2, samples=1)):
        clipped = _clip(a.field.box(cell), size)
        inside = clipped == a.field.box(cell)
        if box is None:  # the cell reads only padding
            assert not inside
            continue
        assert all(c <= b for c, b in zip(clipped[:ndim], box[:ndim]))  # the field contains it
        assert all(b <= c for c, b in zip(clipped[ndim:], box[ndim:]))
        # and is it wherever the field lies inside the image; at the borders, taps that read
        # padding of an inner layer can make the clipped field larger than the footprint
        assert box == clipped or not inside


# ----------------------------------------------------------------------------------------------
# The allow-list, op by op


class Mixer(nn.Module):
    """Channel shuffle, chunk, CBAM-style channel statistics, a channels-last LayerNorm + Linear
    (ConvNeXt), a ceil_mode max pool, a channel softmax and a strided crop: all local."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        n, c, h, w = x.size()
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, c, h, w)
        a, b = x.chunk(2, dim=1)
        att = torch.sigmoid(torch.cat([a.mean(1, keepdim=True), b.max(1, keepdim=True)[0]], 1))
        y = a * att[:, :1] * (x.shape[1] ** -0.5) + b[:, 1:3].sum(1, keepdim=True)
        y = self.fc(F.layer_norm(y.permute(0, 2, 3, 1), (4,))).permute(0, 3, 1, 2)
        y = F.max_pool2d(y, 3, 2, ceil_mode=True)
        return F.softmax(y, 1)[:, :, 1:, ::2]


def test_per_position_ops_are_local_and_move_the_field_as_they_should() -> None:
    model = Mixer().to(DTYPE)
    size = (21, 30)
    a = analyze(torch.fx.symbolic_trace(model), (4, *size))
    assert a.local and not a.size_dependent
    assert a.why_not_exact is not None and a.why_not_exact.startswith("node 'conv' (Conv2d): pads")
    assert a.field == ReceptiveField((2, 4), (1, -1), (5, 5))
    _check_field(model, a, size, channels=4, samples=12)  # max pools: enough argmaxes


def _one_op(op: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...] = (3, 10, 12)) -> Analysis:
    class One(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.op = op

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.op(x)

    return analyze(torch.fx.symbolic_trace(One()), shape)


@pytest.mark.parametrize(("op", "field"), [
    (nn.ReflectionPad2d((1, 2, 0, 3)), ReceptiveField((1, 1), (0, -1), (1, 1))),
    (nn.Conv2d(3, 3, 3, padding=2, padding_mode="replicate"), ReceptiveField((1, 1), (-2, -2), (3, 3))),
    (nn.AvgPool2d(3, 2, padding=1, count_include_pad=False), ReceptiveField((2, 2), (-1, -1), (3, 3))),
])
def test_padding_is_local_but_not_exact(op: nn.Module, field: ReceptiveField) -> None:
    a = _one_op(op)
    assert a.local and a.field == field
    assert not a.exact_sliding_window and "pads the map" in str(a.why_not_exact)


@pytest.mark.parametrize(("op", "why"), [
    (nn.Conv2d(3, 3, 3, padding=1, padding_mode="circular"), "pads circularly"),
    (nn.BatchNorm2d(3).train(), "batch statistics"),
    (nn.Dropout2d().train(), "random in training mode"),
    (nn.ConvTranspose2d(3, 3, 2, stride=2), "transposed convolution"),
    (nn.Upsample(scale_factor=2), "resamples the map"),
    (nn.AdaptiveMaxPool2d((5, 6)), "pools to a fixed output size"),
    (lambda x: F.interpolate(x, size=(20, 24)), "resamples the map"),
    (lambda x: x * x.mean((2, 3), keepdim=True), "reduces over a spatial dim"),
    (lambda x: x.flatten(2), "merging or splitting a spatial dim"),
    (lambda x: x[:, :, 3], "picks one position"),
    (lambda x: x[:, :, :-2], "crops a spatial dim"),
    (lambda x: x[:, :, x.size(2) // 3:], "indexes at a position computed from the input size"),
    (lambda x: x + torch.arange(12.0), "a constant that varies along a spatial dim"),
    (lambda x: x * x.shape[-1], "uses the input size as a value"),
    (lambda x: torch.cumsum(x, 3), "not on the allow-list"),
    (nn.LocalResponseNorm(2), "not on the allow-list"),
])
def test_ops_not_on_the_allow_list_are_named(op: Callable[[torch.Tensor], torch.Tensor], why: str) -> None:
    a = _one_op(op)
    assert not a.local and not a.exact_sliding_window
    assert a.why_not_local is not None and why in a.why_not_local, a.why_not_local
    assert a.why_not_local.startswith("node '")


def test_a_conv_subclass_that_overrides_forward_is_not_trusted() -> None:
    class Sneaky(nn.Conv2d):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x.flip(-1))

    class Tracer(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, name: str) -> bool:
            return isinstance(m, Sneaky) or super().is_leaf_module(m, name)

    root = nn.Sequential(Sneaky(3, 3, 3))
    a = analyze(torch.fx.GraphModule(root, Tracer().trace(root)), (3, 10, 12))
    assert not a.local and "Sneaky overrides forward" in str(a.why_not_local)


def test_ops_that_only_touch_channels_or_batch_sizes_are_local() -> None:
    a = _one_op(lambda x: x.view(x.size(0), x.size(1), x.size(2), x.size(3))[:, x.size(1) // 3:]
                * x.shape[1] + x.size(0))
    assert a.local and a.exact_sliding_window and a.field == ReceptiveField((1, 1), (0, 0), (1, 1))


def test_analyze_leaves_a_model_in_training_mode_unchanged() -> None:
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3).train()))
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    assert "batch statistics" in str(analyze(gm, (3, 8, 8)).why_not_local)
    after = gm.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # num_batches_tracked included
    assert not any(isinstance(v, torch._subclasses.FakeTensor) for v in after.values())
