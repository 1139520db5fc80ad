"""Adaptive attacks through capped activations: surrogate gradients, BPDA, transfer, suites.

A small cap saturates units and zeroes input gradients, so a plain gradient attack can report
robustness that is not there (Athalye et al. 2018). This module keeps the capped *forward* pass
and changes what the attacker sees:

- :func:`surrogate_gradients` (context manager) and :func:`with_surrogate_gradients` (model
  transform) give every capped activation a surrogate backward pass while its forward output
  stays bit-identical. It lives in the model, so any library's gradient attack run inside it is
  a BPDA attack.
- :class:`SurrogateAttack` wraps any gradient :class:`~relucap_plugin.attacks.Attack` so that it
  runs inside :func:`surrogate_gradients` (spec ``"<inner spec>+bpda(ste)"``).
- :class:`TransferAttack` crafts examples on a surrogate model (by default the same model with
  its caps removed, :func:`uncapped_twin`); the evaluation verifies them on the capped model.
- :func:`get_suite` returns a named list of attacks; ``"standard"`` is what a user gets without
  choosing, and its per-sample worst case is the headline number.

Surrogate backward passes (``x`` is the activation's input, ``c`` its cap):

- ``"ste"``: straight-through over the cap, ReLU's gradient ``1[x > 0]``.
- ``"softcap"``: the derivative of the smooth cap
  ``softplus(t x) / t - softplus(t (x - c)) / t``, i.e. ``sigmoid(t x) - sigmoid(t (x - c))``
  with ``t = temperature / c`` (the transition width is ``c / temperature``), computed as
  ``sigmoid(t x) * sigmoid(-t (x - c)) * (1 - exp(-t c))`` so that saturated units keep a small,
  non-zero gradient in float32. An infinite cap uses ReLU's gradient.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .activations import CappedReLU, DynamicCappedReLU, LearnableCappedReLU, _channel_view
from .attacks import Attack, get_attack
from .threat import ThreatModel

__all__ = [
    "BLACK_BOX_FAMILIES",
    "CAPPED_TYPES",
    "DEFAULT_TEMPERATURE",
    "SUITES",
    "SURROGATE_MODES",
    "SurrogateAttack",
    "TransferAttack",
    "attack_kind",
    "bpda",
    "capped_sites",
    "evaluate_suite",
    "get_suite",
    "module_cap",
    "standard_suite",
    "surrogate_gradients",
    "transfer",
    "uncapped_twin",
    "with_surrogate_gradients",
]

#: The capped activations whose backward pass a surrogate replaces (matched by exact type).
CAPPED_TYPES: tuple[type[nn.Module], ...] = (CappedReLU, LearnableCappedReLU, DynamicCappedReLU)
SURROGATE_MODES = ("ste", "softcap")
#: ``t = DEFAULT_TEMPERATURE / cap`` for ``"softcap"``: the gradient is 0.76 at ``x = cap / 2``.
DEFAULT_TEMPERATURE = 4.0
#: Attack families that use only the model's outputs (decision or score based).
BLACK_BOX_FAMILIES = ("Square", "Boundary", "HopSkipJump")


# ------------------------------------------------------------------------------ capped sites
def capped_sites(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(qualified name, module)`` of every capped activation in ``model`` (exact types)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [(name, m) for name, m in model.named_modules() if type(m) in CAPPED_TYPES]


def module_cap(module: nn.Module, x: Tensor) -> Tensor:
    """The cap of a capped activation as a tensor broadcastable to its input ``x`` (N, C, *)."""
    if isinstance(module, CappedReLU):
        cap = module.cap
    elif isinstance(module, LearnableCappedReLU):
        cap = module.cap.detach()
    elif isinstance(module, DynamicCappedReLU):
        cap = (module.running_cap * module.scale).detach()
    else:
        raise TypeError(f"{type(module).__name__} is not a capped activation ({CAPPED_TYPES})")
    cap = torch.as_tensor(cap, dtype=x.dtype, device=x.device)
    return _channel_view(cap, x) if cap.dim() > 0 else cap


def uncapped_twin(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with its caps removed; ``model`` itself is untouched.

    The default surrogate of :class:`TransferAttack`. Conversions made by
    :func:`~relucap_plugin.surgery.cap_relus` are undone exactly by
    :func:`~relucap_plugin.surgery.uncap`; capped activations the model was built with are
    replaced by ``nn.ReLU`` (matched by exact type, collected first and replaced second).
    """
    from .surgery import is_converted, uncap

    twin = copy.deepcopy(model)
    if is_converted(twin):
        uncap(twin)
    sites = capped_sites(twin)
    for name, _ in sites:
        parent_name, _, child = name.rpartition(".")
        parent = twin.get_submodule(parent_name) if parent_name else twin
        if not child:
            raise ValueError("the model itself is a capped activation; there is nothing to uncap "
                             "inside it, use nn.ReLU() as the surrogate")
        setattr(parent, child, nn.ReLU())
    return twin


