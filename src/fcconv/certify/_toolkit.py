"""Stand-ins for two helpers of the package toolkit ``fcconv._shapes`` (issue 8).

MERGE NOTE: ``fcconv._shapes`` gains ``module_dtype_device`` and ``stochastic_in_training`` on the
``arch`` branch. At merge, import them from there in ``certify/_inputs.py`` and delete this file;
nothing else in ``certify`` uses it. (``fcconv._shapes`` is a leaf toolkit, so ``certify`` may use it.)
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["module_dtype_device", "stochastic_in_training"]

# Modules whose output, in training mode, depends on the batch (batch norm) or on chance (dropout,
# RReLU's random slopes).
_STOCHASTIC = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.RReLU)


def module_dtype_device(module: nn.Module) -> tuple[torch.dtype | None, torch.device | None]:
    """The dtype and device of the module's first floating parameter or buffer (None, None: none)."""
    for t in list(module.parameters()) + list(module.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return None, None


def stochastic_in_training(model: nn.Module) -> list[str]:
    """Qualified names (``""`` for ``model`` itself) of the submodules in training mode whose output
    depends on the batch or on chance."""
    return [name for name, sub in model.named_modules() if sub.training and isinstance(sub, _STOCHASTIC)]
