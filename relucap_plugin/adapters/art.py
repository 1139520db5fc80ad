"""ART (adversarial-robustness-toolbox) adapter: the threat model mapped onto ART's parameters.

Quirks handled here: ART works on numpy float32 arrays and HopSkipJump promotes to float64 under
numpy 2 (the model is wrapped in a view that casts inputs to its own dtype); ART's batch size
defaults to 32 (about 8x slower than a torch loop: the harness batch size, or the whole input,
is passed); ``PyTorchClassifier`` moves the model to ``cuda:<current device>`` (it is built
under the model's own CUDA device); ART leaves the model in eval mode and zeroes weight
gradients (restored by the base class); ``SquareAttack`` needs ``clip_values`` (always passed);
``BoundaryAttack`` is targeted by default and ``AutoAttack``'s default set is not Croce and
Hein's (both configured explicitly); ART attacks the model's own prediction when no label is
given (labels are always passed); ART's PyTorch PGD rebuilds a full-size float64 eps array in
numpy for every L-inf projection (a scalar eps is projected with one ``clamp`` instead, same
values).
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import numpy as np
import torch

from .._torch import float_dtype, model_device
from ..attacks import CallContext, Native
from . import LIBRARIES, ModelView, build_attack
from .base import From, LibraryAttack

__all__ = ["ALIASES", "ATTACKS", "LIBRARY", "build"]

LIBRARY = "art"
_INFO = LIBRARIES[LIBRARY]
_ART_NORM = {"Linf": np.inf, "L2": 2}
_LOSS = {"ce": "cross_entropy", "dlr": "difference_logits_ratio"}


def _evasion(name: str) -> Any:
    _INFO.require()
    import art.attacks.evasion as evasion

    return getattr(evasion, name)


@functools.lru_cache(maxsize=None)
def _clamp_projection_pgd() -> type:
    """ART's ``ProjectedGradientDescentPyTorch`` with the per-step work of a scalar eps and step
    done in place of numpy round trips, same values: the L-inf projection is one
    ``clamp(-eps, eps)`` (ART: ``sign(v) * min(|v|, eps)`` after broadcasting eps to the batch in
    float64 numpy) and the step is ``x + step * g`` with NaN steps zeroed, clipped to the bounds
    (ART: builds three tensors from numpy at every step). Together about a third of ART's PGD
    time on a small model (``benchmarks/bench_harness.py``)."""
    _INFO.require()
    from art.attacks.evasion.projected_gradient_descent.projected_gradient_descent_pytorch import (
        ProjectedGradientDescentPyTorch,
    )

    class ClampProjectionPGD(ProjectedGradientDescentPyTorch):
        @staticmethod
        def _projection(values, eps, norm_p, *, suboptimal=True):
            if norm_p in (np.inf, "inf") and np.ndim(eps) == 0:
                return values.clamp(-float(eps), float(eps))
            return ProjectedGradientDescentPyTorch._projection(values, eps, norm_p, suboptimal=suboptimal)

        def _apply_perturbation_pytorch(self, x, perturbation, eps_step):
            if np.ndim(eps_step) != 0:
                return super()._apply_perturbation_pytorch(x, perturbation, eps_step)
            step = float(np.float32(eps_step)) * perturbation
            x = x + torch.where(step.isnan(), 0.0, step)
            if self.estimator.clip_values is not None:
                low, high = self.estimator.clip_values
                x = x.clamp(float(low), float(high))
            return x

    return ClampProjectionPGD


def _cuda_context(device: torch.device) -> contextlib.AbstractContextManager:
    """ART puts models on ``cuda:<current device>``: make that the model's device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def classifier(
    model: torch.nn.Module, *, input_shape: tuple[int, ...], num_classes: int,
    bounds: tuple[float, float], device: torch.device, dtype: torch.dtype = torch.float32,
    keep_modes: bool = False,
) -> Any:
    """An ART ``PyTorchClassifier`` for ``model`` (logits out, normalisation inside the model).

    Every argument ART would otherwise default is given: cross-entropy loss, ``clip_values`` =
    the bounds, no preprocessing, the model's device and class count. ``keep_modes``: see
    :class:`~relucap_plugin.adapters.ModelView`.
    """
    _INFO.require()
    from art.estimators.classification import PyTorchClassifier

    view = ModelView(model, device=device, dtype=dtype, keep_modes=keep_modes)
    with _cuda_context(device):
        return PyTorchClassifier(
            model=view, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(input_shape),
            nb_classes=int(num_classes), clip_values=tuple(bounds), preprocessing=None,
            channels_first=True, device_type="gpu" if device.type == "cuda" else "cpu",
        )


