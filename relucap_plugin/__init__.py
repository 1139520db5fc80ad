"""relucap-plugin: capped ReLU activations, model surgery and honest adversarial evaluation.

Importing this package imports torch and numpy only; ART, Foolbox and torchattacks are imported
by their adapters when an attack from them is asked for.
"""

from __future__ import annotations

from .activations import (
    CappedReLU,
    DynamicCappedReLU,
    LearnableCappedReLU,
    PReLU,
    PSiLU,
    PSoftplus,
    PSSiLU,
    SpatialAttentionReLU,
    capped_relu,
    share_parameters,
)
from .registry import create_activation, list_activations, parse_spec, register_activation

__version__ = "0.1.0.dev0"

__all__ = [
    "CappedReLU",
    "DynamicCappedReLU",
    "LearnableCappedReLU",
    "PReLU",
    "PSSiLU",
    "PSiLU",
    "PSoftplus",
    "SpatialAttentionReLU",
    "__version__",
    "capped_relu",
    "create_activation",
    "list_activations",
    "parse_spec",
    "register_activation",
    "share_parameters",
]
