"""Adaptive attacks through caps however they are written: surrogate gradients, BPDA, transfer,
black-box on the real input layout, suites.

A small cap saturates units and zeroes input gradients, so a plain gradient attack can report
robustness that is not there (Athalye et al. 2018). This package keeps the capped *forward* pass
and changes what the attacker sees:

- :mod:`.ops` finds every cap the forward reaches (our activations, ``clamp``/``clip``/
  ``clamp_max`` and their in-place forms, ``hardtanh``/``Hardtanh``, ``relu6``/``ReLU6``,
  ``minimum``/``min`` with a constant) without surgery: :func:`find_caps`.
- :func:`surrogate_gradients` (context manager) and :func:`with_surrogate_gradients` (model
  transform) give every cap a surrogate backward pass while its forward output stays
  bit-identical; :func:`uncapped_twin` is the same model without the upper bounds.
- :class:`SurrogateAttack` (BPDA, ``"<inner spec>+bpda(ste)"``), :class:`TransferAttack`
  (crafted on the uncapped twin), :class:`LayoutAttack` (black-box on the real input layout)
  and :func:`get_suite`: ``"standard"`` is what a user gets without choosing, and its
  per-sample worst case is the headline number.
"""

from .ops import CAPPED_TYPES, CapScan, CapSite, cap_statistics, eager_module, find_caps, module_cap, opaque_modules
from .suite import (
    BLACK_BOX_FAMILIES,
    SUITES,
    LayoutAttack,
    SurrogateAttack,
    TransferAttack,
    attack_kind,
    audit_inputs,
    black_box_layout,
    bpda,
    evaluate_suite,
    first_inputs,
    get_suite,
    standard_suite,
    suite_notes,
    transfer,
)
from .surrogate import (
    DEFAULT_TEMPERATURE,
    SURROGATE_MODES,
    capped_sites,
    surrogate_derivative,
    surrogate_gradients,
    uncapped_twin,
    with_surrogate_gradients,
)

__all__ = [
    "BLACK_BOX_FAMILIES",
    "CAPPED_TYPES",
    "DEFAULT_TEMPERATURE",
    "SUITES",
    "SURROGATE_MODES",
    "CapScan",
    "CapSite",
    "LayoutAttack",
    "SurrogateAttack",
    "TransferAttack",
    "attack_kind",
    "audit_inputs",
    "black_box_layout",
    "bpda",
    "cap_statistics",
    "capped_sites",
    "eager_module",
    "evaluate_suite",
    "find_caps",
    "first_inputs",
    "get_suite",
    "module_cap",
    "opaque_modules",
    "standard_suite",
    "suite_notes",
    "surrogate_derivative",
    "surrogate_gradients",
    "transfer",
    "uncapped_twin",
    "with_surrogate_gradients",
]