class ARTAttack(LibraryAttack):
    """Base of the ART attacks: a ``PyTorchClassifier`` on the model's device, numpy in and out."""

    library = LIBRARY
    dtypes = (torch.float16, torch.float32, torch.float64)  # numpy has no bfloat16
    defaults = {"verbose": False}  # where the class has it: no progress bars
    harness = {"verbose": "False (no progress bars)"}

    @classmethod
    def _library_class(cls) -> type:
        return _evasion(cls.cls_name)

    def _to_native(self, param, field, value):
        if field == "norm":
            return _ART_NORM[value]
        return _LOSS[value] if field == "loss" else value

    @classmethod
    def _from_native(cls, param, field, value, bounds):
        if field == "norm":
            return {"norm": {v: k for k, v in _ART_NORM.items()}.get(value, "Linf" if value == "inf" else value)}
        if field == "loss":
            return {"loss": {v: k for k, v in _LOSS.items()}.get(value, value)}
        if param == "num_random_init":  # 0: start at x
            return {"restarts": max(int(value), 1), "random_start": int(value) > 0}
        return {field: float(value) if field in ("eps", "step_size") else value}

    def _make(self, estimator: Any, eps: float, num_classes: int, batch_size: int) -> Any:
        return self._attack_class()(estimator, **self._kwargs(eps, num_classes, batch_size))

    def _attack_class(self) -> type:
        return self._library_class()

    def _run(self, model, x, y, eps, target, ctx: CallContext):
        tm = self.threat_model
        est = classifier(model, input_shape=tuple(x.shape[1:]), num_classes=ctx.num_classes,
                         bounds=tm.bounds, device=ctx.device, dtype=x.dtype)
        batch_size = ctx.batch_size or len(x)
        with _cuda_context(ctx.device):
            attack = self._make(est, eps, ctx.num_classes, batch_size)
            labels = target if target is not None else y
            x_adv = attack.generate(x=x.detach().cpu().numpy().astype(np.float32), y=labels.cpu().numpy())
        return torch.from_numpy(np.asarray(x_adv)).to(device=ctx.device, dtype=x.dtype)

    def _native(self, model, eps, *, input_shape, num_classes):
        if input_shape is None or num_classes is None:
            raise ValueError(f"{self.name}.native needs input_shape= (one sample, e.g. (1, 28, 28)) and num_classes= "
                             f"(got input_shape={input_shape!r}, num_classes={num_classes!r})")
        device, dtype = model_device(model), float_dtype(model, torch.float32)
        est = classifier(model, input_shape=tuple(input_shape), num_classes=num_classes,
                         bounds=self.threat_model.bounds, device=device, dtype=dtype, keep_modes=True)
        batch_size = self.batch_size or 256
        with _cuda_context(device):
            return Native(est, self._make(est, eps, num_classes, batch_size), {})


class FastGradientMethod(ARTAttack):
    """FGSM (Linf) / FGM (L2): one step of size eps from the clean input."""

    family = "FGSM"
    native_name = cls_name = "FastGradientMethod"
    losses = ("ce",)
    mapping = {"norm": "norm", "eps": "eps", "eps_step": "eps", "targeted": "targeted", "batch_size": "batch_size"}
    defaults = {"num_random_init": 0, "minimal": False}


