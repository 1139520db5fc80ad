"""One adapter module per attack library; the only places that import ART, Foolbox or torchattacks.

Each adapter module defines ``LIBRARY``, ``ATTACKS`` (canonical name -> :class:`Attack` subclass),
``ALIASES`` (extra names, see :func:`build_attack`) and ``build(name, threat_model, overrides,
batch_size)``. Importing an adapter module does not import its library: attacks import it when
they run or build native objects, through :meth:`LibraryInfo.require`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import random
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch
from torch import nn

from ..threat import ThreatModel
from .base import _TM_FIELDS, LibraryAttack

__all__ = [
    "LIBRARIES", "LibraryAttack", "LibraryInfo", "ModelView", "build_attack", "load_adapter",
    "native_library", "native_notes", "read_native",
]


@dataclass(frozen=True)
class LibraryInfo:
    """An attack library: its import name, distribution, and the extra that installs it."""

    name: str
    module: str
    distribution: str | None
    extra: str | None
    adapter: str

    def installed(self) -> bool:
        """Whether the library can be imported (checked without importing it)."""
        return importlib.util.find_spec(self.module) is not None

    def install_hint(self) -> str:
        return f'pip install "relucap-plugin[{self.extra}]"' if self.extra else "it ships with torch"

    def status(self) -> str:
        if not self.installed():
            return f"missing: {self.install_hint()}"
        if self.distribution is None:
            return "built in"
        try:
            return f"installed {importlib.metadata.version(self.distribution)}"
        except importlib.metadata.PackageNotFoundError:
            return "installed"

    def require(self) -> ModuleType:
        """Import the library, or raise ImportError naming the extra to install.

        The caller's ``random`` and torch RNG states are kept: importing ART draws from
        ``random`` (a module it imports does).
        """
        py_state, torch_state = random.getstate(), torch.get_rng_state()
        try:
            return importlib.import_module(self.module)
        except ImportError as exc:
            raise ImportError(
                f"attacks from {self.name!r} need the {self.distribution or self.module} package: "
                f"{self.install_hint()} ({exc})"
            ) from exc
        finally:
            random.setstate(py_state)
            torch.set_rng_state(torch_state)


LIBRARIES: dict[str, LibraryInfo] = {
    # the torch backend's module is not called ``torch``: it would shadow torch in this package
    "torch": LibraryInfo("torch", "torch", None, None, "plain_torch"),
    "torchattacks": LibraryInfo("torchattacks", "torchattacks", "torchattacks", "torchattacks", "torchattacks"),
    "foolbox": LibraryInfo("foolbox", "foolbox", "foolbox", "foolbox", "foolbox"),
    "art": LibraryInfo("art", "art", "adversarial-robustness-toolbox", "art", "art"),
}


def load_adapter(library: str) -> ModuleType:
    """The adapter module of ``library`` (``"art"``, ``"foolbox"``, ``"torchattacks"``, ``"torch"``:
    :mod:`~relucap_plugin.adapters.plain_torch`)."""
    key = library.strip().lower() if isinstance(library, str) else library
    if key not in LIBRARIES:
        raise ValueError(f"unknown attack library {library!r}; valid: {', '.join(LIBRARIES)}")
    return importlib.import_module(f"{__name__}.{LIBRARIES[key].adapter}")


def _key(name: str) -> str:
    return name.lower().replace("-", "").replace("_", "")


def build_attack(
    library: str,
    attacks: dict[str, type],
    aliases: dict[str, tuple[str | dict[str, str], dict[str, Any]]],
    name: str,
    threat_model: ThreatModel,
    overrides: dict[str, Any],
    batch_size: int | None = None,
) -> Any:
    """Resolve ``name`` in an adapter's tables and build the attack (the library is imported).

    ``aliases`` maps a name to ``(target, changes)``: ``target`` is a canonical name or a dict
    ``{"Linf": name, "L2": name}`` chosen by the threat model's norm; ``changes`` are threat-model
    fields the alias sets (``"APGD-DLR"`` -> ``{"loss": "dlr"}``). Overrides that name ThreatModel
    fields join ``changes``; the rest are the library's own parameters.
    """
    info = LIBRARIES[library]
    canonical = {_key(k): k for k in attacks}
    alias_table = {_key(k): v for k, v in aliases.items()}
    key = _key(name)
    changes: dict[str, Any] = {}
    if key in alias_table:
        target_spec, changes = alias_table[key]
        changes = dict(changes)
        norm = ThreatModel(**{**threat_model.to_dict(), **changes, **{k: v for k, v in overrides.items() if k in _TM_FIELDS}}).norm
        if isinstance(target_spec, dict):
            if norm not in target_spec:
                raise ValueError(
                    f"{library}:{name} has no {norm} variant; it exists for {', '.join(target_spec)}"
                )
            target = target_spec[norm]
        else:
            target = target_spec
    elif key in canonical:
        target = canonical[key]
    else:
        names = sorted(attacks, key=str.lower)
        extra = sorted(aliases, key=str.lower)
        raise ValueError(
            f"unknown {library} attack {name!r}; valid: {', '.join(names)}"
            + (f" (aliases: {', '.join(extra)})" if extra else "")
        )
    info.require()
    changes.update({k: v for k, v in overrides.items() if k in _TM_FIELDS})
    native = {k: v for k, v in overrides.items() if k not in _TM_FIELDS}
    cls = attacks[target]
    return cls(threat_model, native, changes=changes, name=f"{library}:{target}", batch_size=batch_size)


class ModelView(nn.Module):
    """The caller's model as a library sees it: inputs ``u`` in the library's space.

    ``x = low + (high - low) * u`` (for libraries that hard-code [0, 1]), reshaped to
    ``sample_shape`` (for libraries that need 4-D input) and cast to the model's dtype (ART
    works in float32 and HopSkipJump promotes to float64 under numpy 2). The empty ``anchor``
    parameter gives libraries that read the device from ``model.parameters()`` a device even
    for a model without parameters (torchattacks).

    With ``keep_modes`` (the views in native objects handed to users) the libraries' ``train()``
    and ``eval()`` calls stop at the view and every forward runs the model in eval mode, then
    restores each submodule's own mode: torchattacks would otherwise switch the whole model back
    to train mode after each call, and ART leaves it in eval mode.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        device: torch.device,
        dtype: torch.dtype,
        sample_shape: tuple[int, ...] | None = None,
        bounds: tuple[float, float] = (0.0, 1.0),
        keep_modes: bool = False,
    ) -> None:
        super().__init__()
        self.keep_modes = keep_modes
        if keep_modes:
            self.training = False
        self.anchor = nn.Parameter(torch.zeros(0, device=device, dtype=dtype), requires_grad=False)
        self.model = model
        self.dtype = dtype
        self.sample_shape = None if sample_shape is None else tuple(sample_shape)
        self.low, self.scale = float(bounds[0]), float(bounds[1] - bounds[0])

    @property
    def identity(self) -> bool:
        return self.low == 0.0 and self.scale == 1.0

    def to_model_space(self, u: torch.Tensor) -> torch.Tensor:
        x = u if self.identity else self.low + self.scale * u
        if self.sample_shape is not None:
            x = x.reshape(x.shape[0], *self.sample_shape)
        return x.to(self.dtype)

    def from_model_space(self, x: torch.Tensor, library_shape: tuple[int, ...] | None = None) -> torch.Tensor:
        u = x if self.identity else (x - self.low) / self.scale
        if library_shape is not None:
            u = u.reshape(u.shape[0], *library_shape)
        return u

    def train(self, mode: bool = True) -> ModelView:
        if not self.keep_modes:
            return super().train(mode)
        self.training = mode
        return self

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        if not self.keep_modes:
            return self.model(self.to_model_space(u))
        modes = [(m, m.training) for m in self.model.modules()]
        try:
            self.model.eval()
            return self.model(self.to_model_space(u))
        finally:
            for m, training in modes:
                m.training = training


