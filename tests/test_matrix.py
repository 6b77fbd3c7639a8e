"""Tests of fcconv.matrix: the exact matrix of a convolution, built from the kernel.

The reference is autograd: the matrix of the linear map ``x -> conv(x)`` is its Jacobian, which
``torch.func.jacrev`` computes by differentiating the conv. In float64 every entry must be equal, bit
for bit: under zero padding an entry is one weight times one (exact), and under folded padding modes
conv_weight_matrix adds the taps in the order of the padding's backward.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from fcconv.certify import assert_equivalent
from fcconv.errors import FcconvError
from fcconv.matrix import (
    conv_bias_vector,
    conv_geometry,
    conv_matrix_nnz,
    conv_weight_matrix,
)

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Using padding=.same. with even kernel:UserWarning"),
    pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning"),  # inside torch.func
]


CONVS: dict[int, Any] = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
MODES = ("zeros", "reflect", "replicate", "circular")
# Small shapes per spatial rank: odd and even sizes, a kernel that is not square.
SPATIAL = {1: (7,), 2: (5, 6), 3: (3, 5, 3)}
KERNEL = {1: (3,), 2: (3, 2), 3: (2, 3, 2)}


def make_conv(ndim: int, c_in: int, c_out: int, kernel: tuple[int, ...], dtype: torch.dtype = torch.float64,
              seed: int = 0, **kwargs: Any) -> Any:
    torch.manual_seed(seed)
    return CONVS[ndim](c_in, c_out, kernel, **kwargs).to(dtype)


def matrix_of(conv: Any, spatial: tuple[int, ...], layout: str = "dense") -> Tensor:
    return conv_weight_matrix(
        conv.weight, spatial, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
        groups=conv.groups, padding_mode=conv.padding_mode, layout=layout,
    )


def jacobian(conv: Any, input_shape: tuple[int, ...]) -> Tensor:
    """The conv's matrix by reverse-mode autodiff: d conv(x).flatten() / d x.flatten()."""
    x = torch.zeros(math.prod(input_shape), dtype=conv.weight.dtype)
    with torch.no_grad():
        return torch.func.jacrev(lambda v: conv(v.view(1, *input_shape)).flatten())(x)


def check_exact(conv: Any, input_shape: tuple[int, ...]) -> Tensor:
    """conv_weight_matrix equals the Jacobian bit for bit, in every layout, and reproduces the conv."""
    dense = matrix_of(conv, input_shape[1:])
    expected = jacobian(conv, input_shape)
    assert dense.shape == expected.shape
    assert dense.dtype == conv.weight.dtype and not dense.requires_grad
    assert torch.equal(dense, expected)
    csr = matrix_of(conv, input_shape[1:], "csr")
    coo = matrix_of(conv, input_shape[1:], "coo")
    assert csr.layout == torch.sparse_csr and coo.layout == torch.sparse_coo and coo.is_coalesced()
    assert torch.equal(csr.to_dense(), dense)
    assert torch.equal(coo.to_dense(), dense)
    geom = conv_geometry(input_shape[1:], conv.kernel_size, stride=conv.stride, padding=conv.padding,
                         dilation=conv.dilation)
    nnz = conv_matrix_nnz(geom, conv.padding_mode, c_out=conv.out_channels,
                          c_in_per_group=conv.weight.shape[1])
    assert csr._nnz() == coo._nnz() == nnz  # memory proportional to the structural nonzeros
    # And the matrix is the conv: x -> M x + b is the same function, certified by compare.
    assert_equivalent(conv, as_linear(dense, conv, geom.out_spatial), input_shape,
                      input_map=lambda v: v.flatten(1))
    return dense


def as_linear(matrix: Tensor, conv: Any, out_spatial: tuple[int, ...]) -> nn.Linear:
    """The Linear ``x -> M x + b`` of a conv's matrix, ``b`` its bias repeated over positions."""
    linear = nn.Linear(matrix.shape[1], matrix.shape[0], bias=conv.bias is not None, dtype=matrix.dtype)
    with torch.no_grad():
        linear.weight.copy_(matrix)
        if conv.bias is not None:
            linear.bias.copy_(conv_bias_vector(conv.bias, out_spatial))
    return linear