class ProjectedGradientDescent(ARTAttack):
    """PGD; ``random_start`` + ``restarts`` become ``num_random_init`` (0 = start at x)."""

    family = "PGD"
    native_name = cls_name = "ProjectedGradientDescent"
    losses = ("ce",)
    native_restarts = True
    mapping = {"norm": "norm", "eps": "eps", "eps_step": "step_size", "max_iter": "steps",
               "targeted": "targeted", "num_random_init": "restarts", "batch_size": "batch_size"}
    defaults = {"decay": None, "random_eps": False}
    harness = {**ARTAttack.harness, "num_random_init": "restarts, or 0 without random_start"}

    def _adjust(self, kwargs, eps, num_classes, batch_size):
        if not self.threat_model.random_start:
            kwargs["num_random_init"] = 0
        if self.threat_model.norm == "Linf":
            # float32 arrays (ART accepts them; its L2 random start does not): ART broadcasts eps
            # to the batch's shape at every projection, in float64 for a Python float (~20% of
            # ART's PGD time)
            kwargs["eps"], kwargs["eps_step"] = (np.asarray(kwargs[k], dtype=np.float32) for k in ("eps", "eps_step"))
        return kwargs

    def _attack_class(self) -> type:
        # ART's ProjectedGradientDescent picks its PyTorch implementation for a PyTorchClassifier;
        # build that implementation directly, with the one-clamp L-inf projection.
        return _clamp_projection_pgd()


class CarliniL2Method(ARTAttack):
    family = "CW"
    native_name = cls_name = "CarliniL2Method"
    norms = ("L2",)
    minimum_norm = True
    mapping = {"targeted": "targeted", "max_iter": "steps", "batch_size": "batch_size"}
    defaults = {"confidence": 0.0, "learning_rate": 0.01, "binary_search_steps": 10, "initial_const": 0.01,
                "max_halving": 5, "max_doubling": 5}


class DeepFool(ARTAttack):
    """DeepFool (L2) over the ``min(10, classes)`` most likely classes (``nb_grads``), overshoot
    ``epsilon=0.02`` like torchattacks and Foolbox (ART's default is 1e-6)."""

    family = native_name = cls_name = "DeepFool"
    norms = ("L2",)
    minimum_norm, supports_targeted = True, False
    mapping = {"max_iter": "steps", "batch_size": "batch_size"}
    defaults = {"nb_grads": From("candidate_classes"), "epsilon": 0.02}


class AutoProjectedGradientDescent(ARTAttack):
    """APGD; its first step is 2 * eps as in Croce and Hein (``step_size`` is not used)."""

    family = "APGD"
    native_name = cls_name = "AutoProjectedGradientDescent"
    losses = ("ce", "dlr")
    native_restarts = True
    mapping = {"norm": "norm", "eps": "eps", "max_iter": "steps", "targeted": "targeted",
               "nb_random_init": "restarts", "batch_size": "batch_size", "loss_type": "loss"}
    harness = {**ARTAttack.harness, "eps_step": "2 * eps"}

    def _adjust(self, kwargs, eps, num_classes, batch_size):
        return {**kwargs, "eps_step": 2 * eps}


class SquareAttack(ARTAttack):
    """Square: ``steps`` is the query budget per restart; ART's margin loss."""

    family = "Square"
    dtypes = (torch.float32, torch.float64)  # fails in float16/bfloat16
    native_name = cls_name = "SquareAttack"
    native_restarts = True
    supports_targeted = False
    mapping = {"norm": "norm", "eps": "eps", "max_iter": "steps", "nb_restarts": "restarts",
               "batch_size": "batch_size"}
    defaults = {"p_init": 0.8}


