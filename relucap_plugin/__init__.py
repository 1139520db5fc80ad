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
from .threat import EvalConfig, ThreatModel
from .attacks import get_attack, list_attacks, make_attack, parse_attack
from .evaluation import evaluate
from .results import Results
from .data import as_dataset, as_loader, as_tensors, load_cifar10, load_digits_dataset
from .data import load_mnist, load_mnist5k
from .models import mlp, scale_init, small_cnn
from .training import TrainHistory, accuracy, load_checkpoint, save_checkpoint, train
from .adaptive import bpda, evaluate_suite, get_suite, surrogate_gradients, transfer, uncapped_twin
from .diagnostics import audit, perturbation_growth
from .certify import certify
from .surgery import (
    CapReport,
    ReluSite,
    UntraceableModelError,
    calibrate_caps,
    cap_relus,
    find_relus,
    print_sites,
    uncap,
)

__version__ = "0.1.0.dev0"

__all__ = [
    "audit",
    "bpda",
    "evaluate_suite",
    "get_suite",
    "perturbation_growth",
    "surrogate_gradients",
    "transfer",
    "uncapped_twin",
    "CappedReLU",
    "DynamicCappedReLU",
    "EvalConfig",
    "LearnableCappedReLU",
    "PReLU",
    "PSSiLU",
    "PSiLU",
    "PSoftplus",
    "Results",
    "TrainHistory",
    "SpatialAttentionReLU",
    "ThreatModel",
    "__version__",
    "accuracy",
    "as_dataset",
    "as_loader",
    "as_tensors",
    "capped_relu",
    "certify",
    "create_activation",
    "evaluate",
    "get_attack",
    "list_activations",
    "list_attacks",
    "load_checkpoint",
    "load_cifar10",
    "load_digits_dataset",
    "load_mnist",
    "load_mnist5k",
    "make_attack",
    "mlp",
    "parse_attack",
    "parse_spec",
    "register_activation",
    "save_checkpoint",
    "scale_init",
    "share_parameters",
    "small_cnn",
    "train",
    "CapReport",
    "ReluSite",
    "UntraceableModelError",
    "calibrate_caps",
    "cap_relus",
    "find_relus",
    "print_sites",
    "uncap",
]
