"""Tests of fcconv.explain: the relation found, the equivalent layer, counts, and the exercises' answers."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fcconv
from fcconv import FcconvError, NotEquivalentError, explain


def test_linear_scenario_1_matches_linear_to_conv() -> None:
    linear = nn.Linear(4, 2)
    ex = explain(linear, (1, 2, 2))
    assert ex.relation == "kernel_covers_input"
    assert ex.holds == ("kernel_covers_input",)
    assert ex.output_shape == (2, 1, 1)
    assert ex.equivalent_layer == "Conv2d(1, 2, kernel_size=2)"
    conv = fcconv.linear_to_conv(linear, (1, 2, 2))
    assert ex.params == ex.equivalent_params == sum(p.numel() for p in conv.parameters()) == 10
    assert ex.matrix_shape == (2, 4) and ex.matrix_nnz == 8 and ex.density == 1.0
    assert "stride" in ex.stride_effect.lower() or "window" in ex.stride_effect
    assert ex.padding_effect.startswith("breaks it")
    assert "3x3" in ex.padding_effect


def test_linear_on_one_by_one_input_is_both_scenarios() -> None:
    ex = explain(nn.Linear(4, 2), (4, 1, 1))
    assert ex.holds == ("kernel_covers_input", "pointwise")
    assert "also pointwise" in str(ex)


def test_linear_over_channels_is_pointwise() -> None:
    ex = explain(nn.Linear(4, 2, bias=False), (4, 8, 8))
    assert ex.relation == "pointwise"
    assert ex.output_shape == (2, 8, 8)
    assert ex.equivalent_layer == "Conv2d(4, 2, kernel_size=1, bias=False)"
    assert ex.matrix_nnz == 2 * 4 * 64
    assert "4x4" in ex.stride_effect  # stride 2 on 8x8
    assert "bias alone" in ex.padding_effect


def test_linear_that_fits_no_reading_is_refused() -> None:
    with pytest.raises(NotEquivalentError, match=r"^Cannot relate Linear\(in_features=100\) to input_shape "
                       r"\(3, 5, 5\): expected in_features = 3\*5\*5 = 75"):
        explain(nn.Linear(100, 2), (3, 5, 5))


@pytest.mark.parametrize(
    ("conv", "shape"),
    [
        (nn.Conv2d(3, 16, 3, padding=1), (3, 32, 32)),
        (nn.Conv2d(16, 32, 3, stride=2, padding=1), (16, 32, 32)),
        (nn.Conv2d(8, 8, 5, dilation=2, groups=2, padding=4), (8, 24, 24)),
        (nn.Conv1d(2, 3, 3, padding="same", padding_mode="reflect"), (2, 9)),
        (nn.Conv3d(2, 2, 2, stride=2, bias=False), (2, 4, 4, 4)),
        (nn.Conv2d(3, 4, 3, padding=1, padding_mode="circular"), (3, 5, 6)),
        (nn.ConvTranspose2d(3, 4, 3, stride=2, padding=1), (3, 5, 5)),
    ],
)
def test_structured_matrix_counts_match_conv_matrix(conv: nn.Module, shape: tuple[int, ...]) -> None:
    ex = explain(conv, shape)
    assert ex.relation == "structured_matrix"
    matrix = fcconv.conv_matrix(conv, shape, layout="coo")
    assert ex.matrix_shape == tuple(matrix.shape)
    assert ex.matrix_nnz == matrix._nnz()
    assert ex.output_shape == fcconv.conv_output_shape(conv, shape)
    linear = fcconv.conv_to_linear(conv, shape)
    assert ex.equivalent_params == sum(p.numel() for p in linear.parameters())
    assert ex.params == sum(p.numel() for p in conv.parameters())


def test_stride_answer_counts_windows() -> None:
    ex = explain(nn.Conv2d(16, 32, 3, stride=2, padding=1), (16, 32, 32))
    assert "16x16 positions instead of 32x32" in ex.stride_effect
    assert "15x15 without it, 16x16 with it" in ex.padding_effect


def test_patch_embedding_is_recognised() -> None:
    tiling = explain(nn.Conv2d(3, 8, 16, stride=16), (3, 64, 64))
    assert "patch embedding" in tiling.stride_effect
    assert "never read" not in tiling.stride_effect
    gaps = explain(nn.Conv2d(3, 8, 4, stride=6), (3, 16, 16))
    assert "never read" in gaps.stride_effect


def test_folded_padding_is_explained() -> None:
    ex = explain(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"), (3, 8, 8))
    assert "reflect" in ex.padding_effect and "summed" in ex.padding_effect


def test_conv_covering_input_with_zero_padding_is_cropped() -> None:
    conv = nn.Conv2d(2, 3, 3, padding=1)
    ex = explain(conv, (2, 1, 1))
    assert ex.relation == "kernel_covers_input"
    assert "cropped" in ex.equivalent_layer and "cropped" in ex.padding_effect
    linear = fcconv.conv_to_linear(conv, (2, 1, 1))
    assert torch.equal(linear.weight, conv.weight[:, :, 1, 1])


def test_pointwise_conv_with_groups_is_block_diagonal() -> None:
    ex = explain(nn.Conv2d(8, 8, 1, groups=2), (8, 4, 4))
    assert ex.relation == "pointwise"
    assert "block-diagonal (2 blocks)" in ex.equivalent_layer
    assert ex.equivalent_params == 8 * 8 + 8


def test_str_is_a_readable_answer() -> None:
    text = str(explain(nn.Conv2d(4, 2, kernel_size=1), (4, 1, 1)))
    lines = text.splitlines()
    assert lines[0].startswith("Conv2d(4, 2, kernel_size=(1, 1), stride=(1, 1)) on input (4, 1, 1)")
    assert any(line.startswith("Stride:") for line in lines)
    assert any(line.startswith("Padding:") for line in lines)
    assert "Linear(4, 2)" in text


def test_explanation_is_frozen() -> None:
    ex = explain(nn.Linear(4, 2), (1, 2, 2))
    with pytest.raises(AttributeError):
        ex.relation = "pointwise"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("module", "shape", "message"),
    [
        (nn.ReLU(), (1, 2, 2), r"^explain expects an nn\.Linear or a convolution"),
        (nn.Linear(4, 2), (4,), r"^input_shape must have rank 2 to 4"),
        (nn.Linear(4, 2), (1, 0, 4), r"^input_shape sizes must be positive"),
        (nn.Conv2d(3, 4, 5), (3, 4, 4), r"^The kernel does not fit the input in spatial dim 0"),
        (nn.Conv2d(3, 4, 3), (2, 8, 8), r"^explain: Conv2d\(in_channels=3\) expects 3 input channels"),
    ],
)
def test_bad_input(module: nn.Module, shape: tuple[int, ...], message: str) -> None:
    with pytest.raises(FcconvError, match=message):
        explain(module, shape)


def test_explain_does_not_build_the_matrix_of_a_large_layer() -> None:
    # A dense matrix of this layer would take 3.6e11 entries; explain only counts.
    conv = nn.Conv2d(3, 64, 3, padding=1)
    ex = explain(conv, (3, 224, 224))
    assert ex.matrix_shape == (64 * 224 * 224, 3 * 224 * 224)
    assert ex.matrix_nnz == 64 * 3 * (222 * 222 * 9 + 4 * 222 * 6 + 4 * 4)
    assert math.isclose(ex.density, ex.matrix_nnz / math.prod(ex.matrix_shape))


@pytest.mark.parametrize("shape", [(True, 2, 2), (1.0, 2, 2), ("1", 2, 2)])
def test_input_shape_must_hold_integers(shape: tuple[object, ...]) -> None:
    with pytest.raises(FcconvError, match=r"^input_shape must hold integers"):
        explain(nn.Linear(4, 2), shape)  # type: ignore[arg-type]


def test_input_shape_accepts_torch_size_and_numpy_ints() -> None:
    import numpy as np

    assert explain(nn.Linear(4, 2), torch.Size([1, 2, 2])).input_shape == (1, 2, 2)
    assert explain(nn.Linear(4, 2), (np.int64(1), 2, 2)).input_shape == (1, 2, 2)
