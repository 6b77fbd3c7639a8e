"""Tests of fcconv.layers: Linear <-> convolution, exactly.

Each conversion test checks four things: the structure of the result, its outputs against the
source's, the round trip back, and that the source module is unchanged.

"Equal outputs" are certified with the library's own :func:`fcconv.certify.assert_equivalent` on
the test's inputs: the float64 copies of source and result must be the same function, and the
working-precision differences must lie within the rounding bound derived for the computation
(``report.bound_ok``), never a guessed tolerance. Conversions that compute weights (``conv_to_linear``
with reflect, replicate or circular padding sums the taps folded onto one input) round them once in
the working dtype: there ``parameter_rounding=True`` allows that one rounding per weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, cast

import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvTransposeNd

from fcconv.certify import assert_equivalent
from fcconv.errors import FcconvError, NotEquivalentError
from fcconv.layers import (
    conv_matrix,
    conv_output_shape,
    conv_to_linear,
    linear_to_conv,
    linear_to_pointwise,
    pointwise_to_linear,
)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel:UserWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),  # inside torch.func
]


CONVS: dict[int, Any] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSPOSED: dict[int, Any] = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
DTYPES = (torch.float32, torch.float64, torch.bfloat16)
SHAPES = {1: (3, 5), 2: (2, 3, 4), 3: (2, 2, 3, 2)}  # per-sample input shapes (C, *spatial)
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# Helpers: the certificate, snapshots of a module, the four checks.


def assert_outputs_match(source: nn.Module, result: nn.Module, x: Tensor, *,
                         input_map: Callable[[Tensor], Tensor] | None = None,
                         output_map: Callable[[Tensor], Tensor] | None = None,
                         parameter_rounding: bool = False) -> None:
    """``result`` computes ``source``'s function on the batch ``x`` (the source's input), certified."""
    report = assert_equivalent(source, result, inputs=x, input_map=input_map, output_map=output_map,
                               parameter_rounding=parameter_rounding)
    assert report.bound_ok is True, report


def snapshot(module: nn.Module) -> dict[str, object]:
    return {
        "params": {k: (v.detach().clone(), v.requires_grad, v.dtype, v.device)
                   for k, v in module.named_parameters()},
        "training": [m.training for m in module.modules()],
        "repr": repr(module),
    }


def assert_unchanged(module: nn.Module, snap: dict[str, object]) -> None:
    now = snapshot(module)
    assert now["repr"] == snap["repr"] and now["training"] == snap["training"]
    before, after = snap["params"], now["params"]
    assert isinstance(before, dict) and isinstance(after, dict) and before.keys() == after.keys()
    for k, (data, *meta) in before.items():
        assert torch.equal(after[k][0], data) and list(after[k][1:]) == meta, k


def assert_same_kind(result: nn.Module, source: nn.Module) -> None:
    """dtype, device, requires_grad and train/eval mode carried over; no stray submodules."""
    assert list(result.children()) == []
    assert result.training == source.training
    src = dict(source.named_parameters())
    for name, p in result.named_parameters():
        assert isinstance(p, nn.Parameter)
        assert p.dtype == src[name].dtype and p.device == src[name].device
        assert p.requires_grad == src[name].requires_grad


def assert_aliases(a: Tensor, b: Tensor) -> None:
    """``a`` and ``b`` share memory: same address, and a write to one shows in the other."""
    assert a.data_ptr() == b.data_ptr()
    first_a, first_b = (0,) * a.dim(), (0,) * b.dim()
    with torch.no_grad():
        old = a[first_a].clone()
        new = 0.5 if old.item() != 0.5 else 0.25  # exact in every float dtype
        a[first_a] = new
        changed = b[first_b].item()
        a[first_a] = old  # restore, exactly
    assert changed == new


def assert_copies(a: Tensor, b: Tensor) -> None:
    assert a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr()


def assert_shared_or_copied(result: nn.Module, source: nn.Module, share: bool) -> None:
    """Weight and bias of ``result`` alias ``source``'s with ``share``, else are copies."""
    check = assert_aliases if share else assert_copies
    check(result.weight, source.weight)
    if source.bias is not None:
        check(result.bias, source.bias)


