"""torchattacks adapter: the threat model mapped onto torchattacks' own parameters.

Quirks handled here: torchattacks hard-codes inputs in [0, 1] and 4-D images (other bounds and
shapes are mapped through :class:`~relucap_plugin.adapters.ModelView`); it reads the device from
the model's first parameter (the view carries an empty parameter on the right device); APGD,
Square and AutoAttack reseed the global torch RNG (runs happen inside ``fork_rng`` with a seed
drawn from the caller's generator); AutoAttack, APGDT and FAB assume 10 classes unless told
(the model's class count is passed); targeted mode is set by label, never randomly.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import torch

from ..attacks import Attack, CallContext, Native, _float_dtype, model_device
from . import LIBRARIES, ModelView, build_attack

__all__ = ["ALIASES", "ATTACKS", "LIBRARY", "build"]

LIBRARY = "torchattacks"
_INFO = LIBRARIES[LIBRARY]


class TorchattacksAttack(Attack):
    """Base of the torchattacks attacks: build the torchattacks object, run it, map back."""

    library = LIBRARY
    cls_name: ClassVar[str] = ""
    #: the class reseeds the global RNG from a ``seed`` argument
    seeded_class: ClassVar[bool] = False
    #: the class assumes 10 classes unless told (``n_classes``)
    needs_class_count: ClassVar[bool] = False

    def _kwargs(self, eps: float, num_classes: int) -> dict[str, Any]:
        """Constructor arguments from the threat model, in torchattacks' [0, 1] input space."""
        raise NotImplementedError

    def _mapped_parameters(self) -> dict[str, Any]:
        return self._kwargs(self.threat_model.eps[0], 10)

    def _accepted_overrides(self) -> list[str]:
        params = inspect.signature(getattr(_INFO.require(), self.cls_name)).parameters
        return [p for p in params if p not in ("self", "model", *self._mapped_parameters())]

    def _constructor_overrides(self) -> dict[str, Any]:
        return self.overrides

    def _scale(self) -> float:
        lo, hi = self.threat_model.bounds
        return hi - lo

    def _make(self, view: ModelView, eps: float, num_classes: int, seed: int | None = None) -> Any:
        ta = _INFO.require()
        kwargs = {**self._kwargs(eps / self._scale(), num_classes), **self._library_defaults(num_classes),
                  **self._constructor_overrides()}
        if self.seeded_class:
            kwargs["seed"] = seed
        attack = getattr(ta, self.cls_name)(view, **kwargs)
        attack.set_device(view.anchor.device)
        attack.set_model_training_mode(model_training=False, batchnorm_training=False, dropout_training=False)
        if self.threat_model.targeted:
            attack.set_mode_targeted_by_label(quiet=True)
        return attack

    def _view(self, model: torch.nn.Module, x: torch.Tensor, device: torch.device) -> ModelView:
        shape = tuple(x.shape[1:])
        return ModelView(
            model, device=device, dtype=x.dtype, bounds=self.threat_model.bounds,
            sample_shape=None if len(shape) == 3 else shape,
        )

    def _run(self, model, x, y, eps, target, ctx: CallContext):
        view = self._view(model, x, ctx.device)
        u = view.from_model_space(x, None if x.dim() == 4 else (1, 1, x[0].numel()))
        seed = int(torch.randint(2**31 - 1, ())) if self.seeded_class else None
        attack = self._make(view, eps, ctx.num_classes, seed)
        labels = target if target is not None else y
        devices = [ctx.device] if ctx.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=self.seeded_class):
            u_adv = attack(u, labels)
        return view.to_model_space(u_adv.detach()).reshape(x.shape)

    def _native(self, model, eps, *, input_shape, num_classes):
        device, dtype = model_device(model), _float_dtype(model, torch.float32)
        if input_shape is not None and len(input_shape) != 3:
            raise ValueError("torchattacks works on images (C, H, W); pass input_shape of length 3")
        view = ModelView(model, device=device, dtype=dtype, bounds=self.threat_model.bounds)
        if num_classes is None and self.needs_class_count:
            raise ValueError(f"{self.name}.native needs num_classes= (torchattacks assumes 10 otherwise)")
        seed = 0 if self.seeded_class else None
        return Native(view, self._make(view, eps, num_classes or 10, seed), {})


class FGSM(TorchattacksAttack):
    family, native_name, cls_name = "FGSM", "FGSM", "FGSM"
    norms = ("Linf",)
    losses = ("ce",)

    def _kwargs(self, eps, num_classes):
        return {"eps": eps}


class PGD(TorchattacksAttack):
    family, native_name, cls_name = "PGD", "PGD", "PGD"
    norms = ("Linf",)
    losses = ("ce",)

    def _kwargs(self, eps, num_classes):
        tm = self.threat_model
        return {
            "eps": eps, "alpha": tm.step_size_for(eps * self._scale()) / self._scale(),
            "steps": tm.steps, "random_start": tm.random_start,
        }