# ------------------------------------------------------------------------------ surrogate mode
def _check_mode(mode: str, temperature: float) -> tuple[str, float]:
    if mode not in SURROGATE_MODES:
        raise ValueError(f"surrogate mode must be one of {', '.join(map(repr, SURROGATE_MODES))}, "
                         f"got {mode!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (
            math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number (got {temperature!r}); "
                         f"the default is {DEFAULT_TEMPERATURE}")
    return mode, float(temperature)


def surrogate_derivative(x: Tensor, cap: Tensor, mode: str, temperature: float) -> Tensor:
    """d(activation)/dx that the surrogate backward uses, elementwise, shape of ``x``."""
    relu_grad = (x > 0).to(x.dtype)
    if mode == "ste":
        return relu_grad
    finite = torch.isfinite(cap)
    c = torch.where(finite, cap, torch.ones_like(cap))
    t = temperature / c
    soft = torch.sigmoid(t * x) * torch.sigmoid(-t * (x - c)) * -torch.expm1(-t * c)
    return torch.where(finite, soft, relu_grad)


class _SurrogateGradient(torch.autograd.Function):
    """Returns the capped output ``y`` unchanged; its backward sends ``grad * g(x)`` to ``x``."""

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, cap: Tensor, mode: str, temperature: float) -> Tensor:
        ctx.save_for_backward(x, cap)
        ctx.mode, ctx.temperature = mode, temperature
        return y.clone()

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, cap = ctx.saved_tensors
        return grad * surrogate_derivative(x, cap, ctx.mode, ctx.temperature), None, None, None, None