def assert_same_linear(back: nn.Module, linear: nn.Linear) -> None:
    """The round trip gives the Linear back, weight and bias bit for bit."""
    assert type(back) is nn.Linear and back.weight.shape == linear.weight.shape
    assert torch.equal(back.weight, linear.weight)
    assert (back.bias is None and linear.bias is None) or torch.equal(back.bias, linear.bias)


def make_linear(in_features: int, out_features: int, dtype: torch.dtype = torch.float32, bias: bool = True,
                seed: int = 0) -> Any:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).to(dtype)


def make_conv(cls: Any, c_in: int, c_out: int, kernel: Any, dtype: torch.dtype = torch.float32,
              seed: int = 0, **kwargs: Any) -> Any:
    torch.manual_seed(seed)
    return cls(c_in, c_out, kernel, **kwargs).to(dtype)


def sample(shape: tuple[int, ...], dtype: torch.dtype, batch: int = 3, seed: int = 1) -> Tensor:
    torch.manual_seed(seed)
    return torch.randn(batch, *shape, dtype=torch.float64).to(dtype)


# The textbook.


def test_textbook_numbers() -> None:
    torch.manual_seed(123)
    fc = nn.Linear(4, 2)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    with torch.no_grad():
        y = fc(x)
        y_conv = linear_to_conv(fc, (1, 2, 2))(x.reshape(1, 1, 2, 2)).flatten(1)
        y_point = linear_to_pointwise(fc)(x.reshape(1, 4, 1, 1)).flatten(1)
    assert (y - torch.tensor([[-0.4775, -2.1469]])).abs().max() < 0.5e-4  # to 4 decimals
    assert torch.equal(y_conv, y) and torch.equal(y_point, y)  # bit-identical at this size


# linear_to_conv (scenario 1).


def check_linear_to_conv(linear: Any, shape: tuple[int, ...], share: bool) -> Any:
    snap = snapshot(linear)
    conv: Any = linear_to_conv(linear, shape, share_weights=share)
    ndim = len(shape) - 1
    # Structure.
    assert type(conv) is CONVS[ndim]
    assert conv.in_channels == shape[0] and conv.out_channels == linear.out_features
    assert tuple(conv.kernel_size) == shape[1:]
    assert conv.stride == (1,) * ndim and conv.padding == (0,) * ndim and conv.groups == 1
    assert (conv.bias is None) == (linear.bias is None)
    assert_same_kind(conv, linear)
    assert conv_output_shape(conv, shape) == (linear.out_features,) + (1,) * ndim
    # Outputs.
    x = sample(shape, linear.weight.dtype)
    assert_outputs_match(linear, conv, x.flatten(1), input_map=lambda v: v.reshape(-1, *shape))
    # Round trip: the kernel reshaped back, bit for bit.
    back = conv_to_linear(conv, shape, share_weights=share)
    assert_same_linear(back, linear)
    assert_shared_or_copied(conv, linear, share)
    # Source unchanged.
    assert_unchanged(linear, snap)
    return conv


@pytest.mark.parametrize("ndim", (1, 2, 3))
@pytest.mark.parametrize("bias", (True, False))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("share", (False, True))
def test_linear_to_conv(ndim: int, bias: bool, dtype: torch.dtype, share: bool) -> None:
    shape = SHAPES[ndim]
    check_linear_to_conv(make_linear(math.prod(shape), 5, dtype, bias), shape, share)


def test_linear_to_conv_keeps_requires_grad_and_mode() -> None:
    linear = make_linear(12, 3).eval()
    linear.bias.requires_grad_(False)
    conv = check_linear_to_conv(linear, (3, 2, 2), share=False)
    assert not conv.training and conv.weight.requires_grad and not conv.bias.requires_grad


def test_linear_to_conv_flat_vector() -> None:
    # A flat vector of n features is (n, 1): a Conv1d with kernel 1, i.e. also pointwise.
    check_linear_to_conv(make_linear(6, 4), (6, 1), share=False)


