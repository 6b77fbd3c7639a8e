"""fcconv.models.head: the head rewrite (pooling forms, LayerNorm, softmax, several pools)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from small_nets import DTYPE, TOL, AlreadyConv, dense_and_reference
from torch import nn

from fcconv.models import (
    ChannelLayerNorm,
    convolutionalize,
)

# ----------------------------------------------------------------------------------------------
# Heads: pooling forms, LayerNorm, softmax, several pools


class PoolHead(nn.Module):
    """Valid convs, then a global pooling written in one of the ways models write it."""

    def __init__(self, form: str) -> None:
        super().__init__()
        self.form = form
        self.c1 = nn.Conv2d(3, 8, 3)
        self.c2 = nn.Conv2d(8, 12, 3, stride=2)
        self.pool = nn.AdaptiveMaxPool2d(1) if form == "adaptive_max" else nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.c2(F.relu(self.c1(x))))
        form = self.form
        if form in ("adaptive", "adaptive_max"):
            x = torch.flatten(self.pool(x), 1)
        elif form == "functional":
            x = F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)
        elif form == "mean":
            x = x.mean([2, 3])
        elif form == "mean_keepdim":
            x = x.mean(dim=(-1, -2), keepdim=True)
            x = x.reshape(x.size(0), -1)
        elif form == "amax":
            x = torch.amax(x, dim=(2, 3))
        elif form == "flatten_module":
            x = self.flat(self.pool(x))
        return self.fc(x)


@pytest.mark.parametrize(
    "form", ["adaptive", "adaptive_max", "functional", "mean", "mean_keepdim", "amax", "flatten_module"]
)
def test_global_pool_forms_become_stride_one_pools(form: str) -> None:
    torch.manual_seed(1)
    model = PoolHead(form).to(DTYPE).eval()
    fcn = convolutionalize(model, (3, 17, 17))
    pools = [m for m in fcn.graph_module.modules() if isinstance(m, (nn.AvgPool2d, nn.MaxPool2d))]
    assert len(pools) == 1 and pools[0].kernel_size in (7, (7, 7)) and pools[0].stride in (1, (1, 1))
    assert isinstance(pools[0], nn.MaxPool2d) == (form in ("adaptive_max", "amax"))
    assert fcn.exact_sliding_window and fcn.stride == (2, 2) and fcn.window == (17, 17)
    x = torch.randn(2, 3, 17 + 2 * 5, 17 + 2 * 3, dtype=DTYPE)
    dense, reference = dense_and_reference(model, fcn, x)
    assert dense.shape == reference.shape == (2, 5, 6, 4)
    torch.testing.assert_close(dense, reference, **TOL)


class FancyHead(nn.Module):
    """LayerNorm, GELU, a scalar scale, softmax over the last dim and two pools concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 6, 3)
        self.fc = nn.Linear(12, 9)
        self.ln = nn.LayerNorm(9)
        self.out = nn.Linear(9, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        features = torch.cat([F.adaptive_avg_pool2d(x, 1), F.adaptive_max_pool2d(x, 1)], dim=1)
        y = self.ln(self.fc(features.flatten(1)))
        y = self.out(F.gelu(y) * 0.5 + 1.0)
        return torch.log_softmax(y, dim=-1)


def test_layernorm_softmax_and_two_pools_head() -> None:
    torch.manual_seed(2)
    model = FancyHead().to(DTYPE).eval()
    with torch.no_grad():
        model.ln.weight.normal_()
    fcn = convolutionalize(model, (2, 9, 9))
    assert isinstance(fcn.graph_module.ln, ChannelLayerNorm)
    x = torch.randn(2, 2, 13, 12, dtype=DTYPE)
    dense, reference = dense_and_reference(model, fcn, x)
    assert dense.shape == reference.shape == (2, 4, 5, 4)
    torch.testing.assert_close(dense, reference, **TOL)


class SEBlock(nn.Module):
    def __init__(self, channels: int, use_linear: bool) -> None:
        super().__init__()
        self.use_linear = use_linear
        self.pool = nn.AdaptiveAvgPool2d(1)
        if use_linear:
            self.fc = nn.Linear(channels, channels)
        else:
            self.fc = nn.Conv2d(channels, channels, 1)  # type: ignore[assignment]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.pool(x)
        s = self.fc(s.view(s.size(0), -1)).view(s.size(0), -1, 1, 1) if self.use_linear else self.fc(s)
        return x * torch.sigmoid(s)


class SENet(nn.Module):
    def __init__(self, use_linear: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2)
        self.se = SEBlock(8, use_linear)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.se(self.conv(x))), 1))


@pytest.mark.parametrize("use_linear", [False, True])
def test_squeeze_excitation_pools_stay_global(use_linear: bool) -> None:
    torch.manual_seed(3)
    model = SENet(use_linear).to(DTYPE).eval()
    fcn = convolutionalize(model, (3, 15, 15))
    gm = fcn.graph_module
    assert isinstance(gm.se.pool, nn.AdaptiveAvgPool2d)
    assert isinstance(gm.se.fc, nn.Linear) == use_linear
    assert isinstance(gm.pool, nn.AvgPool2d) and gm.pool.kernel_size == (7, 7)
    x = torch.randn(2, 3, 15, 15, dtype=DTYPE)
    with torch.no_grad():
        torch.testing.assert_close(fcn(x).flatten(1), model(x), **TOL)
        assert fcn(torch.randn(1, 3, 21, 25, dtype=DTYPE)).shape == (1, 3, *fcn.grid_shape((21, 25)))
    # The SE pooling sees the whole image: no longer a sliding window, and fcconv does not claim it.
    assert not fcn.exact_sliding_window


def test_fully_convolutional_model_comes_back_unchanged() -> None:
    torch.manual_seed(4)
    model = AlreadyConv().to(DTYPE).eval()
    fcn = convolutionalize(model, (3, 12, 12))
    converted = [(n, type(m)) for n, m in fcn.graph_module.named_modules() if n.startswith("body.")]
    assert converted == [(n, type(m)) for n, m in model.named_modules() if n.startswith("body.")]
    assert fcn.stride == (2, 2) and fcn.min_size == (5, 5) and fcn.window == (6, 6)
    assert fcn.grid_shape((12, 12)) == (4, 4) and fcn.exact_sliding_window
    x = torch.randn(2, 3, 19, 14, dtype=DTYPE)
    with torch.no_grad():
        torch.testing.assert_close(fcn(x), model(x), rtol=0, atol=0)
    dense, reference = dense_and_reference(model, fcn, x)
    torch.testing.assert_close(dense[..., : reference.shape[2], : reference.shape[3]], reference, **TOL)