class AutoAttack(ARTAttack):
    """APGD-CE, APGD-DLR and Square, configured explicitly (ART's default set adds DeepFool and
    differs from Croce and Hein's; ART has no FAB). APGD runs ``steps`` iterations with
    ``restarts`` random starts; Square 5000 queries unless ``n_queries`` is overridden."""

    family = native_name = cls_name = "AutoAttack"
    dtypes = (torch.float32, torch.float64)  # its Square part fails in float16/bfloat16
    supports_targeted = False
    native_restarts = True
    min_classes = 3
    readable = False
    discover_overrides = False
    extra_overrides = ("n_queries",)
    mapping = {"norm": "norm", "eps": "eps", "batch_size": "batch_size"}
    defaults = {"targeted": False}
    harness = {"eps_step": "2 * eps", "attacks": "APGD-CE, APGD-DLR, Square (built from the threat model)"}

    def _make(self, estimator, eps, num_classes, batch_size):
        tm = self.threat_model
        members = [
            AutoProjectedGradientDescent(tm.replace(loss=loss, targeted=False))._make(estimator, eps, num_classes, batch_size)
            for loss in ("ce", "dlr")
        ]
        square = SquareAttack(tm.replace(steps=int(self.overrides.get("n_queries", 5000)), targeted=False))
        members.append(square._make(estimator, eps, num_classes, batch_size))
        kwargs = {**self._kwargs(eps, num_classes, batch_size), "eps_step": 2 * eps, "attacks": members}
        return self._attack_class()(estimator, **kwargs)


class BoundaryAttack(ARTAttack):
    """Decision-based (L2); ``steps`` is ``max_iter``; ``targeted`` passed (ART defaults to True)."""

    family = "Boundary"
    native_name = cls_name = "BoundaryAttack"
    norms = ("L2",)
    minimum_norm, supports_targeted = True, False
    mapping = {"max_iter": "steps", "batch_size": "batch_size"}
    defaults = {"targeted": False, "delta": 0.01, "epsilon": 0.01, "step_adapt": 0.667, "num_trial": 25,
                "sample_size": 20, "init_size": 100}
    harness = {**ARTAttack.harness, "targeted": "False (untargeted only)"}


class HopSkipJump(ARTAttack):
    """Decision-based; ``steps`` is ``max_iter``, the norm ART's ``norm`` (2 or inf)."""

    family = native_name = cls_name = "HopSkipJump"
    minimum_norm, supports_targeted = True, False
    mapping = {"norm": "norm", "max_iter": "steps", "batch_size": "batch_size"}
    defaults = {"targeted": False, "max_eval": 10000, "init_eval": 100, "init_size": 100}
    harness = {**ARTAttack.harness, "targeted": "False (untargeted only)"}


ATTACKS: dict[str, type[ARTAttack]] = {
    cls.native_name: cls
    for cls in (
        FastGradientMethod, ProjectedGradientDescent, CarliniL2Method, DeepFool,
        AutoProjectedGradientDescent, SquareAttack, AutoAttack, BoundaryAttack, HopSkipJump,
    )
}
ALIASES: dict[str, tuple[Any, dict[str, Any]]] = {
    "FGSM": ("FastGradientMethod", {}),
    "FGM": ("FastGradientMethod", {}),
    "PGD": ("ProjectedGradientDescent", {}),
    "CW": ("CarliniL2Method", {}),
    "CW-L2": ("CarliniL2Method", {}),
    "APGD": ("AutoProjectedGradientDescent", {}),
    "APGD-CE": ("AutoProjectedGradientDescent", {"loss": "ce"}),
    "APGD-DLR": ("AutoProjectedGradientDescent", {"loss": "dlr"}),
    "Square": ("SquareAttack", {}),
    "Boundary": ("BoundaryAttack", {}),
    "HSJ": ("HopSkipJump", {}),
    "HopSkipJumpAttack": ("HopSkipJump", {}),
}


def build(name, threat_model, overrides, batch_size=None):
    return build_attack(LIBRARY, ATTACKS, ALIASES, name, threat_model, overrides, batch_size)


def from_native(obj, threat_model, eps=None, batch_size=None):
    """The attack configured like the ART attack object ``obj`` (None: not one of ours)."""
    member = ARTAttack.member_for(ATTACKS, obj)
    if member is None and type(obj).__name__.startswith("ProjectedGradientDescent"):
        member = ProjectedGradientDescent  # ART's framework-specific PGD classes, same parameters
    return None if member is None else member.from_native(obj, threat_model, eps, batch_size=batch_size)