# Grid: every padding mode x padding form x stride x dilation x groups x rank, with bias.
PADDINGS = (0, 1, 2, "same", "valid", "tuple")


@pytest.mark.parametrize("ndim", (1, 2, 3))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding", PADDINGS)
@pytest.mark.parametrize(("stride", "dilation", "groups"), [(1, 1, 1), (2, 1, 2), (1, 2, 1), (2, 2, 2)])
def test_grid_equals_jacrev(ndim: int, mode: str, padding: object, stride: int, dilation: int,
                            groups: int) -> None:
    spatial, kernel = SPATIAL[ndim], KERNEL[ndim]
    if padding == "same" and stride > 1:
        pytest.skip("PyTorch refuses padding='same' with stride > 1")
    if padding == "tuple":
        padding = tuple(range(ndim))  # a different padding per dim, 0 included
    conv = make_conv(ndim, 2 * groups, 2 * groups, kernel, stride=stride, padding=padding,
                     dilation=dilation, groups=groups, padding_mode=mode, bias=True)
    check_exact(conv, (2 * groups, *spatial))


@pytest.mark.parametrize("ndim", (1, 2, 3))
@pytest.mark.parametrize("bias", (True, False))
def test_zero_padding_entries_are_the_weights(ndim: int, bias: bool) -> None:
    # Under zero padding every nonzero is a weight, copied. The row of an output position whose
    # taps all read real inputs (position 1 on every axis, with padding 1) holds the whole kernel
    # of its channel, each weight once; every other row a part of it.
    conv = make_conv(ndim, 3, 4, KERNEL[ndim], padding=1, bias=bias)
    shape = (3, *SPATIAL[ndim])
    dense = check_exact(conv, shape)
    w = conv.weight.detach()
    out_spatial = conv(torch.zeros(1, *shape, dtype=torch.float64)).shape[2:]
    position = sum(math.prod(out_spatial[d + 1:]) for d in range(ndim))  # (1, ..., 1), flattened
    for co in range(4):
        row = dense[co * math.prod(out_spatial) + position]
        assert torch.equal(row[row != 0].sort().values, w[co].flatten().sort().values)
    assert set(dense[dense != 0].tolist()) <= set(w.flatten().tolist())


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
@pytest.mark.parametrize("mode", MODES)
def test_low_precision_dtypes(dtype: torch.dtype, mode: str) -> None:
    """float32 and bfloat16: the dtype is kept and the entries are the float64 matrix, rounded.

    Under zero padding (and any mode without padding) each entry is one weight, copied, so the
    low-precision matrix is exactly the float64 matrix of the same (rounded) weights. Under folded
    modes an entry is a sum of at most K = prod(kernel) weights, added in sequence in the low
    precision: the error of such a sum is at most (K - 1) * u * sum|w| (Higham, recursive
    summation) with u = eps / 2 the unit roundoff, bounded here by K * eps * sum|w|, where
    sum|w| is the entry of the matrix of |weight| in float64.
    """
    conv = make_conv(2, 2, 3, (3, 3), dtype=dtype, padding=2, padding_mode=mode)
    spatial = (5, 4)
    low = matrix_of(conv, spatial)
    assert low.dtype == dtype
    for layout in ("csr", "coo"):
        assert torch.equal(matrix_of(conv, spatial, layout).to_dense(), low)
    w64 = conv.weight.detach().double()
    kwargs = dict(padding=2, padding_mode=mode)
    exact = conv_weight_matrix(w64, spatial, **kwargs)  # type: ignore[arg-type]
    if mode == "zeros":
        assert torch.equal(low.double(), exact)
    else:
        bound = 9 * torch.finfo(dtype).eps * conv_weight_matrix(w64.abs(), spatial, **kwargs)  # type: ignore[arg-type]
        assert bool(((low.double() - exact).abs() <= bound).all())
    # And the low-precision matrix is the conv's function: certified by compare, allowing the summed
    # taps of folded modes their rounding (compare's parameter_rounding, made for them).
    out_spatial = conv_geometry(spatial, (3, 3), padding=2).out_spatial
    assert_equivalent(conv, as_linear(low, conv, out_spatial), (2, *spatial),
                      input_map=lambda v: v.flatten(1), parameter_rounding=mode != "zeros")


