"""Small models for experiments: paper-style MLPs and a small CNN that take the activation as an
argument, with an initialisation scale (Melamed, Yehudai, Vardi, arXiv 2303.00783)."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from ._format import short_repr
from ._torch import check_module
from .registry import create_activation

__all__ = ["is_model_factory", "mlp", "register_model", "scale_init", "small_cnn"]

F = TypeVar("F")

def _check_activation(activation: object) -> None:
    if isinstance(activation, nn.Module):
        raise TypeError(
            f"activation={short_repr(activation)} is a module instance; pass the activation as a name, "
            "spec string or class (one module cannot be reused for every layer), e.g. 'capped_relu(cap=0.1)'"
        )


def _activation(activation: Any) -> nn.Module:
    """A fresh activation module; a bad spec's error names the ``activation=`` argument."""
    try:
        return create_activation(activation)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"activation={short_repr(activation)}: {exc}") from None


def _check_classes(num_classes: object) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int (got {num_classes!r})")


def _check_ints(values: Sequence[int], name: str, example: str) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values or any(
        isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in values
    ):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, e.g. {example} "
                         f"(got {values!r})")
    return tuple(int(v) for v in values)


@torch.no_grad()
def scale_init(model: nn.Module, init_scale: float) -> nn.Module:
    """Multiply the weights and biases of every ``Linear`` and ``Conv*`` layer by ``init_scale``.

    Applied right after construction this scales the default initialisation; a small scale
    makes two-layer ReLU nets more robust off the data subspace (Melamed et al. 2303.00783).
    Returns ``model``.
    """
    check_module(model, "scale_init")
    if isinstance(init_scale, bool) or not isinstance(init_scale, numbers.Real) or not (
        math.isfinite(init_scale) and init_scale > 0
    ):
        raise ValueError(f"init_scale must be a finite number > 0 (got {init_scale!r}); 1.0 "
                         "keeps torch's default initialisation")
    layers = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd))]
    if any(nn.parameter.is_lazy(p) for m in layers for p in m.parameters()):
        raise ValueError("the model has uninitialised lazy layers; run one forward pass on a "
                         "dummy batch before scale_init")
    if init_scale == 1:
        return model
    for module in layers:
            module.weight.mul_(init_scale)
            if module.bias is not None:
                module.bias.mul_(init_scale)
    return model


_FACTORIES: set[Any] = set()


def register_model(factory: F) -> F:
    """Mark ``factory`` (a function returning an ``nn.Module``) as a model the CLI may build by
    its ``package.module:factory`` name; ``nn.Module`` classes need no registration. The CLI
    refuses any other callable, so ``relucap inspect os:abort`` runs nothing."""
    if not callable(factory):
        raise TypeError(f"register_model needs a function returning an nn.Module, got {factory!r}")
    _FACTORIES.add(factory)
    return factory


def is_model_factory(obj: Any) -> bool:
    """Whether ``obj`` is an ``nn.Module`` subclass or a factory marked by :func:`register_model`."""
    if isinstance(obj, type):
        return issubclass(obj, nn.Module)
    try:
        return obj in _FACTORIES
    except TypeError:
        return False


@register_model
def mlp(
    widths: Sequence[int] = (256, 32, 256),
    activation: str | type = "relu",
    in_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    init_scale: float = 1.0,
) -> nn.Sequential:
    """Fully connected net ``Flatten -> [Linear -> act] * len(widths) -> Linear``.

    ``activation`` is a registry name, spec string or factory; a fresh activation is built for
    every hidden layer. Flattening happens inside the model so attacks see image-shaped input.
    The default widths put a narrow bottleneck (32) between two wide layers, the setting in
    which arXiv 2405.03777 found capping the narrow layer most useful. ``init_scale``
    multiplies torch's default initialisation (:func:`scale_init`).
    """
    widths = _check_ints(widths, "widths", "(256, 32, 256)")
    fan_in = math.prod(_check_ints(in_shape, "in_shape", "(1, 28, 28)"))
    _check_classes(num_classes)
    _check_activation(activation)
    layers: list[nn.Module] = [nn.Flatten()]
    for w in widths:
        layers += [nn.Linear(fan_in, int(w)), _activation(activation)]
        fan_in = int(w)
    layers.append(nn.Linear(fan_in, num_classes))
    return scale_init(nn.Sequential(*layers), init_scale)


@register_model
def small_cnn(
    activation: str | type = "relu",
    channels: Sequence[int] = (32, 64),
    in_shape: Sequence[int] = (1, 28, 28),
    num_classes: int = 10,
    hidden: int = 128,
    init_scale: float = 1.0,
) -> nn.Sequential:
    """Small CNN: ``[Conv3x3 -> act -> MaxPool2] per entry of channels -> Flatten -> Linear(
    hidden) -> act -> Linear(num_classes)``; input (N, C, H, W) with ``in_shape == (C, H, W)``.

    Every activation is a fresh module built from ``activation`` (name, spec string or class).
    ``hidden=0`` drops the hidden fully connected layer. ``init_scale`` as in :func:`mlp`.
    """
    _check_activation(activation)
    channels = _check_ints(channels, "channels", "(32, 64)")
    shape = _check_ints(in_shape, "in_shape", "(1, 28, 28)")
    if len(shape) != 3:
        raise ValueError(f"in_shape must be (C, H, W) (got {tuple(in_shape)!r})")
    c, h, w = shape
    if h >> len(channels) < 1 or w >> len(channels) < 1:
        raise ValueError(
            f"an input of {h}x{w} cannot be halved {len(channels)} times (one max-pool per entry "
            "of channels); use fewer channel stages or a larger input"
        )
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 0:
        raise ValueError(f"hidden must be an int >= 0 (got {hidden!r})")
    _check_classes(num_classes)
    layers: list[nn.Module] = []
    for out in channels:
        layers += [nn.Conv2d(c, out, 3, padding=1), _activation(activation), nn.MaxPool2d(2)]
        c, h, w = out, h // 2, w // 2
    layers.append(nn.Flatten())
    fan_in = c * h * w
    if hidden:
        layers += [nn.Linear(fan_in, hidden), _activation(activation)]
        fan_in = hidden
    layers.append(nn.Linear(fan_in, num_classes))
    return scale_init(nn.Sequential(*layers), init_scale)
