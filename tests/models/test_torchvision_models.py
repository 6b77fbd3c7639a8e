"""convolutionalize on the torchvision classifiers of issue 4 (random weights, eval mode).

Each model is converted at a small training size where its head pooling still pools a map larger
than 1x1 (224 for alexnet and vgg, whose adaptive pooling is the identity only there), compared
with the original in float64, and run on a larger non-square input in float32.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fcconv.models import UnfoldConv2d, convolutionalize

tvm = pytest.importorskip("torchvision.models")
pytestmark = pytest.mark.slow  # whole torchvision models: make test-fast skips them

# (name, training size, builder keyword arguments)
MODELS = [
    ("alexnet", 224, {}),
    ("vgg11", 224, {}),
    ("vgg16_bn", 224, {}),
    ("resnet18", 48, {}),
    ("resnet50", 48, {}),
    ("densenet121", 64, {}),
    ("mobilenet_v2", 48, {}),
    ("mobilenet_v3_small", 48, {}),
    ("efficientnet_b0", 48, {}),
    ("regnet_y_400mf", 48, {}),
    ("convnext_tiny", 64, {}),
    ("squeezenet1_1", 48, {}),
    ("shufflenet_v2_x0_5", 48, {}),
    ("mnasnet0_5", 48, {}),
    ("googlenet", 48, {"aux_logits": False, "init_weights": False}),
]
SE_MODELS = {"mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf"}


def build(name: str, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    model = getattr(tvm, name)(weights=None, **kwargs).eval()
    for m in model.modules():  # non-trivial statistics, so that mistakes in BatchNorm show
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def global_pools(gm: fx.GraphModule) -> int:
    """Adaptive poolings and means/amaxes over dims 2 and 3 in a graph."""
    adaptive_functions = (F.adaptive_avg_pool2d, F.adaptive_max_pool2d, torch.mean, torch.amax)
    count = 0
    for node in gm.graph.nodes:
        if node.op == "call_module":
            count += isinstance(gm.get_submodule(node.target),
                                (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d))
        else:
            count += (node.op == "call_function" and node.target in adaptive_functions) or (
                node.op == "call_method" and node.target in ("mean", "amax"))
    return count


@pytest.mark.parametrize(("name", "size", "kwargs"), MODELS, ids=[m[0] for m in MODELS])
def test_torchvision_model(name: str, size: int, kwargs: dict) -> None:
    model = build(name, **kwargs)
    original_types = [type(m) for m in model.modules()]
    pools_before = global_pools(fx.symbolic_trace(model))
    fcn = convolutionalize(model, (3, size, size))

    # structure: the head pooling is gone or pools with stride 1, squeeze-excitation pools stay,
    # no Linear left but convnext's per-position block Linears (on channels-last maps)
    gm = fcn.graph_module
    assert global_pools(gm) == pools_before - 1
    if name in SE_MODELS:
        assert global_pools(gm) > 0
    linears = [n for n, m in gm.named_modules() if isinstance(m, nn.Linear)]
    assert all(name == "convnext_tiny" and ".block." in n for n in linears), linears
    stride_one_pools = [m for m in gm.modules() if isinstance(m, (nn.AvgPool2d, nn.MaxPool2d))
                        and m.stride in (1, (1, 1)) and m.padding in (0, (0, 0))]
    assert len(stride_one_pools) == (0 if name in ("alexnet", "vgg11", "vgg16_bn") else 1)
    assert fcn.stride == ((16, 16) if name == "squeezenet1_1" else (32, 32))
    assert fcn.window == (size, size) and not fcn.exact_sliding_window
    assert [type(m) for m in model.modules()] == original_types  # the source is untouched

    # outputs: equal to the original at the training size, in float64
    model64, fcn64 = model.double(), fcn.double()
    x = torch.randn(1, 3, size, size, dtype=torch.float64)
    with torch.no_grad():
        expected, got = model64(x), fcn64(x)
    assert got.shape == (1, 1000, 1, 1)
    torch.testing.assert_close(got.flatten(1), expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item())

    # a larger, non-square input gives a grid_shape map
    spatial = (size + fcn.stride[0] + 3, size + 2 * fcn.stride[1] + 5)
    with torch.no_grad():
        out = fcn.float()(torch.randn(1, 3, *spatial))
    assert out.shape == (1, 1000, *fcn.grid_shape(spatial))
    assert out.shape[2:] == (2, 3) or out.shape[2:] == (3, 4)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(("name", "size"), [("resnet18", 48), ("mobilenet_v3_small", 48), ("alexnet", 224)])
def test_float32_error_within_the_models_own(name: str, size: int) -> None:
    """In float32 the converted model is as close to the float64 truth as the original is."""
    model = build(name)
    fcn = convolutionalize(model, (3, size, size))
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        original32, converted32 = model(x), fcn(x).flatten(1)
        reference = model.double()(x.double())
    own = (original32.double() - reference).abs().max().item()
    eps = torch.finfo(torch.float32).eps
    bound = 2 * own + 4 * eps * reference.abs().max().item()
    assert (converted32.double() - reference).abs().max().item() <= bound


def test_alexnet_conv_and_matmul_heads_are_equivalent() -> None:
    model = build("alexnet").double()
    x = torch.randn(1, 3, 224, 224, dtype=torch.float64)
    fcn_conv = convolutionalize(model, (3, 224, 224), head_impl="conv")
    fcn_matmul = convolutionalize(model, (3, 224, 224), head_impl="matmul")
    head_conv = fcn_conv.graph_module.get_submodule("classifier.1")
    head_matmul = fcn_matmul.graph_module.get_submodule("classifier.1")
    assert type(head_conv) is nn.Conv2d and head_conv.kernel_size == (6, 6)
    assert isinstance(head_matmul, UnfoldConv2d) and head_matmul.method == "matmul"
    with torch.no_grad():
        expected = model(x)
        for fcn in (fcn_conv, fcn_matmul):
            torch.testing.assert_close(fcn(x).flatten(1), expected, rtol=1e-12, atol=1e-12)
        bigger = torch.randn(1, 3, 256, 288, dtype=torch.float64)
        torch.testing.assert_close(fcn_conv(bigger), fcn_matmul(bigger), rtol=1e-12, atol=1e-12)


def test_resnet18_geometry_at_224() -> None:
    fcn = convolutionalize(build("resnet18"), (3, 224, 224))
    assert fcn.stride == (32, 32) and fcn.window == (224, 224) and fcn.min_size == (193, 193)
    assert fcn.grid_shape((448, 448)) == (8, 8)
    assert fcn.grid_shape((450, 320)) == (9, 4)
    assert fcn.window_of((1, 2)) == (32, 64, 256, 288)
    pool = fcn.graph_module.avgpool
    assert isinstance(pool, nn.AvgPool2d) and pool.kernel_size == (7, 7) and pool.stride == 1
    assert isinstance(fcn.graph_module.fc, nn.Conv2d) and fcn.graph_module.fc.kernel_size == (1, 1)


def test_vgg11_geometry_and_head_at_224() -> None:
    fcn = convolutionalize(build("vgg11"), (3, 224, 224))
    gm = fcn.graph_module
    first, second = gm.get_submodule("classifier.0"), gm.get_submodule("classifier.3")
    assert isinstance(first, UnfoldConv2d) and first.kernel_size == (7, 7) and first.method == "auto"
    assert isinstance(second, UnfoldConv2d) and second.kernel_size == (1, 1)
    conv_head = convolutionalize(build("vgg11"), (3, 224, 224), head_impl="conv").graph_module
    assert type(conv_head.get_submodule("classifier.0")) is nn.Conv2d
    assert type(conv_head.get_submodule("classifier.3")) is nn.Conv2d
    assert not hasattr(gm, "avgpool")
    assert fcn.grid_shape((320, 320)) == (4, 4) and fcn.min_size == (224, 224)