def test_groups_give_a_block_diagonal_matrix() -> None:
    # groups do not mix: the matrix is block-diagonal over the groups.
    conv = make_conv(2, 4, 6, (3, 3), groups=2, padding=1)
    m = check_exact(conv, (4, 4, 4)).view(2, 3 * 16, 2, 2 * 16)
    assert not m[0, :, 1].any() and not m[1, :, 0].any()


def test_stride_larger_than_kernel_skips_inputs() -> None:
    # stride 3 with kernel 2: the inputs between windows are never read, their columns are zero.
    conv = make_conv(1, 1, 1, (2,), stride=3, bias=False)
    m = check_exact(conv, (1, 8))
    assert m.shape == (3, 8)
    assert m.abs().sum(0).ne(0).tolist() == [True, True, False, True, True, False, True, True]


def test_circular_wraparound_sums_in_autograd_order() -> None:
    # Circular padding as large as the input: three taps of one row land on one input position.
    conv = make_conv(2, 1, 1, (5, 5), padding=(2, 2), padding_mode="circular", seed=3)
    m = check_exact(conv, (1, 2, 2))
    w = conv.weight.detach()[0, 0]
    # Output (0, 0) reads padded rows and cols 0..4; those of even index wrap onto input (0, 0):
    # nine taps, summed (in some order: within the bound of 9-term summation).
    taps = w[::2, ::2]
    assert abs(m[0, 0] - taps.sum()) <= 9 * torch.finfo(torch.float64).eps * taps.abs().sum()


@pytest.mark.parametrize(
    ("in_spatial", "kernel", "kwargs", "out", "left", "right"),
    [
        ((32, 32), (3, 3), dict(stride=2, padding=1), (16, 16), (1, 1), (1, 1)),
        ((10,), (4,), dict(padding="same"), (10,), (1,), (2,)),  # even span: extra pad at the end
        ((10,), (3,), dict(padding="same", dilation=3), (10,), (3,), (3,)),
        ((7, 7), (7, 7), dict(padding="valid"), (1, 1), (0, 0), (0, 0)),
        ((5, 6, 7), (1, 2, 3), dict(padding=(0, 1, 2), stride=(1, 2, 3)), (5, 4, 3), (0, 1, 2), (0, 1, 2)),
    ],
)
def test_conv_geometry(in_spatial: tuple[int, ...], kernel: tuple[int, ...], kwargs: dict,
                       out: tuple[int, ...], left: tuple[int, ...], right: tuple[int, ...]) -> None:
    geom = conv_geometry(in_spatial, kernel, **kwargs)
    assert (geom.out_spatial, geom.pad_left, geom.pad_right) == (out, left, right)
    conv = CONVS[len(in_spatial)](1, 1, kernel, **kwargs)
    assert conv(torch.zeros(1, 1, *in_spatial)).shape[2:] == out
    assert geom.single_position == all(o == 1 for o in out)


def test_conv_bias_vector() -> None:
    assert conv_bias_vector(torch.tensor([1.0, 2.0]), (1, 2)).tolist() == [1.0, 1.0, 2.0, 2.0]


# Bad input. Messages are matched from their start.


def test_kernel_larger_than_padded_input() -> None:
    conv_weight_matrix(torch.zeros(1, 1, 3, 3), (8, 3), padding=1, dilation=2)  # 3+1+1 = 5: fits
    with pytest.raises(FcconvError, match=r"^The kernel does not fit the input in spatial dim 1: expected "
                                          r"a padded input of at least dilation\*\(kernel_size-1\)\+1 = "
                                          r"2\*\(3-1\)\+1 = 5, got 2\+1\+1 = 4 for input spatial size "
                                          r"\(8, 2\)\."):
        conv_weight_matrix(torch.zeros(1, 1, 3, 3), (8, 2), padding=1, dilation=2)


