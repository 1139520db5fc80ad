"""Small models for experiments: paper-style MLPs that take the activation as an argument."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from .registry import create_activation

__all__ = ["mlp"]


def mlp(
    widths: Sequence[int] = (256, 32, 256),
    activation: str | nn.Module | type = "relu",
    in_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
) -> nn.Sequential:
    """Fully connected net ``Flatten -> [Linear -> act] * len(widths) -> Linear``.

    ``activation`` is a registry name, spec string or factory; a fresh activation is built for
    every hidden layer. Flattening happens inside the model so attacks see image-shaped input.
    """
    if not widths or any(int(w) < 1 for w in widths):
        raise ValueError(f"widths must be a non-empty sequence of positive ints (got {widths!r})")
    if isinstance(activation, nn.Module):
        raise TypeError(
            "pass the activation as a name, spec string or class (one module cannot be reused "
            "for every layer), e.g. 'capped_relu(cap=0.1)'"
        )
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = math.prod(in_shape)
    for w in widths:
        layers += [nn.Linear(fan_in, int(w)), create_activation(activation)]
        fan_in = int(w)
    layers.append(nn.Linear(fan_in, num_classes))
    return nn.Sequential(*layers)