class PGDL2(PGD):
    native_name = cls_name = "PGDL2"
    norms = ("L2",)


class CW(TorchattacksAttack):
    family, native_name, cls_name = "CW", "CW", "CW"
    norms = ("L2",)
    minimum_norm = True

    def _kwargs(self, eps, num_classes):
        return {"steps": self.threat_model.steps}

    def _library_defaults(self, num_classes):
        return {"c": 1.0, "kappa": 0.0, "lr": 0.01}


class DeepFool(TorchattacksAttack):
    family, native_name, cls_name = "DeepFool", "DeepFool", "DeepFool"
    norms = ("L2",)
    minimum_norm = True
    supports_targeted = False

    def _kwargs(self, eps, num_classes):
        return {"steps": self.threat_model.steps}

    def _library_defaults(self, num_classes):
        return {"overshoot": 0.02}


class APGD(TorchattacksAttack):
    """APGD: its own step-size schedule and random start (``step_size``/``random_start`` unused)."""

    family, native_name, cls_name = "APGD", "APGD", "APGD"
    dtypes = (torch.float32, torch.float64)  # fails in float16/bfloat16
    losses = ("ce", "dlr")
    supports_targeted = False
    native_restarts = True
    seeded_class = True

    def _kwargs(self, eps, num_classes):
        tm = self.threat_model
        return {"norm": tm.norm, "eps": eps, "steps": tm.steps, "n_restarts": tm.restarts, "loss": tm.loss}

    def _library_defaults(self, num_classes):
        return {"rho": 0.75, "eot_iter": 1}

    def _mapped_parameters(self):
        return {**super()._mapped_parameters(), "seed": "drawn from the caller's torch generator"}


class APGDT(APGD):
    """Targeted-DLR APGD over the top ``n_classes - 1`` other classes (worst case, untargeted)."""

    family, native_name, cls_name = "APGD-T", "APGDT", "APGDT"
    losses = None
    min_classes = 4
    needs_class_count = True

    def _kwargs(self, eps, num_classes):
        tm = self.threat_model
        return {"norm": tm.norm, "eps": eps, "steps": tm.steps, "n_restarts": tm.restarts, "n_classes": num_classes}


class Square(TorchattacksAttack):
    """Square: ``steps`` is the query budget per restart; margin loss as in the paper."""

    family, native_name, cls_name = "Square", "Square", "Square"
    dtypes = (torch.float32, torch.float64)  # fails in float16/bfloat16
    native_restarts = True
    seeded_class = True

    def _kwargs(self, eps, num_classes):
        tm = self.threat_model
        return {"norm": tm.norm, "eps": eps, "n_queries": tm.steps, "n_restarts": tm.restarts}

    def _library_defaults(self, num_classes):
        return {"loss": "margin", "p_init": 0.8}

    def _mapped_parameters(self):
        return {**super()._mapped_parameters(), "seed": "drawn from the caller's torch generator"}


class AutoAttack(TorchattacksAttack):
    """AutoAttack (standard: APGD-CE, APGD-T, FAB-T, Square) with the model's class count.

    torchattacks runs its APGD/APGD-T/FAB members with 10 steps (Croce and Hein use 100): here
    they run ``threat_model.steps``. Square keeps AutoAttack's 5000 queries unless the override
    ``n_queries`` says otherwise.
    """

    family, native_name, cls_name = "AutoAttack", "AutoAttack", "AutoAttack"
    dtypes = (torch.float32, torch.float64)  # its APGD and Square parts fail in float16/bfloat16
    supports_targeted = False
    native_restarts = True
    seeded_class = True
    min_classes = 4
    needs_class_count = True

    def _kwargs(self, eps, num_classes):
        return {"norm": self.threat_model.norm, "eps": eps, "n_classes": num_classes}

    def _library_defaults(self, num_classes):
        return {"version": "standard"}

    def _mapped_parameters(self):
        return {**super()._mapped_parameters(), "seed": "drawn from the caller's torch generator",
                "member steps": self.threat_model.steps}

    def _accepted_overrides(self):
        return [*super()._accepted_overrides(), "n_queries"]

    def _constructor_overrides(self):
        return {k: v for k, v in self.overrides.items() if k != "n_queries"}

    def _make(self, view, eps, num_classes, seed=None):
        attack = super()._make(view, eps, num_classes, seed)
        for member in attack._autoattack.attacks:
            if hasattr(member, "n_queries"):
                member.n_queries = self.overrides.get("n_queries", 5000)
            elif hasattr(member, "steps"):
                member.steps = self.threat_model.steps
        return attack


ATTACKS: dict[str, type[Attack]] = {
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
