"""One interface to attacks from ART, Foolbox, torchattacks, a plain torch loop, or your own.

``get_attack("torchattacks:PGD", threat_model)`` returns an :class:`Attack`; calling it as
``attack(model, x, y, eps)`` returns ``x_adv`` with the shape, dtype and device of ``x``. The base
class owns what every backend shares: input checks, the caller's model mode, device,
``requires_grad`` flags and ``.grad`` tensors (restored afterwards), gradients under a caller's
``torch.no_grad()``, seeding, targets, restarts and the final projection onto the eps-ball. Each
library is imported only inside its adapter (``relucap_plugin.adapters.<library>``), when an
attack from it is asked for.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from ._format import short_repr
from ._torch import CallContext, caller_state, check_sample_ids, check_inputs, check_logits, check_module, clean_logits, float_dtype, model_device, seeded
from .registry import parse_spec
from .threat import NORMS, ThreatModel, check_linf_eps

__all__ = [
    "Attack",
    "AttackFn",
    "Native",
    "get_attack",
    "library_status",
    "list_attacks",
    "make_attack",
    "parse_attack",
    "project",
]

AttackFn = Callable[[nn.Module, torch.Tensor, torch.Tensor, float], torch.Tensor]


class Native(NamedTuple):
    """A library's own configured objects: ``model`` is the library's wrapper of the network (ART
    ``PyTorchClassifier``, Foolbox ``PyTorchModel``, or the module itself for torchattacks and
    torch) and ``attack`` the configured attack; ``call_kwargs`` what its call needs besides data
    (Foolbox: ``epsilons``)."""

    model: Any
    attack: Any
    call_kwargs: dict[str, Any]


# --------------------------------------------------------------------------------------------
# Specs


def parse_attack(spec: str) -> tuple[str, str, dict[str, Any]]:
    """Split ``"library:Name(key=value, ...)"`` into ``(library, name, overrides)``.

    Values must be literals (numbers, strings, True/False/None, inf, lists); nothing is
    evaluated. The library part is lower-cased; the name is kept as written (matched later,
    case-insensitively, by :func:`get_attack`). Names may contain ``-`` (``"APGD-DLR"``).
    """
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(
            f"attack spec must be a string 'library:Name' such as 'torchattacks:PGD' or "
            f"'art:ProjectedGradientDescent(norm=2)', got {spec!r}; libraries: {', '.join(_libraries())}"
        )
    library, _, rest = spec.strip().partition(":")
    library = library.strip().lower()
    rest = rest.strip()
    head, paren, tail = rest.partition("(")
    name = head.strip()
    if not name or not all(part.isidentifier() for part in name.split("-")):
        raise ValueError(
            f"attack spec {spec!r}: {name!r} is not an attack name; write 'library:Name' or "
            "'library:Name(key=value, ...)'"
        )
    overrides: dict[str, Any] = {}
    if paren:
        try:
            _, args, overrides = parse_spec("_attack(" + tail)
        except ValueError as exc:
            raise ValueError(f"attack spec {spec!r}: {exc}".replace("activation spec", "spec")) from None
        if args:
            raise ValueError(
                f"attack spec {spec!r}: overrides must be given by keyword, e.g. "
                f"'{library}:{name}(steps=10)'"
            )
    return library, name, overrides


def _libraries() -> list[str]:
    from .adapters import LIBRARIES

    return list(LIBRARIES)


# --------------------------------------------------------------------------------------------
# Geometry


def project(x: torch.Tensor, x_adv: torch.Tensor, eps: float, norm: str, bounds: tuple[float, float]) -> torch.Tensor:
    """Project ``x_adv`` (N, ...) onto the ``norm`` ball of radius ``eps`` around ``x``, then into
    ``bounds``. L2 scales the perturbation down (Foolbox's convention for minimum-norm attacks);
    clipping to the bounds afterwards can only shrink it further. Points already inside are
    returned bit for bit (no ``x + (x_adv - x)`` round-off that could undo a boundary point)."""
    if norm == "Linf":
        return torch.min(torch.max(x_adv, x - eps), x + eps).clamp(*bounds)
    delta = x_adv - x
    norms = delta.flatten(1).norm(p=2, dim=1).view(-1, *([1] * (x.dim() - 1)))
    inside = norms <= eps
    shrunk = x + delta * (eps / norms.clamp_min(1e-12))
    return torch.where(inside, x_adv, shrunk).clamp(*bounds)


def perturbation_norm(x: torch.Tensor, x_adv: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-sample ``norm`` of ``x_adv - x``, shape (N,)."""
    delta = (x_adv - x).flatten(1)
    return delta.abs().amax(dim=1) if norm == "Linf" else delta.norm(p=2, dim=1)


# --------------------------------------------------------------------------------------------
# The base class


#: ThreatModel fields an attack spec may not change: the harness verifies against them.
THREAT_MODEL_OWNS = ("eps", "bounds", "norm")


class Attack:
    """One configured attack: ``attack(model, x, y, eps) -> x_adv``.

    Subclasses (one per attack and library; the library ones derive from
    :class:`~relucap_plugin.adapters.LibraryAttack`, which builds them from data) set the class
    attributes below and implement :meth:`_run` (and :meth:`_native`); the base class does
    everything they share.

    - ``library``/``family``: where it comes from and which attack it is across libraries
      (``"PGD"``, ``"APGD"``, ...; same family + norm + loss = comparable numbers).
    - ``norms``: the threat-model norms it can run; ``losses``: the losses it can use, or
      ``None`` if it has no choice (it then ignores ``threat_model.loss``).
    - ``minimum_norm``: it searches for the smallest perturbation (CW, DeepFool, Boundary,
      HopSkipJump); where it found no adversarial example the input is returned, and the rest is
      projected onto the eps-ball like Foolbox does (found within ``eps`` counts, a larger one is
      shrunk onto the ball and counts if it is still adversarial).
    - ``native_restarts``: the library runs ``threat_model.restarts`` itself; otherwise the base
      class reruns the attack on the samples not yet fooled.
    """

    library: ClassVar[str] = "custom"
    family: ClassVar[str] = "custom"
    native_name: ClassVar[str] = ""
    norms: ClassVar[tuple[str, ...]] = NORMS
    losses: ClassVar[tuple[str, ...] | None] = None
    supports_targeted: ClassVar[bool] = True
    minimum_norm: ClassVar[bool] = False
    native_restarts: ClassVar[bool] = False
    #: classes the attack needs regardless of the loss (AutoAttack's targeted DLR part: 4)
    min_classes: ClassVar[int] = 2
    #: floating dtypes the model may have (None: any); the library fails in the others
    dtypes: ClassVar[tuple[torch.dtype, ...] | None] = None
    #: the output is projected onto the eps-ball (not for users' own attacks: they are verified)
    project_output: ClassVar[bool] = True

    def __init__(
        self,
        threat_model: ThreatModel | None,
        overrides: dict[str, Any] | None = None,
        *,
        changes: dict[str, Any] | None = None,
        name: str | None = None,
        batch_size: int | None = None,
    ) -> None:
        if threat_model is not None and not isinstance(threat_model, ThreatModel):
            raise TypeError(f"threat_model must be a ThreatModel, got {type(threat_model).__name__} {threat_model!r:.80}")
        self.name = name or f"{self.library}:{self.native_name or type(self).__name__}"
        self.overrides = dict(overrides or {})
        self.changes = dict(changes or {})
        owned = sorted(set(self.changes) & set(THREAT_MODEL_OWNS))
        if owned:
            given = ", ".join(f"{k}={self.changes[k]!r}" for k in owned)
            raise ValueError(
                f"{self.name}: {given} in the attack spec is refused: the threat model owns "
                f"{', '.join(owned)} (every example is verified against it, and eps comes from "
                "ThreatModel(eps=...)); set it on the ThreatModel, or evaluate a second "
                "ThreatModel for another norm or bounds"
            )
        if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be an int >= 1 or None, got {batch_size!r}")
        self.batch_size = batch_size
        self.threat_model: ThreatModel | None = None
        if threat_model is not None:
            self._configure(threat_model)

    def _configure(self, threat_model: ThreatModel) -> None:
        tm = threat_model.replace(**self.changes) if self.changes else threat_model
        self._check_threat_model(tm)
        self.threat_model = tm
        self._check_overrides()

    # -- configuration ------------------------------------------------------------------------

    @property
    def spec(self) -> str:
        """A spec string that :func:`get_attack` turns back into this attack (with the same
        threat model); use it as the attack's key in result tables."""
        if not self.overrides and not self.changes:
            return self.name
        args = ", ".join(f"{k}={v!r}" for k, v in sorted({**self.changes, **self.overrides}.items()))
        return f"{self.name}({args})"

    def _check_threat_model(self, tm: ThreatModel) -> None:
        if tm.norm not in self.norms:
            raise ValueError(
                f"{self.name} attacks the {'/'.join(self.norms)} norm only, but the threat model "
                f"says {tm.norm}; use ThreatModel(norm={self.norms[0]!r}, ...) or another attack "
                f"(see list_attacks())"
            )
        if self.losses is not None and tm.loss not in self.losses:
            raise ValueError(
                f"{self.name} supports loss {', '.join(map(repr, self.losses))} only, but the threat "
                f"model says loss={tm.loss!r}; change the loss or pick an attack that has it "
                "(APGD offers 'dlr', torch:PGD offers 'margin')"
            )
        if tm.targeted and not self.supports_targeted:
            raise ValueError(f"{self.name} has no targeted mode; use ThreatModel(targeted=False)")

    def _check_overrides(self) -> None:
        """Reject overrides of parameters that the threat model sets; subclasses check names."""
        mapped = set(self._mapped_parameters())
        clash = sorted(set(self.overrides) & mapped)
        if "batch_size" in clash:
            raise ValueError(
                f"{self.name}: batch_size comes from the harness; pass get_attack(..., batch_size=N) "
                "or EvalConfig(batch_size=N)"
            )
        if clash:
            raise ValueError(
                f"{self.name}: {', '.join(clash)} is set from the threat model; change the "
                f"ThreatModel field instead (mapping: {self._mapped_parameters()}); given: "
                + ", ".join(f"{k}={self.overrides[k]!r}" for k in clash)
            )
        accepted = self._accepted_overrides()
        if accepted is not None:
            unknown = sorted(set(self.overrides) - set(accepted))
            if unknown:
                raise ValueError(
                    f"{self.name}: unknown override(s) {', '.join(unknown)}; it accepts: "
                    f"{', '.join(sorted(accepted)) or 'none'} (threat-model fields go into the ThreatModel)"
                )

    def _mapped_parameters(self) -> dict[str, str]:
        """Native parameter -> the threat-model field (or what else) sets it: for documentation and
        to refuse overrides of it."""
        return {}

    def _accepted_overrides(self) -> list[str] | None:
        """Names of native parameters a user may override; None = do not check."""
        return None

    def with_threat_model(self, threat_model: ThreatModel) -> Attack:
        """A copy of this attack configured with another threat model."""
        clone = copy.copy(self)
        clone.overrides = dict(self.overrides)
        clone._configure(threat_model)
        return clone

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, threat_model={self.threat_model!r})"

    # -- running --------------------------------------------------------------------------------

    def __call__(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor | None = None,
        eps: float | None = None,
        *,
        target: torch.Tensor | None = None,
        seed: int | None = None,
        logits: torch.Tensor | None = None,
        sample_ids: Sequence[int] | torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Adversarial examples for ``x`` (N, ...) with labels ``y`` (N,) at budget ``eps``.

        ``y=None`` attacks the model's own predictions. ``eps=None`` uses the threat model's
        budget if it has exactly one. With ``threat_model.targeted``, ``target`` (N,) gives the
        target classes (default: each sample's least likely class). ``seed`` makes random starts
        reproducible without touching the global random state. The model must return logits
        (N, classes); keep any normalisation inside it. ``logits``: the model's clean logits of
        ``x`` if the caller has them (the evaluation harness does), which saves a forward pass;
        they are checked like the model's own. ``sample_ids`` (N distinct ints, default the
        positions 0..N-1): the samples' ids; our own attacks (``torch:PGD``'s random start and
        restarts, and BPDA and transfer around it) draw each sample's noise from (``seed``,
        its id), so a sample gets the same example whichever other samples are in the call.
        Library attacks draw from the seeded global generator for the whole call.
        """
        tm = self._require_threat_model()
        check_module(model, f"attack {self.name}")
        eps = self._check_eps(eps, tm)
        x = self._check_x(x, tm)
        device = model_device(model, x.device)
        dtype = float_dtype(model, x.dtype)
        self.check_dtype(dtype)
        with caller_state(model), torch.enable_grad(), seeded(seed, device):
            xd = x.detach().to(device=device, dtype=dtype)
            given = logits if logits is not None and logits.dim() == 2 and len(logits) == len(xd) else None
            with torch.no_grad():
                forward = (lambda t: given) if given is not None else (lambda t: _logits(model, t, self.name))
                logits = clean_logits(forward, xd, self.spec)
            ctx = CallContext(device=device, num_classes=logits.shape[1], batch_size=self.batch_size,
                              seed=None if seed is None else int(seed),
                              sample_ids=check_sample_ids(sample_ids, len(xd)))
            needed = self.required_classes(tm)
            if ctx.num_classes < needed:
                raise ValueError(
                    f"{self.spec} needs a model with at least {needed} classes (the DLR loss needs "
                    f"3, targeted 4); this one has {ctx.num_classes}. Use loss='ce' or another attack"
                )
            yd = self._check_y(model, xd, y, device, ctx.num_classes)
            td = self._targets(model, xd, yd, target, device, ctx.num_classes) if tm.targeted else None
            x_adv = self._run_restarts(model, xd, yd, float(eps), td, ctx, tm)
            if tuple(x_adv.shape) != tuple(xd.shape):
                raise RuntimeError(
                    f"{self.spec} returned shape {tuple(x_adv.shape)} for input {tuple(xd.shape)}; "
                    "an attack must return one example per input, image-shaped"
                )
            x_adv = x_adv.detach().to(device=device, dtype=dtype)
            if self.minimum_norm:
                # a failed search returns the input, not the library's placeholder (Foolbox's CW
                # returns a black image) shrunk onto the ball
                found = _fooled(model, x_adv, yd, td, self.name)
                x_adv = torch.where(found.view(-1, *([1] * (xd.dim() - 1))), x_adv, xd)
            if self.project_output:
                x_adv = project(xd, x_adv, float(eps), tm.norm, tm.bounds)
        return x_adv.to(device=x.device, dtype=x.dtype)

    def required_classes(self, tm: ThreatModel) -> int:
        """Fewest classes the attack works with under ``tm`` (DLR: 3, targeted DLR: 4)."""
        dlr = self.losses is not None and tm.loss == "dlr"
        return max(self.min_classes, (4 if tm.targeted else 3) if dlr else 2)

    def check_dtype(self, dtype: torch.dtype) -> None:
        """Refuse a model in a floating dtype the library cannot compute in (TypeError)."""
        if self.dtypes is not None and dtype not in self.dtypes:
            names = "/".join(str(d).replace("torch.", "") for d in self.dtypes)
            raise TypeError(
                f"{self.spec} needs a {names} model (its library fails in "
                f"{str(dtype).replace('torch.', '')}); attack a float32 copy "
                "(copy.deepcopy(model).float()) or use an attack that runs in any dtype, "
                "e.g. torch:PGD"
            )

    def _require_threat_model(self) -> ThreatModel:
        if self.threat_model is None:
            raise ValueError(
                f"{self.name} has no threat model; use attack.with_threat_model(ThreatModel(...)) "
                "or pass threat_model= to make_attack"
            )
        return self.threat_model

    @staticmethod
    def _check_eps(eps: float | None, tm: ThreatModel) -> float:
        if eps is None:
            if len(tm.eps) != 1:
                raise ValueError(f"the threat model has budgets {tm.eps}; pass eps= to say which one")
            return tm.eps[0]
        eps = float(eps)
        if not math.isfinite(eps) or eps < 0:
            raise ValueError(f"eps must be finite and >= 0, got {eps}")
        if tm.norm == "Linf":
            check_linf_eps(eps, tm.bounds)
        return eps

    def _check_x(self, x: torch.Tensor, tm: ThreatModel) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (N, ...), got {short_repr(x)}; pass torch.as_tensor(x)")
        if not x.is_floating_point() or x.dim() < 2 or x.shape[0] == 0:
            raise ValueError(
                f"x must be a non-empty floating tensor of shape (N, ...) (images as (N, C, H, W)), "
                f"got {x.dtype} of shape {tuple(x.shape)}"
            )
        check_inputs(x, tm.bounds, "x")
        return x

    def _check_y(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, device: torch.device, num_classes: int
    ) -> torch.Tensor:
        if y is None:
            with torch.no_grad():
                return _logits(model, x, self.name).argmax(1)
        y = torch.as_tensor(y)
        if y.shape != (x.shape[0],) or y.is_floating_point() or y.is_complex():
            raise ValueError(
                f"y must be integer class labels of shape ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}"
            )
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= num_classes):
            raise ValueError(f"{self.name}: labels must be in [0, {num_classes - 1}] (the model has {num_classes} "
                             f"classes), but y holds labels in [{int(y.min())}, {int(y.max())}]; pass class indices")
        return y.to(device=device, dtype=torch.long)

    def _targets(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None,
        device: torch.device, num_classes: int,
    ) -> torch.Tensor:
        if target is None:
            with torch.no_grad():
                logits = _logits(model, x, self.name).clone()
            logits.scatter_(1, y[:, None], math.inf)
            return logits.argmin(1)
        target = self._check_y(model, x, target, device, num_classes)
        if bool((target == y).any()):
            same = torch.nonzero(target == y).flatten().tolist()
            raise ValueError(f"{self.name}: target classes must differ from the labels y, but target equals y "
                             f"at sample(s) {same[:10]}; pick other target classes, or target=None")
        return target

    def _run_restarts(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
        target: torch.Tensor | None, ctx: CallContext, tm: ThreatModel,
    ) -> torch.Tensor:
        if eps == 0:
            return x.clone()
        x_adv = self._run(model, x, y, eps, target, ctx)
        if self.native_restarts or tm.restarts == 1:
            return x_adv
        for restart in range(1, tm.restarts):
            x_adv = x_adv.detach().to(x.dtype)
            if self.project_output:
                x_adv = project(x, x_adv, eps, tm.norm, tm.bounds)
            todo = ~_fooled(model, x_adv, y, target, self.name)
            if not bool(todo.any()):
                break
            t = None if target is None else target[todo]
            ids = ctx.sample_ids if ctx.sample_ids is not None else torch.arange(len(x))
            again = replace(ctx, sample_ids=ids[todo.cpu()], restart=restart)
            x_adv[todo] = self._run(model, x[todo], y[todo], eps, t, again).to(x.dtype)
        return x_adv

    def _run(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
        target: torch.Tensor | None, ctx: CallContext,
    ) -> torch.Tensor:
        """One run of the attack on ``x`` (N, ...) on ``ctx.device``: the adapters' part.

        The model is in eval mode with frozen parameters; gradients are enabled; ``target`` is
        set in targeted mode. Return ``x_adv`` of the shape of ``x``.
        """
        raise NotImplementedError

    # -- native objects -------------------------------------------------------------------------

    def native(
        self,
        model: nn.Module,
        eps: float | None = None,
        *,
        input_shape: tuple[int, ...] | None = None,
        num_classes: int | None = None,
    ) -> Native:
        """The library's own configured objects for ``model`` at budget ``eps``, for your code.

        ``input_shape`` (one sample, e.g. (1, 28, 28)) and ``num_classes`` are needed by ART and
        by torchattacks' AutoAttack. Unlike ``__call__``, the caller manages the model's mode
        (put it in eval mode) and the data conversions the library expects.
        """
        tm = self._require_threat_model()
        eps = self._check_eps(eps, tm)
        return self._native(model, eps, input_shape=input_shape, num_classes=num_classes)

    def _native(self, model: nn.Module, eps: float, *, input_shape: tuple[int, ...] | None,
                num_classes: int | None) -> Native:
        raise NotImplementedError(f"{self.name} has no native library object")


def _logits(model: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    return check_logits(model(x), "wrap a model that returns a tuple/dict so that it returns the logits tensor", name, x)


def _fooled(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, target: torch.Tensor | None, name: str) -> torch.Tensor:
    with torch.no_grad():
        pred = _logits(model, x_adv, name).argmax(1)
    return pred == target if target is not None else pred != y


# --------------------------------------------------------------------------------------------
# User attacks


class CallableAttack(Attack):
    """Wraps ``fn(model, x, y, eps) -> x_adv`` (a user's own attack) with the shared handling.

    Its output is NOT projected onto the eps-ball, so an evaluation can verify what it returned.
    """

    library = "custom"
    family = "custom"
    project_output = False

    def __init__(self, fn: AttackFn, threat_model: ThreatModel | None = None, *, name: str,
                 family: str = "custom", norms: tuple[str, ...] = NORMS) -> None:
        self.fn = fn
        self.family = family  # type: ignore[misc]
        self.norms = tuple(norms)  # type: ignore[misc]
        super().__init__(threat_model, name=name)

    def _run(self, model, x, y, eps, target, ctx):
        out = self.fn(model, x, target if target is not None else y, eps)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"{self.name}: the attack function returned {type(out).__name__}, not a tensor")
        return out

    def _native(self, model, eps, *, input_shape, num_classes):
        return Native(model, self.fn, {"eps": eps})


def make_attack(
    fn: AttackFn,
    name: str | None = None,
    threat_model: ThreatModel | None = None,
    *,
    family: str = "custom",
    norms: tuple[str, ...] = NORMS,
) -> Attack:
    """Turn ``fn(model, x, y, eps) -> x_adv`` into an :class:`Attack` named ``"custom:<name>"``.

    The function runs under the same guards as library attacks (eval mode, frozen parameters,
    gradients enabled, caller state restored) and gets target classes as ``y`` in targeted mode.
    Its output is returned unprojected so the evaluation's checks see exactly what it produced.
    """
    if not callable(fn):
        raise TypeError(f"make_attack needs a callable fn(model, x, y, eps) -> x_adv, got {fn!r}")
    name = name or getattr(fn, "__name__", "attack")
    if ":" not in name:
        name = f"custom:{name}"
    return CallableAttack(fn, threat_model, name=name, family=family, norms=norms)


# --------------------------------------------------------------------------------------------
# Registry


def get_attack(spec: str | Attack, threat_model: ThreatModel, *, batch_size: int | None = None, **overrides: Any) -> Attack:
    """Build the attack named by ``spec`` (``"library:Name(key=value)"``) for ``threat_model``.

    Keyword ``overrides`` (and those in the spec) that name ThreatModel fields change this
    attack's copy of the threat model (``"torchattacks:PGD(steps=10)"``); the others go to the
    library's constructor. Names are matched case-insensitively, with per-library aliases
    (``"torchattacks:APGD-DLR"``); norm-generic names pick the variant for the threat model's
    norm (``"foolbox:PGD"`` is ``LinfPGD`` or ``L2PGD``). ``batch_size`` is what the library
    processes at once where it batches internally (ART). Importing the library happens here.
    """
    if isinstance(spec, Attack):
        if overrides:
            raise TypeError(f"get_attack: overrides {sorted(overrides)} apply to spec strings, not to the Attack "
                            f"instance {spec.name}; pass get_attack('{spec.name}(...)', threat_model) instead")
        return spec if spec.threat_model is threat_model else spec.with_threat_model(threat_model)
    if not isinstance(threat_model, ThreatModel):
        raise TypeError(f"threat_model must be a ThreatModel, got {type(threat_model).__name__} {threat_model!r:.80}")
    from .adapters import load_adapter

    library, name, spec_overrides = parse_attack(spec)
    try:
        adapter = load_adapter(library)
    except ValueError as exc:
        raise ValueError(f"attack spec {spec!r}: {exc}") from None
    return adapter.build(name, threat_model, {**spec_overrides, **overrides}, batch_size=batch_size)


def list_attacks(include_unavailable: bool = True) -> dict[str, list[str]]:
    """Attack names per library, ``{"torchattacks": ["APGD", ...], ...}``.

    A library that is not installed maps to an empty list (or is left out with
    ``include_unavailable=False``); :func:`library_status` says what to install. No attack library
    is imported.
    """
    from .adapters import LIBRARIES, load_adapter

    out: dict[str, list[str]] = {}
    for library, info in LIBRARIES.items():
        if info.installed():
            out[library] = sorted(load_adapter(library).ATTACKS, key=str.lower)
        elif include_unavailable:
            out[library] = []
    return out


def library_status() -> dict[str, str]:
    """``{library: "installed 3.5.1"}`` or ``{library: 'missing: pip install "relucap-plugin[art]"'}``."""
    from .adapters import LIBRARIES

    return {library: info.status() for library, info in LIBRARIES.items()}