def test_share_weights_on_vgg16_fc6_allocates_nothing() -> None:
    # Linear(25088, 4096): 411 MB of weight, allocated but never touched (skip_init), so cheap here.
    fc6: Any = nn.utils.skip_init(nn.Linear, 25088, 4096)
    conv: Any = linear_to_conv(fc6, (512, 7, 7), share_weights=True)
    assert conv.weight.shape == (4096, 512, 7, 7)
    for new, old in ((conv.weight, fc6.weight), (conv.bias, fc6.bias)):
        assert new.data_ptr() == old.data_ptr()
        assert new.untyped_storage().data_ptr() == old.untyped_storage().data_ptr()
        assert new.untyped_storage().nbytes() == old.untyped_storage().nbytes()


# linear_to_pointwise (scenario 2).


def check_linear_to_pointwise(linear: Any, ndim: int, share: bool) -> Any:
    snap = snapshot(linear)
    conv = linear_to_pointwise(linear, ndim=ndim, share_weights=share)
    assert type(conv) is CONVS[ndim]
    assert conv.in_channels == linear.in_features and conv.out_channels == linear.out_features
    assert conv.kernel_size == (1,) * ndim and conv.stride == (1,) * ndim
    assert conv.padding == (0,) * ndim and conv.groups == 1
    assert_same_kind(conv, linear)
    x = sample((linear.in_features, *(2, 3, 2)[:ndim]), linear.weight.dtype)
    assert_outputs_match(linear, conv, x.movedim(1, -1), input_map=lambda v: v.movedim(-1, 1),
                         output_map=lambda y: y.movedim(1, -1))
    back = pointwise_to_linear(conv, share_weights=share)
    assert_same_linear(back, linear)
    assert_shared_or_copied(conv, linear, share)
    assert_unchanged(linear, snap)
    return conv


@pytest.mark.parametrize("ndim", (1, 2, 3))
@pytest.mark.parametrize("bias", (True, False))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("share", (False, True))
def test_linear_to_pointwise(ndim: int, bias: bool, dtype: torch.dtype, share: bool) -> None:
    check_linear_to_pointwise(make_linear(6, 4, dtype, bias), ndim, share)


def test_linear_to_pointwise_keeps_requires_grad_and_mode() -> None:
    linear = make_linear(6, 4).eval().requires_grad_(False)
    conv = check_linear_to_pointwise(linear, 2, share=True)
    assert not conv.training and not conv.weight.requires_grad


# conv_to_linear: any conv, transposed convs too.

# (kernel, kwargs) per case, on the input shapes of SHAPES; "cover" is the kernel of spatial size.
CONV_CASES: dict[str, tuple[Any, dict[str, Any]]] = {
    "cover": (None, {}),
    "cover_zero_padding": ("spatial+1", dict(padding=1)),  # one output position, kernel cropped
    "stride_padding": (2, dict(stride=2, padding=1)),
    "dilation_groups": (2, dict(dilation=2, groups=2, padding="same")),
    "valid": (2, dict(padding="valid")),
    "reflect": (2, dict(padding=1, padding_mode="reflect")),
    "replicate": (3, dict(padding=2, padding_mode="replicate")),
    "circular": (3, dict(padding=2, padding_mode="circular")),
}


def conv_case(name: str, ndim: int, dtype: torch.dtype, bias: bool) -> tuple[Any, tuple[int, ...]]:
    shape = SHAPES[ndim]
    kernel, kwargs = CONV_CASES[name]
    if kernel is None:
        kernel = shape[1:]
    elif kernel == "spatial+1":
        kernel = tuple(s + 1 for s in shape[1:])
    c_in = shape[0] if name != "dilation_groups" else 2
    shape = (c_in, *shape[1:])
    return make_conv(CONVS[ndim], c_in, 4, kernel, dtype, bias=bias, **kwargs), shape