class _SurrogateHook:
    """Forward hook on a capped activation: same output, surrogate gradient."""

    def __init__(self, mode: str, temperature: float):
        self.mode, self.temperature = mode, temperature

    def __call__(self, module: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor | None:
        if not torch.is_grad_enabled() or not args or not isinstance(args[0], Tensor):
            return None
        x = args[0]
        if not x.requires_grad:
            return None
        return _SurrogateGradient.apply(x, output, module_cap(module, x), self.mode, self.temperature)


def _install(model: nn.Module, mode: str, temperature: float) -> list[tuple[Any, nn.Module, bool]]:
    installed = []
    hook = _SurrogateHook(mode, temperature)
    for _, module in capped_sites(model):
        inplace = bool(getattr(module, "inplace", False))
        if inplace:
            module.inplace = False  # the surrogate needs the input the activation would overwrite
        installed.append((module.register_forward_hook(hook), module, inplace))
    return installed


@contextlib.contextmanager
def surrogate_gradients(
    model: nn.Module, mode: str = "ste", temperature: float = DEFAULT_TEMPERATURE
) -> Iterator[nn.Module]:
    """Within the block, every capped activation of ``model`` back-propagates a surrogate.

    Forward outputs stay bit-identical (in-place caps compute out of place meanwhile); the
    backward pass is ``"ste"`` or ``"softcap"`` (see the module docstring). Works for any
    attack library because it lives in the model. Hooks and ``inplace`` flags are restored on
    exit, also after an exception. A model without capped activations is left as it is.
    Scripted or compiled copies of the model are not affected (hooks do not reach them).
    """
    mode, temperature = _check_mode(mode, temperature)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    installed = _install(model, mode, temperature)
    try:
        yield model
    finally:
        for handle, module, inplace in reversed(installed):
            handle.remove()
            if inplace:
                module.inplace = True


def with_surrogate_gradients(
    model: nn.Module, mode: str = "ste", temperature: float = DEFAULT_TEMPERATURE
) -> nn.Module:
    """A deep copy of ``model`` whose capped activations always use the surrogate backward.

    The model transform counterpart of :func:`surrogate_gradients`; ``model`` is untouched.
    """
    mode, temperature = _check_mode(mode, temperature)
    clone = copy.deepcopy(model)
    _install(clone, mode, temperature)
    return clone


# ------------------------------------------------------------------------------ wrapper attacks
class _WrappedAttack(Attack):
    """An attack that runs another, configured :class:`Attack` in a changed setting.

    The inner attack does its own restarts and checks; the wrapper draws its seed from the
    caller's (seeded) generator and projects the result onto the eps-ball like any attack.
    """

    native_restarts = True
    losses = None

    def __init__(self, inner: Attack, name: str):
        if not isinstance(inner, Attack):
            raise TypeError(f"inner must be an Attack (e.g. get_attack('torch:PGD', tm)), got "
                            f"{type(inner).__name__}")
        self.inner = inner
        self.library = inner.library  # type: ignore[misc]
        self.norms = inner.norms  # type: ignore[misc]
        self.supports_targeted = inner.supports_targeted  # type: ignore[misc]
        super().__init__(inner.threat_model, name=name)

    def _configure(self, threat_model: ThreatModel) -> None:
        if self.inner.threat_model is not threat_model:
            self.inner = self.inner.with_threat_model(threat_model)
        super()._configure(threat_model)

    def required_classes(self, tm: ThreatModel) -> int:
        return self.inner.required_classes(self.inner.threat_model)

    def _inner_call(self, model: nn.Module, x: Tensor, y: Tensor, eps: float,
                    target: Tensor | None) -> Tensor:
        seed = int(torch.randint(2**31 - 1, ()))
        return self.inner(model, x, y, eps, target=target, seed=seed)


class SurrogateAttack(_WrappedAttack):
    """BPDA: ``inner`` run inside :func:`surrogate_gradients` (forward capped, backward surrogate).

    Named ``"<inner spec>+bpda(ste)"`` (or ``+bpda(softcap,t=<temperature>)``); family
    ``"<inner family>+bpda"``.
    """

    def __init__(self, inner: Attack, mode: str = "ste", temperature: float = DEFAULT_TEMPERATURE):
        self.mode, self.temperature = _check_mode(mode, temperature)
        self.family = f"{inner.family}+bpda"  # type: ignore[misc]
        label = mode if mode == "ste" else f"{mode},t={self.temperature:g}"
        super().__init__(inner, name=f"{inner.spec}+bpda({label})")

    def _run(self, model, x, y, eps, target, ctx):
        with surrogate_gradients(model, self.mode, self.temperature):
            return self._inner_call(model, x, y, eps, target)


class TransferAttack(_WrappedAttack):
    """Transfer: ``inner`` crafts examples on a surrogate model; they are judged on the target.

    ``surrogate`` is a model, a function ``model -> surrogate model`` (called on every attack
    call, so it sees the current weights), or ``None`` for :func:`uncapped_twin`. Named
    ``"<inner spec>+transfer(<surrogate_name>)"``, family ``"transfer"``.
    """

    def __init__(self, inner: Attack, surrogate: nn.Module | Callable[[nn.Module], nn.Module] | None = None,
                 surrogate_name: str | None = None):
        if surrogate is not None and not (isinstance(surrogate, nn.Module) or callable(surrogate)):
            raise TypeError("surrogate must be an nn.Module, a function model -> nn.Module, or None "
                            f"(the uncapped twin), got {type(surrogate).__name__}")
        self.surrogate = surrogate
        self.family = "transfer"  # type: ignore[misc]
        label = surrogate_name or ("uncapped" if surrogate is None else
                                   type(surrogate).__name__ if isinstance(surrogate, nn.Module)
                                   else getattr(surrogate, "__name__", "surrogate"))
        super().__init__(inner, name=f"{inner.spec}+transfer({label})")

    def source_model(self, model: nn.Module) -> nn.Module:
        """The model the examples are crafted on, for the target ``model``."""
        if self.surrogate is None:
            return uncapped_twin(model)
        if isinstance(self.surrogate, nn.Module):
            return self.surrogate
        source = self.surrogate(model)
        if not isinstance(source, nn.Module):
            raise TypeError(f"the surrogate function returned {type(source).__name__}, not an nn.Module")
        return source

    def _run(self, model, x, y, eps, target, ctx):
        return self._inner_call(self.source_model(model), x, y, eps, target)


def bpda(attack: str | Attack, threat_model: ThreatModel | None = None, mode: str = "ste",
         temperature: float = DEFAULT_TEMPERATURE) -> SurrogateAttack:
    """:class:`SurrogateAttack` around ``attack`` (a spec string needs ``threat_model``)."""
    return SurrogateAttack(_resolve(attack, threat_model), mode, temperature)


def transfer(attack: str | Attack, threat_model: ThreatModel | None = None,
             surrogate: nn.Module | Callable[[nn.Module], nn.Module] | None = None,
             surrogate_name: str | None = None) -> TransferAttack:
    """:class:`TransferAttack` of ``attack`` (a spec string needs ``threat_model``)."""
    return TransferAttack(_resolve(attack, threat_model), surrogate, surrogate_name)


def _resolve(attack: str | Attack, threat_model: ThreatModel | None) -> Attack:
    if isinstance(attack, Attack):
        return attack if threat_model is None else get_attack(attack, threat_model)
    if threat_model is None:
        raise ValueError(f"attack {attack!r} is a spec string: pass threat_model= to configure it")
    return get_attack(attack, threat_model)


def attack_kind(name: str, family: str | None = None) -> str:
    """``"surrogate"``, ``"transfer"``, ``"black-box"``, ``"single-step"`` or ``"white-box"``.

    Read from the attack's name (as in a results table) and its family (the ``family`` column
    of a results row, e.g. ``"Square"``); without a family, from the name after the library.
    """
    if "+bpda(" in name:
        return "surrogate"
    if "+transfer(" in name:
        return "transfer"
    fam = (family or name.split(":", 1)[-1]).split("(", 1)[0].lower()
    if fam.startswith(tuple(b.lower() for b in BLACK_BOX_FAMILIES)):
        return "black-box"
    if fam in ("fgsm", "fgm", "fastgradientmethod", "linffastgradientattack"):
        return "single-step"
    return "white-box"


# ------------------------------------------------------------------------------ suites
def _square(threat_model: ThreatModel, queries: int) -> Attack:
    from .adapters import LIBRARIES

    for spec in ("torchattacks:Square", "art:Square"):
        if LIBRARIES[spec.split(":")[0]].installed():
            return get_attack(spec, threat_model, steps=queries)
    raise ImportError('the standard suite needs a Square attack from torchattacks or ART: '
                      'pip install "relucap-plugin[torchattacks]" (or "relucap-plugin[art]")')


def standard_suite(threat_model: ThreatModel, *, square_queries: int = 5000,
                   surrogate: nn.Module | Callable[[nn.Module], nn.Module] | None = None) -> list[Attack]:
    """The default suite: what an honest evaluation of a capped model runs.

    White-box ``torch:PGD`` with the cross-entropy and with the margin loss (``threat_model``'s
    steps, step size, restarts), both again through the straight-through surrogate gradient
    (BPDA), Square (black-box, ``square_queries`` queries; torchattacks, else ART) and PGD-CE
    transferred from ``surrogate`` (default: the uncapped twin). Report the per-sample worst
    case over all of them (:meth:`Results.worst_case`).
    """
    if not isinstance(threat_model, ThreatModel):
        raise TypeError(f"threat_model must be a ThreatModel, got {type(threat_model).__name__}")
    tm = threat_model.replace(targeted=False, loss="ce")
    pgd_ce = get_attack("torch:PGD", tm)
    pgd_margin = get_attack("torch:PGD-margin", tm)
    return [
        pgd_ce,
        pgd_margin,
        SurrogateAttack(pgd_ce, "ste"),
        SurrogateAttack(pgd_margin, "ste"),
        _square(tm, square_queries),
        TransferAttack(pgd_ce, surrogate),
    ]


SUITES: dict[str, Callable[..., list[Attack]]] = {"standard": standard_suite}


def get_suite(name: str, threat_model: ThreatModel, model: nn.Module | None = None,
              **kwargs: Any) -> list[Attack]:
    """The attacks of the suite ``name`` (see :data:`SUITES`) for ``threat_model``.

    With ``model``, members that would only repeat white-box PGD on it are left out: on a model
    without capped activations a BPDA attack has no cap to take a surrogate gradient through,
    and the default uncapped twin of a transfer attack is the model itself.
    """
    if name not in SUITES:
        raise ValueError(f"unknown attack suite {name!r}; valid: {', '.join(SUITES)}")
    attacks = SUITES[name](threat_model, **kwargs)
    if model is not None and not capped_sites(model):
        attacks = [a for a in attacks if not isinstance(a, SurrogateAttack)
                   and not (isinstance(a, TransferAttack) and a.surrogate is None)]
    return attacks


def evaluate_suite(model: nn.Module, data: Any, threat_model: ThreatModel, suite: str = "standard",
                   config: Any = None, *, suite_kwargs: dict[str, Any] | None = None,
                   extra_attacks: Sequence[Any] = (), **evaluate_kwargs: Any):
    """:func:`~relucap_plugin.evaluation.evaluate` with the attacks of ``suite`` (plus
    ``extra_attacks``); the headline is ``results.worst_case(eps)``."""
    from .evaluation import evaluate

    attacks = [*get_suite(suite, threat_model, model, **(suite_kwargs or {})), *extra_attacks]
    return evaluate(model, data, attacks, threat_model, config, **evaluate_kwargs)
