"""Tiny models for the command-line tests, importable as ``cli_models:NAME`` once tests/ is on sys.path."""

from __future__ import annotations

from torch import nn


def factory(channels: int = 1, classes: int = 3) -> nn.Module:
    """A 2-layer CNN that pads nothing, for (channels, 8, 8) inputs: valid convs, flatten, Linear."""
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 4 * 4, classes),
    )


def other_factory() -> nn.Module:
    """The same structure as :func:`factory`, with other random weights."""
    model = factory()
    for parameter in model.parameters():
        parameter.data.uniform_(-1, 1)
    return model


def conv_layer() -> nn.Module:
    """One conv layer, for --to linear."""
    return nn.Conv2d(2, 3, 3, padding=1)


def linear_layer() -> nn.Module:
    """One Linear layer, for --to pointwise."""
    return nn.Linear(8, 3)


def needs_width(width: int) -> nn.Module:
    """A factory with a required argument, for --kwargs."""
    return nn.Linear(width, 2)


def not_a_module() -> int:
    return 42


def broken() -> nn.Module:
    raise RuntimeError("the factory is broken")


NOT_CALLABLE = 3
MODULE_INSTANCE = nn.Linear(4, 2)