def check_conv_to_linear(conv: Any, shape: tuple[int, ...]) -> Any:
    snap = snapshot(conv)
    out_shape = conv_output_shape(conv, shape)
    linear = conv_to_linear(conv, shape)
    assert type(linear) is nn.Linear
    assert linear.in_features == math.prod(shape) and linear.out_features == math.prod(out_shape)
    assert (linear.bias is None) == (conv.bias is None)
    assert_same_kind(linear, conv)
    x = sample(shape, conv.weight.dtype)
    folded = getattr(conv, "padding_mode", "zeros") != "zeros"  # taps summed in the working dtype
    assert_outputs_match(conv, linear, x, input_map=lambda v: v.flatten(1), parameter_rounding=folded)
    # The weight is the exact matrix (and the kernel itself, reshaped, where it covers the input).
    assert torch.equal(linear.weight, conv_matrix(conv, shape))
    # Round trip through scenario 1: a covering conv with the same matrix, bit for bit.
    again = conv_to_linear(linear_to_conv(linear, shape), shape)
    assert torch.equal(again.weight, linear.weight)
    assert (again.bias is None) or torch.equal(again.bias, linear.bias)
    assert_copies(linear.weight, conv.weight)
    assert_unchanged(conv, snap)
    return linear


@pytest.mark.parametrize("case", CONV_CASES)
@pytest.mark.parametrize("ndim", (1, 2, 3))
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_to_linear(case: str, ndim: int, dtype: torch.dtype) -> None:
    conv, shape = conv_case(case, ndim, dtype, bias=(ndim != 2))
    check_conv_to_linear(conv, shape)


@pytest.mark.parametrize("ndim", (1, 2, 3))
def test_conv_to_linear_covering_kernel_is_the_kernel(ndim: int) -> None:
    # The inverse of scenario 1: the kernel, reshaped; linear_to_conv gives it back bit for bit.
    conv, shape = conv_case("cover", ndim, torch.float32, bias=True)
    linear = check_conv_to_linear(conv, shape)
    assert torch.equal(linear.weight, conv.weight.reshape(4, -1)) and torch.equal(linear.bias, conv.bias)
    back: Any = linear_to_conv(linear, shape)
    assert torch.equal(back.weight, conv.weight) and torch.equal(back.bias, conv.bias)
    shared = conv_to_linear(conv, shape, share_weights=True)
    assert_aliases(shared.weight, conv.weight)
    assert_aliases(shared.bias, conv.bias)


def test_conv_to_linear_cropped_kernel() -> None:
    # Kernel 3x3 with padding 1 on a 1x1 input: one position, only the centre tap touches the input.
    conv = make_conv(nn.Conv2d, 2, 3, 3, torch.float64, padding=1)
    linear = check_conv_to_linear(conv, (2, 1, 1))
    assert torch.equal(linear.weight, conv.weight[:, :, 1, 1])


def test_conv_to_linear_keeps_requires_grad_and_mode() -> None:
    conv = make_conv(nn.Conv2d, 2, 3, 3, padding=1).eval()
    conv.weight.requires_grad_(False)
    linear = check_conv_to_linear(conv, (2, 4, 4))
    assert not linear.training and not linear.weight.requires_grad and linear.bias.requires_grad


@pytest.mark.parametrize("device", DEVICES)
def test_results_keep_device(device: str) -> None:
    linear = make_linear(12, 3).to(device)
    for module in (linear_to_conv(linear, (3, 2, 2)), linear_to_pointwise(linear)):
        assert module.weight.device == linear.weight.device
    conv = make_conv(nn.Conv2d, 3, 2, 3).to(device)
    assert conv_to_linear(conv, (3, 4, 4)).weight.device == conv.weight.device
    for layout in ("dense", "csr", "coo"):
        assert conv_matrix(conv, (3, 4, 4), layout=layout).device == conv.weight.device


# Transposed convolutions: full support through their adjoint conv.


def jacobian(module: nn.Module, shape: tuple[int, ...]) -> Tensor:
    """The module's matrix by autodiff: reverse mode for a conv (as in test_matrix), forward mode for a
    transposed conv, whose reverse mode is slow (a batched backward per output) and whose entries
    are single weights, exact either way."""
    x = torch.zeros(math.prod(shape), dtype=torch.float64)
    jac = torch.func.jacfwd if isinstance(module, _ConvTransposeNd) else torch.func.jacrev
    with torch.no_grad():
        return jac(lambda v: module(v.view(1, *shape)).flatten())(x)


