"""torchattacks adapter: the threat model mapped onto torchattacks' own parameters.

Quirks handled here: torchattacks hard-codes inputs in [0, 1] and 4-D images (other bounds and
shapes are mapped through :class:`~relucap_plugin.adapters.ModelView`, eps and step sizes scaled
by the width of the bounds); it reads the device from the model's first parameter (the view
carries an empty parameter on the right device); APGD, Square and AutoAttack reseed the global
torch RNG (runs happen inside ``fork_rng`` with a seed drawn from the caller's generator);
AutoAttack, APGDT and FAB assume 10 classes unless told (the model's class count is passed);
targeted mode is set by label, never randomly; after each call it puts the whole model back in
train mode if the model it holds was in train mode (the native objects handed out hold a view
that keeps each submodule's own mode).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from .._torch import float_dtype, model_device
from ..attacks import CallContext, Native
from . import LIBRARIES, ModelView, build_attack
from .base import LibraryAttack

__all__ = ["ALIASES", "ATTACKS", "LIBRARY", "build"]

LIBRARY = "torchattacks"
_INFO = LIBRARIES[LIBRARY]
_SEED = {"seed": "drawn from the caller's torch generator"}


class TorchattacksAttack(LibraryAttack):
    """Base of the torchattacks attacks: build the torchattacks object, run it, map back."""

    library = LIBRARY
    #: the class reseeds the global RNG from a ``seed`` argument
    seeded_class: ClassVar[bool] = False

    @classmethod
    def _library_class(cls) -> type:
        return getattr(_INFO.require(), cls.cls_name)

    def _scale(self) -> float:
        lo, hi = self.threat_model.bounds
        return hi - lo

    def _to_native(self, param, field, value):
        return value / self._scale() if field in ("eps", "step_size") else value

    @classmethod
    def _from_native(cls, param, field, value, bounds):
        scale = bounds[1] - bounds[0]
        return {field: float(value) * scale if field in ("eps", "step_size") else value}

    def _make(self, view: ModelView, eps: float, num_classes: int, seed: int | None = None) -> Any:
        kwargs = self._kwargs(eps, num_classes, self.batch_size or 0)
        if self.seeded_class:
            kwargs["seed"] = seed
        attack = self._library_class()(view, **kwargs)
        attack.set_device(view.anchor.device)
        attack.set_model_training_mode(model_training=False, batchnorm_training=False, dropout_training=False)
        if self.threat_model.targeted:
            attack.set_mode_targeted_by_label(quiet=True)
        return attack

    def _run(self, model, x, y, eps, target, ctx: CallContext):
        shape = tuple(x.shape[1:])
        view = ModelView(model, device=ctx.device, dtype=x.dtype, bounds=self.threat_model.bounds,
                         sample_shape=None if len(shape) == 3 else shape)
        u = view.from_model_space(x, None if x.dim() == 4 else (1, 1, x[0].numel()))
        seed = int(torch.randint(2**31 - 1, ())) if self.seeded_class else None
        attack = self._make(view, eps, ctx.num_classes, seed)
        labels = target if target is not None else y
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=self.seeded_class):
            u_adv = attack(u, labels)
        return view.to_model_space(u_adv.detach()).reshape(x.shape)

    def _native(self, model, eps, *, input_shape, num_classes):
        device, dtype = model_device(model), float_dtype(model, torch.float32)
        if input_shape is not None and len(input_shape) != 3:
            raise ValueError(f"torchattacks works on images (C, H, W); pass input_shape of length 3, got {input_shape!r}")
        view = ModelView(model, device=device, dtype=dtype, bounds=self.threat_model.bounds, keep_modes=True)
        if num_classes is None and "num_classes" in self.mapping.values():
            raise ValueError(f"{self.name}.native needs num_classes= (torchattacks assumes 10 otherwise)")
        seed = 0 if self.seeded_class else None
        return Native(view, self._make(view, eps, num_classes or 10, seed), {})


class FGSM(TorchattacksAttack):
    family = native_name = cls_name = "FGSM"
    norms, losses = ("Linf",), ("ce",)
    mapping = {"eps": "eps"}


class PGD(TorchattacksAttack):
    family = native_name = cls_name = "PGD"
    norms, losses = ("Linf",), ("ce",)
    mapping = {"eps": "eps", "alpha": "step_size", "steps": "steps", "random_start": "random_start"}


class PGDL2(PGD):
    native_name = cls_name = "PGDL2"
    norms = ("L2",)


class CW(TorchattacksAttack):
    family = native_name = cls_name = "CW"
    norms = ("L2",)
    minimum_norm = True
    mapping = {"steps": "steps"}
    defaults = {"c": 1.0, "kappa": 0.0, "lr": 0.01}


class DeepFool(TorchattacksAttack):
    family = native_name = cls_name = "DeepFool"
    norms = ("L2",)
    minimum_norm, supports_targeted = True, False
    mapping = {"steps": "steps"}
    defaults = {"overshoot": 0.02}


class APGD(TorchattacksAttack):
    """APGD: its own step-size schedule and random start (``step_size``/``random_start`` unused)."""

    family = native_name = cls_name = "APGD"
    dtypes = (torch.float32, torch.float64)  # fails in float16/bfloat16
    losses = ("ce", "dlr")
    supports_targeted = False
    native_restarts = seeded_class = True
    mapping = {"norm": "norm", "eps": "eps", "steps": "steps", "n_restarts": "restarts", "loss": "loss"}
    defaults = {"rho": 0.75, "eot_iter": 1}
    harness = _SEED


class APGDT(APGD):
    """Targeted-DLR APGD over the top ``n_classes - 1`` other classes (worst case, untargeted)."""

    family, native_name, cls_name = "APGD-T", "APGDT", "APGDT"
    losses = None
    min_classes = 4
    mapping = {"norm": "norm", "eps": "eps", "steps": "steps", "n_restarts": "restarts", "n_classes": "num_classes"}


class Square(TorchattacksAttack):
    """Square: ``steps`` is the query budget per restart; margin loss as in the paper."""

    family = native_name = cls_name = "Square"
    dtypes = (torch.float32, torch.float64)  # fails in float16/bfloat16
    native_restarts = seeded_class = True
    mapping = {"norm": "norm", "eps": "eps", "n_queries": "steps", "n_restarts": "restarts"}
    defaults = {"loss": "margin", "p_init": 0.8}
    harness = _SEED


class AutoAttack(TorchattacksAttack):
    """AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square) with the model's class count.

    torchattacks runs its APGD/APGD-T/FAB members with 10 steps (Croce and Hein use 100): here
    they run ``threat_model.steps``. Square keeps AutoAttack's 5000 queries unless the override
    ``n_queries`` says otherwise.
    """

    family = native_name = cls_name = "AutoAttack"
    dtypes = (torch.float32, torch.float64)  # its APGD and Square parts fail in float16/bfloat16
    supports_targeted = False
    native_restarts = seeded_class = True
    min_classes = 4
    readable = False
    mapping = {"norm": "norm", "eps": "eps", "n_classes": "num_classes"}
    defaults = {"version": "standard"}
    harness = {**_SEED, "member steps": "steps"}
    extra_overrides = ("n_queries",)

    def _make(self, view, eps, num_classes, seed=None):
        attack = super()._make(view, eps, num_classes, seed)
        for member in attack._autoattack.attacks:
            if hasattr(member, "n_queries"):
                member.n_queries = self.overrides.get("n_queries", 5000)
            elif hasattr(member, "steps"):
                member.steps = self.threat_model.steps
        return attack


ATTACKS: dict[str, type[TorchattacksAttack]] = {
    cls.native_name: cls for cls in (FGSM, PGD, PGDL2, CW, DeepFool, APGD, APGDT, Square, AutoAttack)
}
ALIASES: dict[str, tuple[Any, dict[str, Any]]] = {
    "PGD": ({"Linf": "PGD", "L2": "PGDL2"}, {}),
    "APGD-CE": ("APGD", {"loss": "ce"}),
    "APGD-DLR": ("APGD", {"loss": "dlr"}),
    "APGD-T": ("APGDT", {}),
    "CW-L2": ("CW", {}),
}


def build(name, threat_model, overrides, batch_size=None):
    return build_attack(LIBRARY, ATTACKS, ALIASES, name, threat_model, overrides, batch_size)


def from_native(obj, threat_model, eps=None, batch_size=None):
    """The attack configured like the torchattacks object ``obj`` (None: not one of ours)."""
    member = TorchattacksAttack.member_for(ATTACKS, obj)
    if member is None:
        return None
    if getattr(obj, "targeted", False) != threat_model.targeted:
        raise ValueError(f"the torchattacks {type(obj).__name__} object is "
                         f"{'targeted' if obj.targeted else 'untargeted'} but the threat model says "
                         f"targeted={threat_model.targeted}; make them agree")
    return member.from_native(obj, threat_model, eps, batch_size=batch_size)