@pytest.mark.parametrize(
    ("mode", "padding", "size", "message"),
    [
        ("reflect", 3, 3, r"^reflect padding needs padding < input size in every spatial dim; dim 1 has "
                          r"padding 3 and size 3\."),
        ("circular", 4, 3, r"^circular padding needs padding <= input size in every spatial dim; dim 1 has "
                           r"padding 4 and size 3\."),
    ],
)
def test_padding_mode_geometry(mode: str, padding: int, size: int, message: str) -> None:
    with pytest.raises(FcconvError, match=message):
        conv_weight_matrix(torch.zeros(1, 1, 1, 1), (9, size), padding=(0, padding), padding_mode=mode)
    with pytest.raises(RuntimeError):  # PyTorch refuses it too (in its own words)
        nn.Conv2d(1, 1, 1, padding=(0, padding), padding_mode=mode)(  # type: ignore[arg-type]
            torch.zeros(1, 1, 9, size))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(layout="bsr"), r"^layout must be one of 'dense', 'csr', 'coo'; got 'bsr'\."),
        (dict(padding_mode="mirror"), r"^padding_mode must be one of zeros, reflect, replicate, circular; "
                                      r"got 'mirror'\."),
        (dict(groups=3), r"^groups must divide the 4 output channels; got groups=3\."),
        (dict(padding="full"), r"^padding must be an int, a tuple, 'same' or 'valid'; got 'full'\."),
        (dict(stride=(1, 2, 3)), r"^stride must be 2 integer\(s\), one per spatial dim .*\(1, 2, 3\)\."),
    ],
)
def test_bad_arguments(kwargs: dict, message: str) -> None:
    with pytest.raises(FcconvError, match=message):
        conv_weight_matrix(torch.zeros(4, 1, 3, 3), (5, 5), **kwargs)


def test_bad_rank() -> None:
    with pytest.raises(FcconvError, match=r"^A kernel of shape \(4, 1, 3, 3\) needs an input with 2 spatial "
                                          r"dims; got spatial size \(5, 5, 5\)\."):
        conv_weight_matrix(torch.zeros(4, 1, 3, 3), (5, 5, 5))


# Properties over random valid configurations.


@st.composite
def conv_configs(draw: st.DrawFn) -> tuple[Any, tuple[int, ...]]:
    ndim = draw(st.integers(1, 3))
    groups = draw(st.integers(1, 3))
    c_in, c_out = groups * draw(st.integers(1, 2)), groups * draw(st.integers(1, 2))
    dims = st.lists(st.integers(1, 3), min_size=ndim, max_size=ndim).map(tuple)
    kernel, stride, dilation = draw(dims), draw(dims), draw(dims)
    mode = draw(st.sampled_from(MODES))
    padding = draw(st.one_of(st.integers(0, 3), st.sampled_from(["same", "valid"]),
                             st.lists(st.integers(0, 3), min_size=ndim, max_size=ndim).map(tuple)))
    if padding == "same":
        stride = (1,) * ndim
    largest = {1: 9, 2: 7, 3: 4}[ndim]  # small matrices: the property, not the size, is tested
    spatial = draw(st.lists(st.integers(1, largest), min_size=ndim, max_size=ndim).map(tuple))
    conv = make_conv(ndim, c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation,
                     groups=groups, padding_mode=mode, bias=draw(st.booleans()),
                     seed=draw(st.integers(0, 99)))
    return conv, (c_in, *spatial)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(conv_configs())
def test_property_equals_jacrev(config: tuple[Any, tuple[int, ...]]) -> None:
    conv, shape = config
    try:
        conv(torch.zeros(1, *shape, dtype=torch.float64))
    except RuntimeError:
        # PyTorch refuses this geometry: so must we, with our error.
        event("refused by PyTorch")
        with pytest.raises(FcconvError):
            matrix_of(conv, shape[1:])
        return
    event(f"padding_mode={conv.padding_mode}")
    check_exact(conv, shape)


def test_many_runs_of_taps() -> None:
    # A kernel much larger than the interior, zero padding: one write per tap near every border.
    conv = make_conv(2, 2, 2, (6, 5), padding=(5, 4), stride=(2, 1), dilation=(1, 2))
    check_exact(conv, (2, 4, 7))


def test_device_and_autograd() -> None:
    # The result lives where the weight lives and is detached from autograd.
    w = torch.randn(2, 1, 3, requires_grad=True, dtype=torch.float64)
    for layout in ("dense", "csr", "coo"):
        m = conv_weight_matrix(w, (5,), padding=1, layout=layout)
        assert m.device == w.device and m.dtype == w.dtype and not m.requires_grad
