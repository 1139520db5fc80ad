"""relucap-plugin: capped ReLU activations, model surgery and honest adversarial evaluation.

The public names below are imported on first use (PEP 562), so ``import relucap_plugin`` and
``relucap --help`` are fast and need no torch; using any of them imports torch and numpy. ART,
Foolbox and torchattacks are imported by their adapters only when an attack from them is
asked for.
"""

# ruff: noqa: F401  (the TYPE_CHECKING imports are for static readers; names resolve lazily)
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__

#: public name -> the module that defines it, grouped by pipeline stage
_EXPORTS: dict[str, str] = {
    # activations
    **dict.fromkeys(
        ["CappedReLU", "DynamicCappedReLU", "LearnableCappedReLU", "PReLU", "PSiLU", "PSoftplus",
         "PSSiLU", "SpatialAttentionReLU", "capped_relu", "share_parameters"], "activations"),
    **dict.fromkeys(["create_activation", "list_activations", "parse_spec", "register_activation"], "registry"),
    # surgery
    **dict.fromkeys(
        ["CapReport", "ReluSite", "UntraceableModelError", "calibrate_caps", "cap_relus", "find_relus",
         "print_sites", "uncap"], "surgery"),
    # attacks
    **dict.fromkeys(["EvalConfig", "ThreatModel"], "threat"),
    **dict.fromkeys(["Attack", "get_attack", "list_attacks", "make_attack", "parse_attack"], "attacks"),
    # evaluation
    "evaluate": "evaluation",
    "Results": "results",
    # diagnostics and adaptive attacks
    **dict.fromkeys(["audit", "perturbation_growth"], "diagnostics"),
    **dict.fromkeys(["bpda", "evaluate_suite", "get_suite", "surrogate_gradients", "transfer", "uncapped_twin"],
                    "adaptive"),
    # training
    **dict.fromkeys(["TrainHistory", "accuracy", "load_checkpoint", "save_checkpoint", "train"], "training"),
    # data and models
    **dict.fromkeys(
        ["as_dataset", "as_loader", "as_tensors", "load_cifar10", "load_digits_dataset", "load_mnist",
         "load_mnist5k"], "data"),
    **dict.fromkeys(["mlp", "scale_init", "small_cnn"], "models"),
    # certification
    "certify": "certification",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    """Import a public name (or a submodule) on first use."""
    module = _EXPORTS.get(name)
    if module is None:
        try:
            return importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # static readers (type checkers, IDEs, griffe) see the names
    from .activations import (
        CappedReLU, DynamicCappedReLU, LearnableCappedReLU, PReLU, PSiLU, PSoftplus, PSSiLU,
        SpatialAttentionReLU, capped_relu, share_parameters,
    )
    from .adaptive import bpda, evaluate_suite, get_suite, surrogate_gradients, transfer, uncapped_twin
    from .attacks import Attack, get_attack, list_attacks, make_attack, parse_attack
    from .data import (
        as_dataset, as_loader, as_tensors, load_cifar10, load_digits_dataset, load_mnist, load_mnist5k,
    )
    from .certification import certify
    from .diagnostics import audit, perturbation_growth
    from .evaluation import evaluate
    from .models import mlp, scale_init, small_cnn
    from .registry import create_activation, list_activations, parse_spec, register_activation
    from .results import Results
    from .surgery import (
        CapReport, ReluSite, UntraceableModelError, calibrate_caps, cap_relus, find_relus, print_sites,
        uncap,
    )
    from .threat import EvalConfig, ThreatModel
    from .training import TrainHistory, accuracy, load_checkpoint, save_checkpoint, train
