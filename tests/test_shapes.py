"""fcconv._shapes: the toolkit every layer shares."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from fcconv._shapes import (
    broadcast,
    check_input_shape,
    conv_rank,
    dim_labels,
    module_dtype_device,
    per_dim,
    stochastic_in_training,
)
from fcconv.errors import FcconvError, NotEquivalentError


@pytest.mark.parametrize(("value", "expected"), [
    (3, (3, 3)), (np.int64(2), (2, 2)), (torch.tensor(4), (4, 4)), ((1, 2), (1, 2)), ([5, 6], (5, 6)),
])
def test_per_dim_accepts_ints_numpy_ints_and_int_tensors(value: object, expected: tuple[int, int]) -> None:
    result = per_dim(value, 2, "stride")
    assert result == expected and all(type(v) is int for v in result)


@pytest.mark.parametrize("value", [True, (1, 2, 3), (1.5, 2), "same", None, torch.tensor(2.0), (2,)])
def test_per_dim_refuses_the_rest(value: object) -> None:
    with pytest.raises(FcconvError, match=r"^stride must be 2 integer\(s\), one per spatial dim"):
        per_dim(value, 2, "stride")


def test_per_dim_repeats_one_value_only_when_asked() -> None:
    assert per_dim((2,), 3, "stride", allow_one=True) == (2, 2, 2)
    assert per_dim((2,), 1, "stride") == (2,)


def test_broadcast_keeps_strings_and_nodes_for_traced_arguments() -> None:
    assert broadcast("same", 2) == ("same", "same")
    assert broadcast((None, 3), 2) == (None, 3)
    assert broadcast(True, 2) is None and broadcast((1, 2, 3), 2) is None


def test_labels_rank_and_input_shape() -> None:
    assert dim_labels(2) == ("N", "C", "H", "W") and dim_labels(3) == ("N", "C", "D", "H", "W")
    assert conv_rank(nn.Conv3d(1, 1, 1)) == 3 and conv_rank(nn.MaxPool1d(2)) == 1
    assert conv_rank(nn.Linear(1, 1)) is None
    assert check_input_shape((np.int64(3), 4)) == (3, 4)
    with pytest.raises(FcconvError, match=r"^input_shape must hold integers"):
        check_input_shape((3, True))


def test_check_input_shape_options() -> None:
    # any_rank: compare's shapes, one int for a flat vector, any rank from 1 up.
    assert check_input_shape(4, any_rank=True) == (4,)
    assert check_input_shape((np.int64(2), 3, 4, 5, 6), any_rank=True) == (2, 3, 4, 5, 6)
    with pytest.raises(FcconvError, match=r"^input_shape must have rank 2 to 4"):
        check_input_shape((4,))
    with pytest.raises(FcconvError, match=r"^input_shape must be a per-sample shape"):
        check_input_shape(4)
    with pytest.raises(FcconvError, match=r"^input_shape must be a per-sample shape .* or 4 for 4 features"):
        check_input_shape(True, any_rank=True)
    with pytest.raises(FcconvError, match=r"^input_shape must have at least one dim"):
        check_input_shape((), any_rank=True)
    # conv: the shape must enter the conv.
    conv = nn.Conv2d(3, 4, 3)
    assert check_input_shape((3, 5, 5), conv=conv) == (3, 5, 5)
    with pytest.raises(FcconvError, match=r"^f: Conv2d\(in_channels=3\) takes inputs of rank 3"):
        check_input_shape((3, 5), conv=conv, caller="f")
    with pytest.raises(NotEquivalentError, match=r"^f: Conv2d\(in_channels=3\) expects 3 input channels"):
        check_input_shape((2, 5, 5), conv=conv, caller="f")


def test_module_dtype_device() -> None:
    assert module_dtype_device(nn.Linear(2, 2).double()) == (torch.float64, torch.device("cpu"))
    assert module_dtype_device(nn.ReLU()) == (None, None)


def test_stochastic_in_training_names_batch_and_chance_dependent_modules() -> None:
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.Sequential(nn.BatchNorm1d(2), nn.RReLU()))
    assert stochastic_in_training(model) == ["1", "2.0", "2.1"]
    model[2].eval()
    assert stochastic_in_training(model) == ["1"]
    assert stochastic_in_training(model.eval()) == []


def test_a_missing_extra_names_the_package_and_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from fcconv._deps import need_tiles

    monkeypatch.setitem(sys.modules, "zarr", None)  # as if not installed
    with pytest.raises(FcconvError, match=r"^fcconv.tiling needs the package 'zarr', which is not installed. "
                                          r"Install the extra: pip install 'fcconv\[tiles\]'.$"):
        need_tiles("zarr")
