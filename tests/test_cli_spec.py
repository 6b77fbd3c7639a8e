"""The layer-spec parser of the command line: literal arguments only, never evaluated."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fcconv.cli._spec import (
    MAX_PARAMETERS,
    LayerSpec,
    build_layer,
    is_layer_spec,
    layer_spec,
    parse_kwargs,
    parse_layer_spec,
)
from fcconv.errors import FcconvError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Conv2d(4,2,kernel_size=1)", nn.Conv2d(4, 2, kernel_size=1)),
        ("Linear(25088, 4096)", nn.Linear(25088, 4096, device="meta")),
        ("Conv2d(16, 32, 3, stride=2, padding=1, bias=False)",
         nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)),
        ("nn.Conv1d(3, 4, 5, padding='same')", nn.Conv1d(3, 4, 5, padding="same")),
        ("torch.nn.Conv3d(2, 2, (1, 2, 3), padding=(0, 1, 1), padding_mode='reflect')",
         nn.Conv3d(2, 2, (1, 2, 3), padding=(0, 1, 1), padding_mode="reflect")),
        ("ConvTranspose2d(3, 4, (2, 3), stride=(1, 2), output_padding=(0, 1))",
         nn.ConvTranspose2d(3, 4, (2, 3), stride=(1, 2), output_padding=(0, 1))),
        ("Conv2d(4, 8, 3, groups=2, dilation=2)", nn.Conv2d(4, 8, 3, groups=2, dilation=2)),
    ],
)
def test_spec_builds_the_layer_it_names(text: str, expected: nn.Module) -> None:
    layer = build_layer(text, empty=True)
    assert type(layer) is type(expected)
    assert repr(layer) == repr(expected)
    assert not layer.training
    # layer_spec is the inverse: it rebuilds the same structure.
    assert repr(build_layer(layer_spec(layer), empty=True)) == repr(expected)


def test_weights_are_seeded_and_the_global_rng_is_untouched() -> None:
    torch.manual_seed(1)
    before = torch.random.get_rng_state()
    a, b = build_layer("Linear(5, 3)", seed=7), build_layer("Linear(5, 3)", seed=7)
    c = build_layer("Linear(5, 3)", seed=8)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.equal(a.weight, b.weight)
    assert not torch.equal(a.weight, c.weight)


@pytest.mark.parametrize(
    ("text", "start"),
    [
        ("__import__('os').system('touch pwned')", "Cannot read the layer spec"),
        ("os.system('touch pwned')", "Cannot read the layer spec"),
        ("Linear(4, 2).__class__", "Cannot read the layer spec"),
        ("Linear(__import__('os').getpid(), 2)", "Cannot read the layer spec"),
        ("Linear(4, 2, bias=open('x'))", "Cannot read the layer spec"),
        ("Linear(2**40, 2)", "Cannot read the layer spec"),
        ("Linear(4, 2) or Linear(2, 2)", "Cannot read the layer spec"),
        ("lambda: 1", "Cannot read the layer spec"),
        ("Linear(*[4, 2])", "Cannot read the layer spec"),
        ("Linear(**{'in_features': 4})", "Cannot read the layer spec"),
        ("Linear(4", "Cannot read the layer spec"),
        ("Sequential(Linear(4, 2))", "Cannot read the layer spec"),
        ("Linear(4, 2, device='cuda')", "Cannot read the layer spec"),
        ("Linear(4, 2, True, 'cpu')", "Cannot read the layer spec"),
        ("Linear(4, 2, weight=1)", "Cannot read the layer spec"),
        ("Linear(4, 2, 3, 4, 5, 6)", "Cannot read the layer spec"),
        ("Linear('" + "x" * 2000 + "')", "Cannot read the layer spec"),
        ("Conv2d(4, 2, 3, stride=2, padding='same')", "Cannot read the layer spec"),
        ("Conv2d(3, 4, 3, groups=2)", "Cannot read the layer spec"),
        ("Linear(-1, 2)", "Cannot read the layer spec"),
        ("Linear(100000, 100000)", "The layer spec"),
    ],
)
def test_bad_specs_are_refused_with_a_message(text: str, start: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FcconvError) as info:
        build_layer(text)
    message = str(info.value)
    assert message.startswith(start)
    assert "\n" not in message
    assert not (tmp_path / "pwned").exists()


def test_parameter_limit_is_checked_before_allocating() -> None:
    rows = MAX_PARAMETERS // 1000 + 1
    with pytest.raises(FcconvError, match="parameters; the limit"):
        build_layer(f"Linear(1000, {rows}, bias=False)")


def test_parse_layer_spec_returns_literals() -> None:
    assert parse_layer_spec("nn.Conv2d(1, 2, (3, 3), padding='same', bias=False)") == LayerSpec(
        "Conv2d", (1, 2, (3, 3)), {"padding": "same", "bias": False}
    )


def test_is_layer_spec_tells_specs_from_model_references() -> None:
    assert is_layer_spec("Linear(4, 2)")
    assert is_layer_spec("nn.Conv2d(1, 1, 1)")
    assert not is_layer_spec("torchvision:resnet18")
    assert not is_layer_spec("package.module:factory")
    assert not is_layer_spec("weights.pt")


def test_parse_kwargs() -> None:
    assert parse_kwargs("") == {}
    assert parse_kwargs("num_classes=10, dropout=0.2, name='x', flag=False, size=(1, 2), x=None, y=-3") == {
        "num_classes": 10, "dropout": 0.2, "name": "x", "flag": False, "size": (1, 2), "x": None, "y": -3,
    }
    for bad in ("10", "a=b", "x=__import__('os')", "x=[i for i in ()]", "x=1)"):
        with pytest.raises(FcconvError, match="^Cannot read --kwargs"):
            parse_kwargs(bad)


def test_layer_spec_refuses_other_modules() -> None:
    with pytest.raises(FcconvError, match="^Cannot describe a Sequential"):
        layer_spec(nn.Sequential())