@pytest.mark.parametrize("ndim", (1, 2, 3))
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(stride=2, padding=1, output_padding=1),
        dict(stride=2, dilation=3, output_padding=2, groups=2),  # output_padding >= stride
        dict(stride=3, padding=2, dilation=2),
        dict(stride=(3,), padding=(2,), dilation=(2,)),  # one value for every dim, as PyTorch allows
    ],
)
def test_conv_transpose(ndim: int, kwargs: dict) -> None:
    shape = (2, *(3, 2, 3)[:ndim])
    conv = make_conv(TRANSPOSED[ndim], 2, 4, 3, torch.float64, **kwargs)
    m = conv_matrix(conv, shape)
    assert torch.equal(m, jacobian(conv, shape))
    for layout in ("csr", "coo"):
        assert torch.equal(conv_matrix(conv, shape, layout=layout).to_dense(), m)
    y = conv(torch.zeros(1, *shape, dtype=torch.float64))
    assert conv_output_shape(conv, shape) == tuple(y.shape[1:])
    check_conv_to_linear(conv, shape)
    check_conv_to_linear(conv.float(), shape)


# pointwise_to_linear (the inverse of scenario 2).


@pytest.mark.parametrize("ndim", (1, 2, 3))
@pytest.mark.parametrize("groups", (1, 2))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kwargs", [dict(), dict(padding="same", dilation=2, padding_mode="reflect")])
def test_pointwise_to_linear(ndim: int, groups: int, dtype: torch.dtype, kwargs: dict) -> None:
    conv = make_conv(CONVS[ndim], 4, 6, 1, dtype, groups=groups, bias=groups == 1, **kwargs)
    snap = snapshot(conv)
    linear = pointwise_to_linear(conv)
    assert type(linear) is nn.Linear and (linear.in_features, linear.out_features) == (4, 6)
    assert_same_kind(linear, conv)
    x = sample((4, *(2, 3, 2)[:ndim]), dtype)
    assert_outputs_match(conv, linear, x, input_map=lambda v: v.movedim(1, -1),
                         output_map=lambda y: y.movedim(-1, 1))
    w = conv.weight.detach().reshape(6, 4 // groups)
    if groups == 1:
        assert torch.equal(linear.weight, w)
        # Round trip: back to a pointwise conv with the same weight, bit for bit.
        back: Any = linear_to_pointwise(linear, ndim=ndim)
        assert torch.equal(back.weight, conv.weight) and torch.equal(back.bias, conv.bias)
    else:
        # Block-diagonal: group g maps its 2 input channels to its 3 outputs, zeros elsewhere.
        blocks = linear.weight.detach().view(2, 3, 2, 2)
        assert torch.equal(blocks[0, :, 0], w[:3]) and torch.equal(blocks[1, :, 1], w[3:])
        assert not blocks[0, :, 1].any() and not blocks[1, :, 0].any()
        # Round trip: the pointwise conv of that Linear has the same outputs (groups=1 now).
        again = pointwise_to_linear(linear_to_pointwise(linear, ndim=ndim))
        assert torch.equal(again.weight, linear.weight)
    assert_copies(linear.weight, conv.weight)
    assert_unchanged(conv, snap)


def test_pointwise_to_linear_shares() -> None:
    conv = make_conv(nn.Conv2d, 4, 6, 1)
    linear = pointwise_to_linear(conv, share_weights=True)
    assert_aliases(linear.weight, conv.weight)
    assert_aliases(linear.bias, conv.bias)


# share_weights=True where it cannot share.


def test_share_impossible_for_a_structured_matrix() -> None:
    conv = make_conv(nn.Conv2d, 2, 3, 3, padding=1)
    with pytest.raises(FcconvError, match=r"^share_weights=True needs a kernel that covers the input "
                                          r"exactly \(kernel_size == spatial size, no padding, groups=1\); "
                                          r"Conv2d\(2, 3"):
        conv_to_linear(conv, (2, 4, 4), share_weights=True)


def test_share_impossible_with_groups() -> None:
    conv = make_conv(nn.Conv2d, 4, 6, 1, groups=2)
    with pytest.raises(FcconvError, match=r"^share_weights=True is not possible with groups=2: the Linear's "
                                          r"weight is block-diagonal"):
        pointwise_to_linear(conv, share_weights=True)


def test_share_impossible_for_a_weight_that_is_not_viewable() -> None:
    conv = make_conv(nn.Conv2d, 2, 3, 2)
    conv.weight = nn.Parameter(conv.weight.detach().permute(1, 0, 2, 3).contiguous().permute(1, 0, 2, 3))
    with pytest.raises(FcconvError, match=r"^share_weights=True needs a weight that can be viewed as "
                                          r"\(3, 8\) without a copy"):
        conv_to_linear(conv, (2, 2, 2), share_weights=True)
    check_conv_to_linear(conv, (2, 2, 2))  # copying works


# Bad input (section 3): the start of each message.

ErrorCase = tuple[Callable[[], object], type[Exception], str]

LINEAR_ERRORS: list[ErrorCase] = [
    (lambda: linear_to_conv(nn.Linear(100, 2), (3, 5, 5)), NotEquivalentError,
     r"^Cannot convert Linear\(in_features=100\) for input_shape \(3, 5, 5\): expected in_features = 3\*5\*5 "
     r"= 75\. "),
    (lambda: linear_to_conv(nn.Linear(75, 2), (75,)), FcconvError,
     r"^input_shape must have rank 2 to 4, \(C, L\), \(C, H, W\) or \(C, D, H, W\), for Conv1d/2d/3d; "
     r"got rank 1: \(75,\)\."),
    (lambda: linear_to_conv(nn.Linear(75, 2), (1, 3, 5, 5, 1)), FcconvError,
     r"^input_shape must have rank 2 to 4, .*got rank 5: \(1, 3, 5, 5, 1\)\."),
    (lambda: linear_to_conv(nn.Linear(75, 2), (3, 0, 5)), FcconvError,
     r"^input_shape sizes must be positive; got \(3, 0, 5\)\."),
    (lambda: linear_to_conv(nn.Linear(75, 2), (3, -5, -5)), FcconvError,
     r"^input_shape sizes must be positive; got \(3, -5, -5\)\."),
    (lambda: linear_to_conv(nn.Linear(75, 2), cast(Any, "3x5x5")), FcconvError,
     r"^input_shape must be a per-sample shape \(C, \*spatial\) such as \(3, 32, 32\); got '3x5x5'\."),
    (lambda: linear_to_conv(nn.Linear(75, 2), cast(Any, (3, 5.5, 5))), FcconvError,
     r"^input_shape must hold integers; got \(3, 5\.5, 5\)\."),
    (lambda: linear_to_conv(cast(Any, nn.Conv2d(3, 2, 5)), (3, 5, 5)), FcconvError,
     r"^linear_to_conv expects an nn\.Linear; got Conv2d\. Pass the layer itself"),
    (lambda: linear_to_conv(cast(Any, nn.Sequential(nn.Linear(75, 2))), (3, 5, 5)), FcconvError,
     r"^linear_to_conv expects an nn\.Linear; got Sequential\."),
    (lambda: linear_to_conv(nn.LazyLinear(2), (3, 5, 5)), FcconvError,
     r"^linear_to_conv needs the weights of LazyLinear, which it does not have yet"),
    (lambda: linear_to_pointwise(nn.Linear(4, 2), ndim=4), FcconvError,
     r"^ndim must be 1, 2 or 3 \(Conv1d, Conv2d, Conv3d\); got 4\."),
    (lambda: linear_to_pointwise(nn.Linear(4, 2), ndim=True), FcconvError,
     r"^ndim must be 1, 2 or 3 .*; got True\."),
    (lambda: linear_to_pointwise(cast(Any, torch.zeros(2, 4))), FcconvError,
     r"^linear_to_pointwise expects an nn\.Linear; got Tensor\."),
]

CONV_ERRORS: list[ErrorCase] = [
    (lambda: conv_to_linear(nn.Conv2d(3, 4, 5), (3, 4, 4)), FcconvError,
     r"^The kernel does not fit the input in spatial dim 0: expected a padded input of at least "
     r"dilation\*\(kernel_size-1\)\+1 = 1\*\(5-1\)\+1 = 5, got 4\+0\+0 = 4 for input spatial size "
     r"\(4, 4\)\."),
    (lambda: conv_matrix(nn.Conv2d(1, 1, 3, padding=3, padding_mode="reflect"), (1, 3, 3)), FcconvError,
     r"^reflect padding needs padding < input size in every spatial dim; dim 0 has padding 3 and size 3\."),
    (lambda: conv_matrix(nn.Conv1d(1, 1, 3, padding=4, padding_mode="circular"), (1, 3)), FcconvError,
     r"^circular padding needs padding <= input size in every spatial dim; dim 0 has padding 4 and size 3\."),
    (lambda: conv_to_linear(nn.Conv2d(3, 4, 3), (4, 5, 5)), NotEquivalentError,
     r"^conv_to_linear: Conv2d\(in_channels=3\) expects 3 input channels; got input_shape \(4, 5, 5\) "
     r"with 4\."),
    (lambda: conv_matrix(nn.Conv2d(3, 4, 3), (3, 5)), FcconvError,
     r"^conv_matrix: Conv2d\(in_channels=3\) takes inputs of rank 3 \(C plus 2 spatial dims\); got "
     r"input_shape \(3, 5\) of rank 2\."),
    (lambda: conv_matrix(nn.Conv2d(3, 4, 3), (3, 0, 5)), FcconvError,
     r"^input_shape sizes must be positive; got \(3, 0, 5\)\."),
    (lambda: conv_matrix(nn.Conv2d(3, 4, 3), (3, 5, 5), layout="sparse"), FcconvError,
     r"^layout must be one of 'dense', 'csr', 'coo'; got 'sparse'\."),
    (lambda: conv_matrix(nn.ConvTranspose2d(3, 4, 3), (3, 5, 5), layout="bsr"), FcconvError,
     r"^layout must be one of 'dense', 'csr', 'coo'; got 'bsr'\."),
    (lambda: conv_matrix(nn.Conv2d(64, 64, 3, padding=1), (64, 256, 256)), FcconvError,
     r"^The dense matrix of Conv2d on input_shape \(64, 256, 256\) would take 65536\.0 GiB "
     r"\(4194304 x 4194304\); the limit is 16 GiB\. Use layout='csr'"),
    (lambda: conv_to_linear(nn.Linear(4, 2), (4, 1)), FcconvError,
     r"^conv_to_linear expects an nn\.Conv1d, nn\.Conv2d or nn\.Conv3d \(or ConvTranspose\); got Linear\."),
    (lambda: conv_matrix(cast(Any, torch.zeros(3, 3)), (3, 3)), FcconvError,
     r"^conv_matrix expects an nn\.Conv1d, nn\.Conv2d or nn\.Conv3d \(or ConvTranspose\); got Tensor\."),
    (lambda: conv_matrix(nn.LazyConv2d(4, 3), (3, 5, 5)), FcconvError,
     r"^conv_matrix needs the weights of LazyConv2d, which it does not have yet: .* Run one forward pass"),
    (lambda: conv_output_shape(nn.ConvTranspose1d(1, 1, 3, padding=3), (1, 1)), FcconvError,
     r"^ConvTranspose1d gives an empty output \(-3,\) on input_shape \(1, 1\)\."),
    (lambda: pointwise_to_linear(nn.Conv2d(4, 2, 3)), NotEquivalentError,
     r"^pointwise_to_linear expects a conv with kernel_size 1, stride 1 and no padding; got Conv2d\(4, 2, "
     r"kernel_size=\(3, 3\)"),
    (lambda: pointwise_to_linear(nn.Conv1d(4, 2, 1, stride=2)), NotEquivalentError,
     r"^pointwise_to_linear expects a conv with kernel_size 1, stride 1 and no padding; got Conv1d\(4, 2, "
     r"kernel_size=\(1,\), stride=\(2,\)\)\. Use conv_to_linear"),
    (lambda: pointwise_to_linear(nn.Conv3d(4, 2, 1, padding=1)), NotEquivalentError,
     r"^pointwise_to_linear expects a conv with kernel_size 1, stride 1 and no padding; got Conv3d"),
    (lambda: pointwise_to_linear(nn.ConvTranspose2d(4, 2, 1)), NotEquivalentError,
     r"^pointwise_to_linear does not take transposed convolutions; got ConvTranspose2d\."),
    (lambda: pointwise_to_linear(nn.Linear(4, 2)), FcconvError,
     r"^pointwise_to_linear expects an nn\.Conv1d, nn\.Conv2d or nn\.Conv3d; got Linear\."),
    (lambda: pointwise_to_linear(nn.LazyConv2d(4, 1)), FcconvError,
     r"^pointwise_to_linear needs the weights of LazyConv2d"),
]


@pytest.mark.parametrize(("call", "error", "message"), LINEAR_ERRORS + CONV_ERRORS,
                         ids=[f"{i}-{m[1:30]}" for i, (_, _, m) in enumerate(LINEAR_ERRORS + CONV_ERRORS)])
def test_bad_input(call: Callable[[], object], error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        call()


def test_errors_are_value_errors() -> None:
    with pytest.raises(ValueError):
        linear_to_conv(nn.Linear(100, 2), (3, 5, 5))


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv2d(3, 8, 3, stride=2), (3, 9, 9)),
        (nn.Conv1d(2, 4, 4, padding="same", dilation=3), (2, 10)),
        (nn.Conv3d(2, 4, (1, 2, 3), stride=(1, 2, 3), padding=(0, 1, 2)), (2, 3, 5, 7)),
        (nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1), (3, 4, 5)),
    ],
)
def test_conv_output_shape(conv: Any, shape: tuple[int, ...]) -> None:
    assert conv_output_shape(conv, shape) == tuple(conv(torch.zeros(1, *shape)).shape[1:])


