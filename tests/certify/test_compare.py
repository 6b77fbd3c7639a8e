"""Tests of fcconv.certify.compare: compare and assert_equivalent catch mistakes and pass conversions."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fcconv.certify import FLOAT64_RTOL, assert_equivalent, compare
from fcconv.errors import FcconvError, NotEquivalentError
from fcconv.layers import conv_to_linear, linear_to_conv, linear_to_pointwise, pointwise_to_linear

torch.manual_seed(0)


def flat_to(shape):
    return lambda x: x.reshape(-1, *shape)


def snapshot(module: nn.Module) -> dict:
    """Everything compare must leave alone: values (bit for bit), dtype, requires_grad, .grad, modes."""
    return {
        "tensors": {k: (v.detach().clone(), v.dtype, v.requires_grad, v.grad)
                    for k, v in {**dict(module.named_parameters()), **dict(module.named_buffers())}.items()},
        "training": [m.training for m in module.modules()],
    }


def assert_unchanged(module: nn.Module, before: dict) -> None:
    after = snapshot(module)
    assert after["training"] == before["training"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for name, (value, dtype, requires_grad, grad) in before["tensors"].items():
        now, now_dtype, now_requires_grad, now_grad = after["tensors"][name]
        assert now_dtype == dtype, name
        assert now_requires_grad == requires_grad, name
        assert grad is None and now_grad is None, name
        assert torch.equal(now.view(torch.uint8) if now.dtype == torch.bool else now, value), name


# ------------------------------------------------------------------------------------------------
# The classic mistakes are caught
# ------------------------------------------------------------------------------------------------

SHAPE = (3, 4, 4)
N_IN = 3 * 4 * 4


@pytest.fixture(scope="module")
def layer() -> nn.Linear:
    torch.manual_seed(1)
    return nn.Linear(N_IN, 7)


def test_correct_conversion_is_equivalent(layer):
    report = compare(layer, linear_to_conv(layer, SHAPE), (N_IN,), input_map=flat_to(SHAPE), grad=True)
    assert report.equivalent, report.reason
    assert report.bound_ok is True
    assert report.output_agreement.float64_max_rel <= FLOAT64_RTOL
    assert report.gradient_agreement is not None and report.gradient_agreement.per_sample == N_IN
    assert report.reason.startswith("same function")


def test_one_weight_changed_by_1e4_relative(layer):
    conv = linear_to_conv(layer, SHAPE)
    idx = (5, 1, 2, 3)
    with torch.no_grad():
        conv.weight[idx] *= 1 + 1e-4
    report = compare(layer, conv, (N_IN,), input_map=flat_to(SHAPE))
    assert not report.equivalent
    # It hides inside float32 noise (the differences are a few ULP, within the rounding bound)...
    assert report.max_rel < 1e-4 and report.output_agreement.bound_ok
    # ...but not in float64, and the report points at the output that uses the weight.
    assert report.float64_max_rel > 1e3 * FLOAT64_RTOL
    assert report.output_agreement.float64_worst.index == (5,)
    assert "not the same function" in report.reason and "element (5,)" in report.reason


def test_whole_weight_changed_by_1e4_relative(layer):
    conv = linear_to_conv(layer, SHAPE)
    with torch.no_grad():
        conv.weight *= 1 + 1e-4
    report = compare(layer, conv, (N_IN,), input_map=flat_to(SHAPE))
    assert not report.equivalent
    assert report.float64_max_rel > 1e-6


def test_channels_last_flatten_order_is_caught(layer):
    # The Linear reads a CNN feature map flattened in NCHW order; a conv built as if it were NHWC
    # permutes the weights.
    reference = nn.Sequential(nn.Flatten(), layer)
    c, h, w = SHAPE
    wrong = nn.Conv2d(c, 7, (h, w))
    with torch.no_grad():
        wrong.weight.copy_(layer.weight.reshape(7, h, w, c).permute(0, 3, 1, 2))
        wrong.bias.copy_(layer.bias)
    right = linear_to_conv(layer, SHAPE)
    assert compare(reference, right, SHAPE).equivalent
    report = compare(reference, wrong, SHAPE)
    assert not report.equivalent
    assert report.float64_max_rel > 1e-3
    assert "largest difference at batch" in report.reason


def test_transposed_kernel_is_caught(layer):
    conv = linear_to_conv(layer, SHAPE)
    with torch.no_grad():
        conv.weight.copy_(conv.weight.transpose(-1, -2).clone())
    report = compare(layer, conv, (N_IN,), input_map=flat_to(SHAPE))
    assert not report.equivalent and report.float64_max_rel > 1e-3


def test_missing_bias_is_caught_and_named(layer):
    conv = linear_to_conv(layer, SHAPE)
    conv.bias = None
    report = compare(layer, conv, (N_IN,), input_map=flat_to(SHAPE))
    assert not report.equivalent
    assert "constant offset" in report.reason and "bias" in report.reason


def test_output_layout_difference_is_named():
    lin = nn.Linear(4, 6)
    swapped = copy.deepcopy(lin)
    with torch.no_grad():
        swapped.weight.copy_(lin.weight.flip(0))
        swapped.bias.copy_(lin.bias.flip(0))
    report = compare(lin, swapped, (4,))
    assert not report.equivalent and "another order" in report.reason
    assert compare(lin, swapped, (4,), output_map=lambda y: y.flip(1)).equivalent


def test_gradients_that_differ_alone_are_caught():
    class DoubledGradient(nn.Module):
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(2 * x - x.detach())  # the same values, twice the gradient

    lin = nn.Linear(5, 3)
    report = compare(lin, DoubledGradient(lin), (5,), grad=True)
    assert report.output_agreement.float64_ok and not report.gradient_agreement.float64_ok
    assert not report.equivalent and "input gradients differ" in report.reason


# ------------------------------------------------------------------------------------------------
# Every correct conversion passes, with no tolerance to tune
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 4), (2, 2, 3, 2)])
def test_linear_to_conv_all_ranks_with_gradients(shape):
    n = math.prod(shape)
    lin = nn.Linear(n, 4)
    report = compare(lin, linear_to_conv(lin, shape), (n,), input_map=flat_to(shape), grad=True)
    assert report.equivalent and report.bound_ok, report


@pytest.mark.parametrize(("conv", "shape"), [
    (nn.Conv2d(2, 3, 3, padding=1), (2, 5, 5)),
    (nn.Conv2d(4, 6, 3, stride=2, dilation=1, groups=2), (4, 7, 6)),
    (nn.Conv1d(2, 3, 3, dilation=2, padding=2, bias=False), (2, 9)),
    (nn.Conv3d(1, 2, 2, stride=(1, 2, 1)), (1, 3, 4, 3)),
    (nn.ConvTranspose2d(2, 3, 3, stride=2), (2, 3, 3)),
])
def test_conv_to_linear_is_equivalent(conv, shape):
    lin = conv_to_linear(conv, shape)
    report = compare(conv, lin, shape, input_map=lambda x: x.flatten(1), grad=True)
    assert report.equivalent and report.bound_ok, report
    assert report.output_agreement.bound_single_layer


def test_pointwise_round_trip_with_maps():
    lin = nn.Linear(4, 3)
    conv = linear_to_pointwise(lin, ndim=1)
    # The Linear works on (N, L, 4); the conv on (N, 4, L).
    report = compare(lin, conv, (5, 4), input_map=lambda x: x.transpose(1, 2),
                     output_map=lambda y: y.transpose(1, 2), grad=True)
    assert report.equivalent and report.bound_ok
    back = pointwise_to_linear(conv)
    assert compare(lin, back, (5, 4)).bit_identical_fraction == 1.0


def test_folded_padding_needs_parameter_rounding():
    # conv_to_linear sums the taps that reflect padding folds onto one input: the Linear's weights
    # are rounded sums, so in float64 it is not exactly the conv, by about one float32 rounding.
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
    lin = conv_to_linear(conv, (2, 4, 4))
    strict = compare(conv, lin, (2, 4, 4), input_map=lambda x: x.flatten(1))
    assert not strict.equivalent and "parameter_rounding=True" in strict.reason
    assert strict.float64_max_rel < 1e3 * torch.finfo(torch.float32).eps
    relaxed = compare(conv, lin, (2, 4, 4), input_map=lambda x: x.flatten(1), parameter_rounding=True)
    assert relaxed.equivalent and relaxed.parameter_rounding
    # In float64 the same conversion is exact enough for the strict verdict.
    conv64 = copy.deepcopy(conv).double()
    assert compare(conv64, conv_to_linear(conv64, (2, 4, 4)), (2, 4, 4),
                   input_map=lambda x: x.flatten(1)).equivalent


def test_cancelling_outputs_pass_within_the_single_layer_bound():
    # A zero-sum kernel on a flat input: the exact outputs are ~0, both float64 results are pure
    # rounding, so their relative difference exceeds 1e-10, yet lies within float64's rounding bound.
    torch.manual_seed(7)
    conv = nn.Conv2d(16, 2, 3, bias=False)
    with torch.no_grad():
        conv.weight -= conv.weight.mean((1, 2, 3), keepdim=True)
    lin = conv_to_linear(conv, (16, 5, 5))
    x = torch.full((2, 16, 5, 5), 0.37)
    x[1] = -3.1
    report = compare(conv, lin, inputs=x, input_map=lambda x: x.flatten(1))
    assert report.float64_max_rel > FLOAT64_RTOL
    assert report.output_agreement.float64_bound_ratio <= 1 and report.output_agreement.bound_single_layer
    assert report.equivalent and "within the float64 rounding bound of this single layer" in report.reason
    assert report.max_rel > 0.1 and report.bound_ok  # float32 max_rel alone would be alarming


def test_parameter_rounding_does_not_hide_real_mistakes(layer):
    conv = linear_to_conv(layer, SHAPE)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] *= 1 + 1e-2
    assert not compare(layer, conv, (N_IN,), input_map=flat_to(SHAPE), parameter_rounding=True).equivalent


def test_multilayer_linear_relu_linear_vs_its_conv_version():
    torch.manual_seed(4)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(2 * 3 * 3, 16), nn.ReLU(), nn.Linear(16, 5), nn.Softmax(1))
    fcn = nn.Sequential(linear_to_conv(mlp[1], (2, 3, 3)), nn.ReLU(), linear_to_pointwise(mlp[3]),
                        nn.Flatten(), nn.Softmax(1))
    report = compare(mlp, fcn, (2, 3, 3), grad=True)
    assert report.equivalent and report.bound_ok, report
    assert report.unsupported is None
    assert report.output_agreement.bound_single_layer is False  # two dot products: a compounded bound


def test_small_cnn_vs_itself_with_another_conv_algorithm():
    torch.manual_seed(5)
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                        nn.MaxPool2d(2), nn.Conv2d(8, 8, 3, padding=1), nn.GELU(), nn.AdaptiveAvgPool2d(1),
                        nn.Flatten(), nn.Linear(8, 10)).eval()
    with torch.no_grad():
        cnn[1].running_mean.uniform_(-1, 1)
        cnn[1].running_var.uniform_(0.5, 2)
    other = copy.deepcopy(cnn).to(memory_format=torch.channels_last)  # channels-last kernels
    before = snapshot(cnn)
    report = compare(cnn, other, (3, 8, 8), grad=True)
    assert report.equivalent and report.bound_ok is True and report.unsupported is None, report
    assert_unchanged(cnn, before)


@settings(max_examples=10, deadline=None)
@given(c=st.integers(1, 3), h=st.integers(1, 4), w=st.integers(1, 4), out=st.integers(1, 5),
       seed=st.integers(0, 2**16))
def test_random_linear_to_conv_always_within_bound(c, h, w, out, seed):
    torch.manual_seed(seed)
    lin = nn.Linear(c * h * w, out)
    report = compare(lin, linear_to_conv(lin, (c, h, w)), (c * h * w,), input_map=flat_to((c, h, w)),
                     seed=seed)
    assert report.equivalent and report.bound_ok


# ------------------------------------------------------------------------------------------------
# VGG16's fc6, Linear(25088, 4096), as Conv2d(512, 4096, 7), in three dtypes
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fc6() -> nn.Linear:
    torch.manual_seed(6)
    lin = nn.Linear(25088, 4096, device="meta").to_empty(device="cpu")
    bound = 1 / math.sqrt(25088)
    with torch.no_grad():
        lin.weight.uniform_(-bound, bound)
        lin.bias.uniform_(-bound, bound)
    return lin


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_vgg16_fc6_as_7x7_conv(fc6, dtype):
    lin = fc6 if dtype == torch.float32 else copy.deepcopy(fc6).to(dtype)
    conv = linear_to_conv(lin, (512, 7, 7), share_weights=True)
    report = compare(lin, conv, (25088,), input_map=flat_to((512, 7, 7)))
    assert report.equivalent, report
    assert report.bound_ok is True and report.output_agreement.bound_single_layer
    assert report.dtype == dtype and report.num_compared == 8 * 4096
    if dtype == torch.float32:
        assert report.bit_identical_fraction < 0.5  # == fails for most outputs
    assert lin.weight.dtype == dtype and conv.weight.dtype == dtype


@pytest.mark.slow
def test_vgg16_fc6_one_weight_off_by_1e4(fc6):
    conv = linear_to_conv(fc6, (512, 7, 7))
    with torch.no_grad():
        conv.weight[100, 3, 2, 1] *= 1 + 1e-4
    x = torch.randn(2, 25088, generator=torch.Generator().manual_seed(0))
    off = compare(fc6, conv, inputs=x, input_map=flat_to((512, 7, 7)))
    # The change hides inside float32 noise: float32 differences of the size rounding makes...
    assert off.max_rel < 1e-5 and off.bound_ok is True
    # ...but not in float64, which points at the output that uses the weight.
    assert not off.equivalent and off.float64_max_rel > 100 * FLOAT64_RTOL
    assert off.output_agreement.float64_worst.index == (100,)


# ------------------------------------------------------------------------------------------------
# Working precision: the bound catches lower-precision arithmetic
# ------------------------------------------------------------------------------------------------


class LowPrecisionLinear(nn.Linear):
    """Computes in bfloat16 when given float32, as an autocast region or a TF32 kernel would."""

    def forward(self, x):
        if x.dtype == torch.float32:
            low = torch.bfloat16
            return nn.functional.linear(x.to(low), self.weight.to(low), self.bias.to(low)).float()
        return super().forward(x)


def test_bound_catches_lower_precision_arithmetic():
    lin = nn.Linear(32, 8)
    low = LowPrecisionLinear(32, 8)
    low.load_state_dict(lin.state_dict())
    report = compare(lin, low, (32,))
    assert report.equivalent  # in float64 both are the same function...
    assert report.bound_ok is False  # ...but the float32 differences are not float32 rounding
    assert "exceed what rounding allows" in report.reason
    assert report.output_agreement.bound_worst is not None


def test_unsupported_op_falls_back_to_the_threshold():
    class Cumulative(nn.Module):
        def forward(self, x):
            return torch.cumsum(x, 1)

    report = compare(Cumulative(), Cumulative(), (5,))
    assert report.equivalent and report.bound_ok is None
    assert report.unsupported == "aten.cumsum"
    assert "no rounding bound" in str(report)


# ------------------------------------------------------------------------------------------------
# Modules come back as they were
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("train", [False, True])
def test_modules_unchanged(train):
    ref = nn.Sequential(nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 3)).train(train)
    cand = nn.Sequential(linear_to_conv(ref[0], (3, 2, 2)), nn.Tanh(), linear_to_pointwise(ref[2]),
                         nn.Flatten()).train(train)
    ref[2].bias.requires_grad_(False)
    cand[0].weight.requires_grad_(False)
    before_ref, before_cand = snapshot(ref), snapshot(cand)
    report = compare(ref, cand, (12,), input_map=flat_to((3, 2, 2)), grad=True)
    assert report.equivalent
    assert_unchanged(ref, before_ref)
    assert_unchanged(cand, before_cand)


def test_batch_norm_statistics_unchanged_in_eval():
    bn = nn.Sequential(nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3)).eval()
    before = snapshot(bn)
    assert compare(bn, copy.deepcopy(bn), (2, 3, 3), grad=True).equivalent
    assert_unchanged(bn, before)


# ------------------------------------------------------------------------------------------------
# Inputs and outputs
# ------------------------------------------------------------------------------------------------


def test_tensor_inputs_keep_their_dtype_and_shapes_use_the_modules_dtype():
    lin = nn.Linear(3, 2).double()
    report = compare(lin, copy.deepcopy(lin), inputs=[torch.randn(2, 3, dtype=torch.float64),
                                               torch.randn(5, 3, dtype=torch.float64)])
    assert report.dtype == torch.float64 and report.batches == 2 and report.samples == 7
    half = nn.Linear(3, 2).to(torch.bfloat16)
    shaped = compare(half, copy.deepcopy(half), 3)  # an int is the per-sample shape (3,)
    assert shaped.dtype == torch.bfloat16 and shaped.batches == 4 and shaped.samples == 8


def test_generated_inputs_are_seeded():
    lin = nn.Linear(6, 3)
    conv = linear_to_conv(lin, (6, 1))
    with torch.no_grad():
        conv.weight *= 1.01  # differences that depend on the inputs (a correct conv may give none)
    a = compare(lin, conv, (6,), input_map=flat_to((6, 1)), seed=1)
    assert a == compare(lin, conv, (6,), input_map=flat_to((6, 1)), seed=1)
    other = compare(lin, conv, (6,), input_map=flat_to((6, 1)), seed=2)
    assert other != a  # other inputs, other numbers



# ------------------------------------------------------------------------------------------------
# assert_equivalent and errors
# ------------------------------------------------------------------------------------------------


def test_assert_equivalent(layer):
    conv = linear_to_conv(layer, SHAPE)
    report = assert_equivalent(layer, conv, (N_IN,), input_map=flat_to(SHAPE))
    assert report.equivalent
    conv.bias = None
    with pytest.raises(NotEquivalentError) as info:
        assert_equivalent(layer, conv, (N_IN,), input_map=flat_to(SHAPE))
    message = str(info.value)
    assert "NOT EQUIVALENT: not the same function" in message and "max abs difference" in message


def test_mismatched_output_sizes():
    with pytest.raises(NotEquivalentError, match=r"The outputs cannot be compared element by element: "
                                                 r"the reference gives \(2, 3\) .* candidate \(2, 4\)"):
        compare(nn.Linear(5, 3), nn.Linear(5, 4), (5,))
    with pytest.raises(NotEquivalentError, match="output_map"):
        compare(nn.Linear(5, 3), nn.Linear(5, 4), (5,))


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    ((torch.zeros(3), nn.Linear(3, 2), (3,)), {}, "compare expects the reference to be a torch.nn.Module"),
    ((nn.Linear(3, 2), "conv", (3,)), {}, "compare expects the candidate to be a torch.nn.Module"),
    ((nn.Linear(3, 2), nn.Linear(3, 2), "x"), {}, "input_shape must be a per-sample shape"),
    ((nn.Linear(3, 2), nn.Linear(3, 2), (3, 0)), {}, "input_shape sizes must be positive"),
    ((nn.Linear(3, 2), nn.Linear(3, 2), torch.zeros(2, 3)), {}, "input_shape is the reference's per-sample"),
    ((nn.Linear(3, 2), nn.Linear(3, 2)), {"inputs": torch.zeros(0, 3)}, "Input batch 0 has shape"),
    ((nn.Linear(3, 2), nn.Linear(3, 2)), {"inputs": (3,)}, "inputs must be a batch tensor"),
    ((nn.Linear(3, 2), nn.Linear(3, 2), (3,)), {"inputs": torch.zeros(2, 3)}, "compare takes either"),
    ((nn.Linear(3, 2), nn.Linear(3, 2)), {}, "compare needs inputs"),
    ((nn.Linear(3, 2), nn.Linear(3, 2), (3,)), {"input_map": 3}, "input_map must be a callable"),
    ((nn.Linear(3, 2), nn.Linear(3, 2), (3,)), {"output_map": 3}, "output_map must be a callable"),
    ((nn.Linear(3, 2), nn.Linear(3, 2), (3,)), {"seed": 1.5}, "seed must be an int"),
    ((nn.Linear(3, 2), nn.Conv2d(1, 2, 2), (3,)), {}, "Running the candidate .Conv2d. on an input of shape"),
    ((nn.Linear(3, 2), nn.Linear(4, 2), (4,)), {}, "Running the reference .Linear."),
    ((nn.LSTM(3, 2), nn.LSTM(3, 2), (1, 3)), {}, "The reference returned tuple"),
])
def test_bad_arguments(args, kwargs, message):
    with pytest.raises(FcconvError, match=message):
        compare(*args, **kwargs)


def test_candidate_run_failure_suggests_input_map():
    with pytest.raises(FcconvError, match="pass input_map"):
        compare(nn.Linear(4, 2), nn.Conv2d(1, 2, 2), (4,))


@pytest.mark.parametrize("layer_type", [nn.Dropout, nn.BatchNorm1d])
def test_training_mode_with_stochastic_layers_is_refused(layer_type):
    model = nn.Sequential(nn.Linear(4, 4), layer_type(4) if layer_type is nn.BatchNorm1d else layer_type())
    before = snapshot(model)
    with pytest.raises(FcconvError, match=r"The reference is in training mode and contains .* at '1'.*"
                                          r"call reference.eval\(\) first"):
        compare(model, copy.deepcopy(model).eval(), (4,))
    assert_unchanged(model, before)
    assert compare(model.eval(), copy.deepcopy(model).eval(), (4,)).equivalent


def test_integer_outputs_are_refused():
    class Argmax(nn.Module):
        def forward(self, x):
            return x.argmax(1, keepdim=True)

    with pytest.raises(FcconvError, match="Compare the logits"):
        compare(Argmax(), Argmax(), (4,))


def test_division_by_an_integer_tensor_keeps_the_bound() -> None:
    class ScaledLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x) / torch.tensor([2, 3])

    model = ScaledLinear()
    report = compare(model, model, (4,))
    assert report.unsupported is None
    assert report.bound_ok is True
    assert report.equivalent


def test_certify_uses_no_other_part_of_fcconv() -> None:
    # certify is used by models, layers, the CLI and the demo, and uses none of them.
    import ast
    from pathlib import Path

    import fcconv.certify

    allowed = ("fcconv.certify", "fcconv.errors", "fcconv._shapes")
    root = Path(fcconv.certify.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                if name.startswith("fcconv"):
                    assert name.startswith(allowed), f"{path.name} imports {name}"


def test_positional_input_shape_and_keyword_inputs_agree() -> None:
    lin = nn.Linear(4, 2)
    by_shape = compare(lin, copy.deepcopy(lin), (4,))
    assert by_shape == compare(lin, copy.deepcopy(lin), input_shape=(4,)) and by_shape.batches == 4
    x = torch.randn(3, 4)
    assert compare(lin, copy.deepcopy(lin), inputs=x).samples == 3
    with pytest.raises(FcconvError, match=r"input_shape is the reference's per-sample input shape.*inputs=x"):
        compare(lin, copy.deepcopy(lin), x)
