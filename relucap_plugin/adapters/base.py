"""``LibraryAttack``: the one base of every library attack (ART, Foolbox, torchattacks).

A member declares, as data, the library class it builds (``cls_name``), its ``mapping``
(native parameter -> the threat-model field it comes from) and its ``defaults`` (library
parameters outside the threat model that are set explicitly, so the same attack behaves alike
across libraries). The base builds the library object from them, discovers the overridable
parameters from the class's signature, refuses overrides of mapped parameters, and reads a
user's configured library object back into a threat model (:meth:`LibraryAttack.from_native`).
Each library's base converts units (:meth:`LibraryAttack._to_native`,
:meth:`LibraryAttack._from_native`); a member has at most one hook, :meth:`LibraryAttack._adjust`.
Reading native objects back is our own design.

A member is a few lines; torchattacks' PGD:

    class PGD(TorchattacksAttack):
        family = native_name = cls_name = "PGD"
        norms, losses = ("Linf",), ("ce",)
        mapping = {"eps": "eps", "alpha": "step_size", "steps": "steps", "random_start": "random_start"}

Add it to the adapter's ``ATTACKS``; ``tests/test_adapters.py`` then runs it for every norm.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, fields
from typing import Any, ClassVar

from ..attacks import Attack
from ..threat import ThreatModel

__all__ = ["CONTEXT_FIELDS", "From", "LibraryAttack"]

_TM_FIELDS = {f.name for f in fields(ThreatModel)}

#: mapping targets that are not threat-model fields: the model's class count, the harness batch
#: size, ``min(10, classes)`` (the candidate classes of DeepFool), and a value the harness sets
#: (the mapping's documentation says which)
CONTEXT_FIELDS = ("num_classes", "batch_size", "candidate_classes")



@dataclass(frozen=True)
class From:
    """A default whose value comes from a threat-model or context field (``From("candidate_classes")``)."""

    field: str


#: fields a native object must agree on with the threat model (its budget); the others it may
#: change for this attack (they show in the attack's spec)
_BUDGET_FIELDS = ("norm", "targeted")


class LibraryAttack(Attack):
    """An attack of a library, built from the threat model through the member's data."""

    #: the library's class, looked up in :meth:`_library_class`
    cls_name: ClassVar[str] = ""
    #: native parameter -> threat-model field (or one of :data:`CONTEXT_FIELDS`)
    mapping: ClassVar[dict[str, str]] = {}
    #: library parameters set explicitly (overridable), merged over the class hierarchy
    defaults: ClassVar[dict[str, Any]] = {}
    #: parameters the harness sets that are not in ``mapping``: name -> what sets them
    harness: ClassVar[dict[str, str]] = {}
    #: extra overrides consumed by :meth:`_adjust` (not passed to the constructor)
    extra_overrides: ClassVar[tuple[str, ...]] = ()
    #: overridable parameters come from the class's signature (False: ``extra_overrides`` only)
    discover_overrides: ClassVar[bool] = True
    #: a configured library object of this class can be read back by :meth:`from_native`
    readable: ClassVar[bool] = True
    #: threat-model fields read from a library object by :meth:`from_native` (None: built here)
    native_fields: dict[str, Any] | None = None

    # -- library hooks (one per library base) -----------------------------------------------------

    @classmethod
    def _library_class(cls) -> type:
        raise NotImplementedError

    def _to_native(self, param: str, field: str, value: Any) -> Any:
        """A threat-model value in the library's units (default: unchanged)."""
        return value

    @classmethod
    def _from_native(cls, param: str, field: str, value: Any, bounds: tuple[float, float]) -> dict[str, Any]:
        """Threat-model fields from a native parameter's value (default: ``{field: value}``)."""
        return {field: value}

    # -- the member's hook ----------------------------------------------------------------------

    def _adjust(self, kwargs: dict[str, Any], eps: float, num_classes: int, batch_size: int) -> dict[str, Any]:
        """Last changes to the constructor arguments (or to the built object: see subclasses)."""
        return kwargs

    # -- building ---------------------------------------------------------------------------------

    @classmethod
    def _all_defaults(cls) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for klass in reversed(cls.__mro__):
            merged.update(vars(klass).get("defaults", {}))
        return merged

    def _value(self, field: str, eps: float, num_classes: int, batch_size: int) -> Any:
        tm = self.threat_model
        if field == "eps":
            return eps
        if field == "step_size":
            return tm.step_size_for(eps)
        if field == "num_classes":
            return num_classes
        if field == "batch_size":
            return batch_size
        if field == "candidate_classes":
            return min(10, num_classes)
        return getattr(tm, field)

    def _kwargs(self, eps: float, num_classes: int, batch_size: int) -> dict[str, Any]:
        """Constructor arguments: mapping, then defaults, then the user's overrides."""
        mapped = {p: self._to_native(p, f, self._value(f, eps, num_classes, batch_size))
                  for p, f in self.mapping.items()}
        accepted = self._signature()
        defaults = {k: self._value(v.field, eps, num_classes, batch_size) if isinstance(v, From) else v
                    for k, v in self._all_defaults().items() if accepted is None or k in accepted}
        overrides = {k: v for k, v in self.overrides.items() if k not in self.extra_overrides}
        return self._adjust({**mapped, **defaults, **overrides}, eps, num_classes, batch_size)

    @classmethod
    def _signature(cls) -> list[str] | None:
        try:
            return list(inspect.signature(cls._library_class()).parameters)
        except (TypeError, ValueError):
            return None

    # -- checks and documentation -----------------------------------------------------------------

    def _mapped_parameters(self) -> dict[str, str]:
        return {**self.mapping, **self.harness}

    def _accepted_overrides(self) -> list[str]:
        if not self.discover_overrides:
            return list(self.extra_overrides)
        skip = {"self", "model", "estimator", "classifier", *self._mapped_parameters()}
        return [p for p in (self._signature() or []) if p not in skip] + list(self.extra_overrides)

    # -- native objects back ----------------------------------------------------------------------

    @classmethod
    def member_for(cls, members: dict[str, type[LibraryAttack]], obj: Any) -> type[LibraryAttack] | None:
        """The member of ``members`` whose library class is exactly ``obj``'s class (a subclass may
        change what its parameters mean, so it is not matched)."""
        for member in members.values():
            if member.cls_name and member._library_class() is type(obj):
                return member
        return None

    @classmethod
    def from_native(
        cls, obj: Any, threat_model: ThreatModel, eps: Any = None, *, batch_size: int | None = None,
    ) -> LibraryAttack:
        """This attack configured like the library object ``obj``, for ``threat_model``.

        The budget (``eps``, ``norm``, ``targeted``) must agree with the threat model (ValueError
        otherwise); the other mapped fields read from ``obj`` change this attack's copy of the
        threat model, and the library parameters that differ from ours become overrides. What was
        read is in :attr:`native_fields`.
        """
        label = f"the {cls.library} {type(obj).__name__} object"
        if not cls.readable:
            raise ValueError(
                f"{label} cannot be read back faithfully (its members are configured apart); pass "
                f"the spec string {cls.library}:{cls.native_name!r} with the threat model instead"
            )
        read: dict[str, Any] = {}
        for param, field in cls.mapping.items():
            if field in _TM_FIELDS and hasattr(obj, param):
                read.update(cls._from_native(param, field, getattr(obj, param), threat_model.bounds))
        if eps is not None:
            read["eps"] = eps
        if "eps" not in read:
            read["eps"] = threat_model.eps
        _check_budget(label, read, threat_model)
        changes = {k: v for k, v in read.items()
                   if k not in ("eps", *_BUDGET_FIELDS) and v != getattr(threat_model, k)}
        if changes.get("step_size") is not None and threat_model.step_size is None:
            derived = threat_model.replace(**{k: v for k, v in changes.items() if k != "step_size"})
            if math.isclose(derived.step_size_for(threat_model.eps[0]), changes["step_size"], rel_tol=1e-6):
                del changes["step_size"]
        overrides = cls._read_overrides(obj)
        attack = cls(threat_model, overrides, changes=changes, batch_size=batch_size)
        attack.native_fields = read
        return attack

    @classmethod
    def _read_overrides(cls, obj: Any) -> dict[str, Any]:
        """Library parameters of ``obj`` outside the mapping that differ from what we would set."""
        try:
            params = inspect.signature(cls._library_class()).parameters
        except (TypeError, ValueError):
            return {}
        ours = cls._all_defaults()
        skip = {"self", "model", "estimator", "classifier", *cls.mapping, *cls.harness}
        out = {}
        for name, param in params.items():
            if name in skip or name in cls.extra_overrides or not hasattr(obj, name):
                continue
            value = getattr(obj, name)
            default = ours.get(name, param.default)
            if not isinstance(value, (bool, int, float, str, type(None))):
                continue
            comparable = default in (inspect.Parameter.empty, None) or isinstance(value, type(default)) or (
                isinstance(value, (int, float)) and isinstance(default, (int, float)))
            if comparable and (default is inspect.Parameter.empty or value != default):
                out[name] = value  # (an attribute of another type is the library's own state)
        return out


def _check_budget(label: str, read: dict[str, Any], tm: ThreatModel) -> None:
    eps = read["eps"]
    eps = tuple(float(e) for e in (eps if isinstance(eps, (tuple, list)) else [eps]))
    if len(eps) != len(tm.eps) or not all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
                                          for a, b in zip(sorted(eps), sorted(tm.eps))):
        raise ValueError(
            f"{label} has eps {', '.join(f'{e:g}' for e in eps)}, but the threat model's budgets are "
            f"{', '.join(f'{e:g}' for e in tm.eps)}; build the object with the threat model's eps, "
            f"pass ThreatModel(eps={eps[0] if len(eps) == 1 else eps!r}), or use a spec string to "
            "sweep several budgets"
        )
    read["eps"] = eps if len(eps) > 1 else eps[0]
    for field in _BUDGET_FIELDS:
        if field in read and read[field] != getattr(tm, field):
            raise ValueError(
                f"{label} has {field}={read[field]!r}, but the threat model says "
                f"{field}={getattr(tm, field)!r}; make them agree (one threat model per evaluation)"
            )