# Properties over random valid configurations (float64: 1e-12 relative; weights bit for bit).


@st.composite
def linears(draw: st.DrawFn) -> tuple[Any, tuple[int, ...]]:
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=2, max_size=4)))
    linear = make_linear(math.prod(shape), draw(st.integers(1, 5)), torch.float64, draw(st.booleans()),
                         seed=draw(st.integers(0, 99)))
    return linear, shape


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(linears(), st.booleans())
def test_property_linear_conversions(config: tuple[Any, tuple[int, ...]], share: bool) -> None:
    linear, shape = config
    check_linear_to_conv(linear, shape, share)
    check_linear_to_pointwise(linear, len(shape) - 1, share)


@st.composite
def convs(draw: st.DrawFn) -> tuple[Any, tuple[int, ...]]:
    ndim = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 2))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    dims = st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim).map(tuple)
    kernel, stride, dilation = draw(dims), draw(dims), draw(dims)
    spatial = tuple(draw(st.integers(d * (k - 1) + 1, d * (k - 1) + 4)) for k, d in zip(kernel, dilation))
    assume(c_in * math.prod(spatial) <= 200)  # small matrices: the property, not the size, is tested
    bias = draw(st.booleans())
    seed = draw(st.integers(0, 99))
    if draw(st.booleans()):
        padding = draw(st.lists(st.integers(0, 2), min_size=ndim, max_size=ndim).map(tuple))
        out_pad = tuple(draw(st.integers(0, max(s, d) - 1)) for s, d in zip(stride, dilation))
        conv = make_conv(TRANSPOSED[ndim], c_in, c_out, kernel, torch.float64, seed, stride=stride,
                         padding=padding, output_padding=out_pad, dilation=dilation, groups=groups, bias=bias)
    else:
        mode = draw(st.sampled_from(("zeros", "reflect", "replicate", "circular")))
        padding = tuple(draw(st.integers(0, min(2, s - 1))) for s in spatial)  # valid for every mode
        conv = make_conv(CONVS[ndim], c_in, c_out, kernel, torch.float64, seed, stride=stride,
                         padding=padding, dilation=dilation, groups=groups, bias=bias, padding_mode=mode)
    return conv, (c_in, *spatial)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(convs())
def test_property_conv_to_linear(config: tuple[Any, tuple[int, ...]]) -> None:
    conv, shape = config
    try:
        expected_shape = tuple(conv(torch.zeros(1, *shape, dtype=torch.float64)).shape[1:])
    except RuntimeError:
        with pytest.raises(FcconvError):
            conv_output_shape(conv, shape)
        return
    assert conv_output_shape(conv, shape) == expected_shape
    assert torch.equal(conv_matrix(conv, shape), jacobian(conv, shape))
    check_conv_to_linear(conv, shape)