_NATIVE_ROOTS = ("torchattacks", "art", "foolbox")


def native_library(obj: Any) -> str | None:
    """The attack library whose object ``obj`` is (``"art"``...), from its class's module, or
    None; ``(foolbox_attack, epsilons)`` counts as Foolbox's. No library is imported."""
    if isinstance(obj, tuple) and len(obj) == 2:
        return "foolbox" if native_library(obj[0]) == "foolbox" and _is_budget(obj[1]) else None
    root = type(obj).__module__.partition(".")[0]
    return root if root in _NATIVE_ROOTS else None


def _is_budget(value: Any) -> bool:
    values = value if isinstance(value, (list, tuple)) else [value]
    return bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


def read_native(obj: Any, threat_model: ThreatModel, batch_size: int | None = None) -> LibraryAttack:
    """The attack configured like the library attack object ``obj`` (a torchattacks ``Attack``, an
    ART ``EvasionAttack``, a Foolbox ``Attack`` or ``(foolbox_attack, epsilons)``), for
    ``threat_model``: its budget must match the threat model (ValueError otherwise); its other
    mapped settings change the attack's copy of the threat model. ``attack.native_fields``
    says which threat-model fields were read from it."""
    library = native_library(obj)
    if library is None:
        raise TypeError(f"{type(obj).__name__} is not an attack object of {', '.join(_NATIVE_ROOTS)}")
    eps = None
    if isinstance(obj, tuple):
        obj, eps = obj
    attack = load_adapter(library).from_native(obj, threat_model, eps, batch_size=batch_size)
    if attack is None:
        names = sorted({cls.cls_name for cls in load_adapter(library).ATTACKS.values()})
        raise TypeError(
            f"{library} {type(obj).__name__} objects are not supported; supported classes: "
            f"{', '.join(names)} (or pass a spec string such as '{library}:{names[0]}')"
        )
    return attack


def native_notes(attacks: list) -> list[str]:
    """One line per attack read from a library object: the threat-model fields read from it."""
    return [
        f"relucap: read from the {a.library} object: "
        + ", ".join(f"{k}={v!r}" for k, v in a.native_fields.items()) + f"; evaluated as {a.spec}"
        for a in attacks if getattr(a, "native_fields", None)
    ]
