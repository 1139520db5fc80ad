"""The threat model and evaluation settings every attack backend is configured from.

One :class:`ThreatModel` says what an attacker may do (norm, budgets, input bounds) and how hard
it tries (steps, step size, restarts, random start, loss). The adapters map it onto each
library's own parameters explicitly, so ART, Foolbox and torchattacks run the same attack
instead of their different defaults. :class:`EvalConfig` holds the settings that change speed
and reproducibility but not the attack: batch size, device, seed, number of samples.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, fields
from collections.abc import Mapping
from typing import Any, TypeVar

import torch

__all__ = ["LOSSES", "NORMS", "EvalConfig", "ThreatModel", "resolve_device"]

NORMS = ("Linf", "L2")
LOSSES = ("ce", "dlr", "margin")
_NORM_ALIASES = {"linf": "Linf", "inf": "Linf", "l_inf": "Linf", "l2": "L2", "2": "L2", "l_2": "L2"}

#: Madry et al.'s rule for the default step size: ``STEP_SIZE_FACTOR * eps / steps``, so that
#: ``steps`` steps can cross the eps-ball 2.5 times (and reach its boundary from a random start).
STEP_SIZE_FACTOR = 2.5


def _normalise_norm(norm: Any) -> str:
    if isinstance(norm, (int, float)) and not isinstance(norm, bool):
        norm = "inf" if math.isinf(norm) else str(int(norm)) if norm == int(norm) else str(norm)
    if isinstance(norm, str) and norm.strip().lower() in _NORM_ALIASES:
        return _NORM_ALIASES[norm.strip().lower()]
    raise ValueError(f"norm must be one of {', '.join(NORMS)} (case-insensitive; 'inf' = Linf), got {norm!r}")


def _as_float(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return float(value)
        try:
            import numpy as np

            if isinstance(value, np.generic):
                return float(value)
        except ImportError:  # pragma: no cover - numpy is a dependency
            pass
        raise TypeError(f"{what} must be a number, got {type(value).__name__} ({value!r})")
    return float(value)


#: Largest budgets accepted without ``RELUCAP_ALLOW_LARGE_BUDGET=1``: far beyond any published
#: evaluation (AutoAttack's Square uses 5000 queries), so a value above them is a typo (an extra
#: zero, eps passed as steps) that would run for days. Our own ceilings.
BUDGET_CEILINGS = {"steps": 100_000, "restarts": 1_000, "epochs": 10_000, "pgd_steps": 100_000, "square_queries": 100_000}


def check_budget(name: str, value: int) -> int:
    """``value`` if it is within :data:`BUDGET_CEILINGS` ``[name]`` or large budgets are allowed."""
    ceiling = BUDGET_CEILINGS[name]
    if value > ceiling and os.environ.get("RELUCAP_ALLOW_LARGE_BUDGET") != "1":
        raise ValueError(
            f"{name}={value} is above the ceiling {ceiling} (a run that long is usually a typo); "
            f"lower it, or set RELUCAP_ALLOW_LARGE_BUDGET=1 to allow it on purpose"
        )
    return value


def check_linf_eps(eps: float, bounds: tuple[float, float]) -> None:
    """Refuse an L-inf budget wider than the input range (every input reachable: 8 for 8/255)."""
    lo, hi = bounds
    if eps > hi - lo:
        raise ValueError(
            f"Linf eps {eps} exceeds the input range {hi - lo} of bounds {tuple(bounds)}: every "
            f"input would be reachable. Use eps <= {hi - lo} (pixels in [0, 1]: e.g. 0.3 or 8/255)"
        )


_S = TypeVar("_S", bound="_Settings")


class _Settings:
    """``to_dict``/``from_dict`` of the settings dataclasses below: the fields named in
    ``_tuples`` are lists in the dict (JSON) and tuples again when read back."""

    _tuples: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (lists for tuples); :meth:`from_dict` reads it back."""
        d = asdict(self)  # type: ignore[call-overload]
        return {**d, **{f: list(d[f]) for f in self._tuples if d[f] is not None}}

    @classmethod
    def from_dict(cls: type[_S], data: dict[str, Any]) -> _S:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error (not silently dropped)."""
        _check_fields(cls, data)
        data = {**data, **{f: tuple(data[f]) for f in cls._tuples if data.get(f) is not None}}
        return cls(**data)


@dataclass(frozen=True)
class ThreatModel(_Settings):
    """What the attacker may do and how hard it tries; the same for every library.

    ``norm`` is ``"Linf"`` or ``"L2"`` (``"linf"``/``"inf"``/``"l2"`` accepted). ``eps`` is one
    budget or a tuple of budgets, in the units of the input (pixels in ``bounds``). ``steps`` is
    the iteration count of iterative attacks and the query/iteration budget of the others (see
    each library's page); ``step_size`` is absolute, ``None`` means
    ``2.5 * eps / steps`` per budget (Madry et al.). ``restarts`` counts runs in total (1 = a
    single run). ``loss`` is ``"ce"``, ``"dlr"`` or ``"margin"`` (CW-style logit margin), where an
    attack offers a choice. ``targeted=True`` attacks a target class instead of the label.
    Instances are frozen so an evaluation cannot change the settings it records.
    """

    norm: str
    eps: tuple[float, ...]
    bounds: tuple[float, float] = (0.0, 1.0)
    steps: int = 40
    step_size: float | None = None
    restarts: int = 1
    random_start: bool = True
    targeted: bool = False
    loss: str = "ce"
    _tuples = ("eps", "bounds")

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "norm", _normalise_norm(self.norm))
        eps = self.eps
        if isinstance(eps, (str, bytes)) or not hasattr(eps, "__iter__"):
            eps = (eps,)
        elif isinstance(eps, torch.Tensor):
            eps = eps.flatten().tolist()
        eps = tuple(_as_float(e, "eps") for e in eps)
        if not eps:
            raise ValueError("eps must hold at least one budget, e.g. eps=0.3 or eps=(0.1, 0.3)")
        bad = [e for e in eps if not math.isfinite(e) or e < 0]
        if bad:
            raise ValueError(f"eps must be finite and >= 0, got {bad}; pass budgets like eps=(0.1, 0.3)")
        set_(self, "eps", eps)

        try:
            lo, hi = (_as_float(b, "bounds") for b in self.bounds)
        except (TypeError, ValueError):
            raise TypeError(f"bounds must be a pair of numbers (low, high), got {self.bounds!r}") from None
        if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"bounds must be finite with low < high, got {self.bounds!r}; e.g. (0.0, 1.0)")
        set_(self, "bounds", (lo, hi))
        if self.norm == "Linf":
            check_linf_eps(max(eps), self.bounds)

        for name in ("steps", "restarts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
            check_budget(name, value)
        if self.step_size is not None:
            step = _as_float(self.step_size, "step_size")
            if not (math.isfinite(step) and step > 0):
                raise ValueError(f"step_size must be > 0 or None (= 2.5 * eps / steps), got {self.step_size!r}")
            set_(self, "step_size", step)
        for name in ("random_start", "targeted"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        loss = self.loss.strip().lower() if isinstance(self.loss, str) else self.loss
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        set_(self, "loss", loss)

    @property
    def p(self) -> float:
        """The norm as a number: ``math.inf`` or ``2.0``."""
        return math.inf if self.norm == "Linf" else 2.0

    def step_size_for(self, eps: float) -> float:
        """Absolute step size used at budget ``eps``: ``step_size``, or ``2.5 * eps / steps``."""
        if self.step_size is not None:
            return self.step_size
        return STEP_SIZE_FACTOR * float(eps) / self.steps

    def with_eps(self, eps: float | tuple[float, ...]) -> ThreatModel:
        """A copy with other budgets (the rest unchanged)."""
        return self.replace(eps=eps)

    def replace(self, **changes: Any) -> ThreatModel:
        """A validated copy with ``changes`` applied."""
        return type(self)(**{**self.to_dict(), **changes})


_DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class EvalConfig(_Settings):
    """How an evaluation runs: batch size, device, seed and how many samples (None = all).

    ``device`` is ``"auto"`` (cuda if available, else cpu), ``"cpu"``, ``"cuda"``, ``"cuda:1"``
    or a :class:`torch.device`. ``input_shape`` is the real layout of one sample (e.g.
    ``(1, 28, 28)``) when the model takes flat vectors: black-box attacks search on it.
    """

    batch_size: int = 256
    device: str | torch.device = "auto"
    seed: int = 0
    n_samples: int | None = None
    input_shape: tuple[int, ...] | None = None
    _tuples = ("input_shape",)

    def __post_init__(self) -> None:
        if self.input_shape is not None:
            shape = self.input_shape
            if (isinstance(shape, (str, bytes)) or not hasattr(shape, "__iter__")
                    or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in shape)
                    or not len(tuple(shape))):
                raise ValueError(f"input_shape must be the positive sizes of one sample, e.g. (1, 28, 28); "
                                 f"got {shape!r}")
            object.__setattr__(self, "input_shape", tuple(shape))
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {self.batch_size!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"seed must be an int, got {self.seed!r}")
        if self.n_samples is not None and (
            isinstance(self.n_samples, bool) or not isinstance(self.n_samples, int) or self.n_samples < 1
        ):
            raise ValueError(f"n_samples must be an int >= 1 or None (all samples), got {self.n_samples!r}")
        device = self.device
        if isinstance(device, str):
            device = device.strip().lower()
            if device != "auto":
                try:
                    parsed = torch.device(device)
                except RuntimeError:
                    parsed = None
                if parsed is None or parsed.type not in ("cpu", "cuda"):
                    raise ValueError(f"device must be one of {', '.join(_DEVICES)} (or 'cuda:N'), got {self.device!r}")
            object.__setattr__(self, "device", device)
        elif not isinstance(device, torch.device):
            raise TypeError(f"device must be a string like 'auto'/'cpu'/'cuda' or a torch.device, got {device!r}")

    def resolve_device(self) -> torch.device:
        """The torch device to run on; ``"auto"`` is cuda when available, else cpu."""
        return resolve_device(self.device)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict (lists for tuples; a torch.device as its string);
        :meth:`from_dict` reads it back."""
        return {**super().to_dict(), "device": str(self.device)}


def as_eval_config(config: Any) -> EvalConfig:
    """``config`` (an :class:`EvalConfig`, a dict of its fields, or None) as an EvalConfig;
    anything else is a TypeError naming it."""
    if config is None:
        return EvalConfig()
    if isinstance(config, EvalConfig):
        return config
    if isinstance(config, Mapping):
        return EvalConfig.from_dict(dict(config))
    raise TypeError(f"config must be an EvalConfig, a dict of its fields or None, got "
                    f"{type(config).__name__} {config!r:.80}")


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> cuda if available else cpu; anything else through ``torch.device``.

    Asking for CUDA on a machine without it is a ``ValueError`` that says to use "auto" or "cpu".
    """
    if isinstance(device, str) and device.strip().lower() == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or a torch.device (got {device!r})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available; use device='auto' or 'cpu'")
    return resolved


def _check_fields(cls: type, data: dict[str, Any]) -> None:
    """Unknown keys of a ``from_dict`` input are an error, not silently dropped."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; valid: {sorted(names)}")
