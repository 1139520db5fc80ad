"""Attacks that see past the caps: BPDA, transfer from the uncapped twin, black-box on the
input's real layout, and the named suites whose per-sample worst case is the headline number.
"""

from __future__ import annotations

import inspect
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..attacks import Attack, CallContext, get_attack
from ..threat import ThreatModel, check_budget
from .ops import eager_module, find_caps
from .surrogate import DEFAULT_TEMPERATURE, _check_surrogate, capped_sites, surrogate_gradients, uncapped_twin

__all__ = [
    "BLACK_BOX_FAMILIES",
    "SUITES",
    "SurrogateAttack",
    "TransferAttack",
    "attack_kind",
    "audit_inputs",
    "LayoutAttack",
    "black_box_layout",
    "bpda",
    "evaluate_suite",
    "first_inputs",
    "get_suite",
    "standard_suite",
    "suite_notes",
    "transfer",
]

#: Attack families that use only the model's outputs (decision or score based).
BLACK_BOX_FAMILIES = ("Square", "Boundary", "HopSkipJump")


# ------------------------------------------------------------------------------ wrapper attacks
class _WrappedAttack(Attack):
    """An attack that runs another, configured :class:`Attack` in a changed setting.

    The inner attack does its own restarts and checks with the wrapper's call seed and sample
    ids (so its per-sample draws are the wrapper's); the wrapper projects the result onto the
    eps-ball like any attack.
    """

    native_restarts = True
    losses = None

    def __init__(self, inner: Attack, name: str):
        if not isinstance(inner, Attack):
            raise TypeError(f"inner must be an Attack (e.g. get_attack('torch:PGD', tm)), got "
                            f"{type(inner).__name__} {inner!r:.80}")
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
                    target: Tensor | None, ctx: CallContext) -> Tensor:
        return self.inner(model, x, y, eps, target=target, seed=ctx.seed, sample_ids=ctx.sample_ids)


class SurrogateAttack(_WrappedAttack):
    """BPDA: ``inner`` run inside :func:`surrogate_gradients` (forward capped, backward surrogate).

    Named ``"<inner spec>+bpda(ste)"`` (or ``+bpda(softcap,t=<temperature>)``); family
    ``"<inner family>+bpda"``.
    """

    def __init__(self, inner: Attack, mode: str = "ste", temperature: float = DEFAULT_TEMPERATURE):
        self.mode, self.temperature = _check_surrogate(mode, temperature)
        self.family = f"{inner.family}+bpda"  # type: ignore[misc]
        label = mode if mode == "ste" else f"{mode},t={self.temperature:g}"
        super().__init__(inner, name=f"{inner.spec}+bpda({label})")

    def _run(self, model, x, y, eps, target, ctx):
        model = eager_module(model)
        with surrogate_gradients(model, self.mode, self.temperature):
            return self._inner_call(model, x, y, eps, target, ctx)


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
                            f"(the uncapped twin), got {type(surrogate).__name__} {surrogate!r:.80}")
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
        return self._inner_call(self.source_model(model), x, y, eps, target, ctx)


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


# ------------------------------------------------------------------------------ black-box layout
class _Reshaped(nn.Module):
    """The model as a black-box attack sees it: inputs ``(N, *input_shape)``, reshaped back to
    the ``(N, *flat_shape)`` the model expects before every forward pass."""

    def __init__(self, model: nn.Module, flat_shape: tuple[int, ...]):
        super().__init__()
        self.model, self.flat_shape = model, tuple(flat_shape)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.reshape(x.shape[0], *self.flat_shape))


class LayoutAttack(_WrappedAttack):
    """``inner`` (a black-box attack) run on inputs reshaped to ``input_shape`` (C, H, W); the
    model still gets the shape it expects. Named ``"<inner spec>@CxHxW"``."""

    def __init__(self, inner: Attack, input_shape: Sequence[int]):
        self.input_shape = _check_shape(input_shape)
        self.family = inner.family  # type: ignore[misc]
        super().__init__(inner, name=f"{inner.spec}@{'x'.join(map(str, self.input_shape))}")

    def _run(self, model, x, y, eps, target, ctx):
        if math.prod(self.input_shape) != x[0].numel():
            raise ValueError(f"input_shape {self.input_shape} holds {math.prod(self.input_shape)} "
                             f"values but a sample has {x[0].numel()} (shape {tuple(x.shape[1:])}); "
                             "pass the layout of one sample, e.g. input_shape=(1, 28, 28) for MNIST")
        view = _Reshaped(model, tuple(x.shape[1:]))
        shaped = x.reshape(x.shape[0], *self.input_shape)
        return self._inner_call(view, shaped, y, eps, target, ctx).reshape(x.shape)


def _check_shape(shape: Any) -> tuple[int, ...]:
    try:
        out = tuple(int(v) for v in shape)
    except (TypeError, ValueError):
        out = ()
    if not out or any(v < 1 for v in out) or any(isinstance(v, bool) for v in shape):
        raise ValueError(f"input_shape must be the positive sizes of one sample, e.g. (1, 28, 28); "
                         f"got {shape!r}")
    return out


def black_box_layout(attacks: Sequence[Attack], input_shape: Sequence[int] | None,
                     sample_shape: Sequence[int] | None) -> tuple[list[Attack], list[str]]:
    """Black-box members of ``attacks`` wrapped to run on the input's real layout, plus notes.

    The layout is ``input_shape`` if given, else the data's ``sample_shape`` (an (H, W) sample
    becomes (1, H, W)). When only a flat (D,) layout is known, the attacks stay as they are and
    a note says they ran on a 1-D layout (a flat vector is never quietly an image).
    """
    out, notes = list(attacks), []
    blind = [i for i, a in enumerate(out) if attack_kind(a.spec, a.family) == "black-box"
             and not isinstance(a, LayoutAttack)]
    if not blind:
        return out, notes
    shape = None if input_shape is None else _check_shape(input_shape)
    sample = None if sample_shape is None else tuple(sample_shape)
    if shape is None and sample is not None and len(sample) == 2:
        shape = (1, *sample)
    if shape is not None and sample is not None and math.prod(shape) != math.prod(sample):
        raise ValueError(f"input_shape {shape} holds {math.prod(shape)} values but a sample of the "
                         f"data has {math.prod(sample)} (shape {sample}); pass the layout of one "
                         "sample, e.g. input_shape=(1, 28, 28) for flat MNIST vectors of 784")
    if shape is not None and (sample is None or tuple(shape) != sample):
        for i in blind:
            out[i] = LayoutAttack(out[i], shape)
    elif sample is not None and len(sample) == 1:
        names = ", ".join(out[i].spec for i in blind)
        notes.append(f"{names} ran on a 1-D layout (flat inputs of {sample[0]} values): a black-box "
                     "attack is weaker there than on the image; pass input_shape (EvalConfig, or "
                     "--input-shape 1,28,28) for the real layout")
    return out, notes


# ------------------------------------------------------------------------------ suites
def _square(threat_model: ThreatModel, queries: int) -> Attack:
    from ..adapters import LIBRARIES

    if isinstance(queries, bool) or not isinstance(queries, int) or queries < 1:
        raise ValueError(f"square_queries must be an int >= 1 (the Square attack's query budget), got {queries!r}")
    check_budget("square_queries", queries)
    if threat_model.norm == "Linf":
        return get_attack("torch:Square", threat_model, steps=queries)
    for spec in ("torchattacks:Square", "art:Square"):
        if LIBRARIES[spec.split(":")[0]].installed():
            return get_attack(spec, threat_model, steps=queries)
    raise ImportError(f'the standard suite needs a Square attack for {threat_model.norm} from '
                      'torchattacks or ART (torch:Square is L-inf only): pip install "relucap-plugin[torchattacks]" '
                      '(or "relucap-plugin[art]")')


def standard_suite(threat_model: ThreatModel, *, square_queries: int = 5000,
                   surrogate: nn.Module | Callable[[nn.Module], nn.Module] | None = None,
                   input_shape: Sequence[int] | None = None) -> list[Attack]:
    """The default suite: what an honest evaluation of a capped model runs.

    White-box ``torch:PGD`` with the cross-entropy and with the margin loss (``threat_model``'s
    steps, step size, restarts), both again through the straight-through surrogate gradient
    (BPDA) through every cap however it is written, ``torch:APGD-T(loss='margin')`` (targeted APGD
    against each of the top 9 other classes, as AutoAttack's APGD-T; plain and through BPDA),
    Square (black-box, ``square_queries`` queries; L-inf: ``torch:Square``, per-sample draws;
    L2: torchattacks, else ART; on ``input_shape`` if given) and PGD-CE transferred from
    ``surrogate`` (default: the uncapped twin). Report the per-sample worst case over all of
    them (:meth:`Results.worst_case`).
    """
    if not isinstance(threat_model, ThreatModel):
        raise TypeError(f"threat_model must be a ThreatModel, got {type(threat_model).__name__} {threat_model!r:.80}")
    tm = threat_model.replace(targeted=False, loss="ce")
    pgd_ce = get_attack("torch:PGD", tm)
    pgd_margin = get_attack("torch:PGD-margin", tm)
    apgd_targeted = get_attack("torch:APGD-T-margin", tm)
    square = _square(tm, square_queries)
    return [
        pgd_ce,
        pgd_margin,
        SurrogateAttack(pgd_ce, "ste"),
        SurrogateAttack(pgd_margin, "ste"),
        apgd_targeted,
        SurrogateAttack(apgd_targeted, "ste"),
        square if input_shape is None else LayoutAttack(square, input_shape),
        TransferAttack(pgd_ce, surrogate),
    ]


SUITES: dict[str, Callable[..., list[Attack]]] = {"standard": standard_suite}


def _finite_cap(module: nn.Module) -> bool:
    """Whether a cap module of ours caps anything: ``CappedReLU(inf)`` (what ``cap_relus(m,
    math.inf)`` leaves) is a plain ReLU, so BPDA and transfer have no cap to see past."""
    cap = getattr(module, "cap", None)
    if isinstance(cap, Tensor):
        return cap.numel() == 0 or bool(torch.isfinite(cap.detach()).any())
    return not isinstance(cap, (int, float)) or math.isfinite(cap)


def _has_caps(model: nn.Module, example_input: Tensor | None) -> bool | None:
    """Whether ``model`` has a finite cap: from our modules, or one forward pass of
    ``example_input``; ``None`` if it cannot tell (no example input and no cap module).
    Infinite caps count as no cap."""
    sites = capped_sites(eager_module(model))
    if any(_finite_cap(m) for _, m in sites):
        return True
    if example_input is None:
        return False if sites else None
    return any(site.high != "inf" for site in find_caps(model, example_input).sites)


def get_suite(name: str, threat_model: ThreatModel, model: nn.Module | None = None,
              example_input: Tensor | None = None, **kwargs: Any) -> list[Attack]:
    """The attacks of the suite ``name`` (see :data:`SUITES`) for ``threat_model``.

    With ``model`` (and ``example_input``, a few samples, to find caps written as ops), members
    that would only repeat white-box PGD on it are left out: on a model without any cap a BPDA
    attack has no cap to take a surrogate gradient through, and the default uncapped twin of a
    transfer attack is the model itself. Without ``example_input`` only our cap modules are
    seen; a model without them keeps every member (it may cap with ops).
    """
    if name not in SUITES:
        raise ValueError(f"unknown attack suite {name!r}; valid: {', '.join(SUITES)}")
    accepted = [p for p in inspect.signature(SUITES[name]).parameters if p != "threat_model"]
    if set(kwargs) - set(accepted):
        raise TypeError(f"suite {name!r} does not take {sorted(set(kwargs) - set(accepted))} (suite_kwargs); "
                        f"it accepts {accepted}")
    attacks = SUITES[name](threat_model, **kwargs)
    if model is not None and _has_caps(model, example_input) is False:
        attacks = [a for a in attacks if not isinstance(a, SurrogateAttack)
                   and not (isinstance(a, TransferAttack) and a.surrogate is None)]
    return attacks


def suite_notes(model: nn.Module, example_input: Tensor) -> list[str]:
    """Warnings the results of a suite run must carry: caps that cannot be reached."""
    scan = find_caps(model, example_input)
    if scan.warning and not scan.sites and not capped_sites(eager_module(model)):
        warnings.warn(scan.warning, RuntimeWarning, stacklevel=3)
        return [scan.warning]
    return []


def evaluate_suite(model: nn.Module, data: Any, threat_model: ThreatModel, suite: str = "standard",
                   config: Any = None, *, suite_kwargs: dict[str, Any] | None = None,
                   extra_attacks: Sequence[Any] = (), schedule: str = "cascade",
                   **evaluate_kwargs: Any):
    """:func:`~relucap_plugin.evaluation.evaluate` with the attacks of ``suite`` (plus
    ``extra_attacks``); the headline is ``results.worst_case(eps)``.

    ``schedule="cascade"`` (the default here) runs each attack only on the samples still robust
    (see :mod:`relucap_plugin.cascade`); ``"full"`` runs every attack on every sample, for exact
    per-attack and cross-library tables.

    The first samples of ``data`` show which caps the forward reaches (however written); a model
    whose caps sit inside scripted code gets a warning in ``results.metadata["notes"]``.
    """
    from ..evaluation import evaluate

    example = first_inputs(data)
    attacks = [*get_suite(suite, threat_model, model, example, **(suite_kwargs or {})), *extra_attacks]
    notes = [] if example is None else suite_notes(model, example)
    return evaluate(model, data, attacks, threat_model, config, notes=notes, schedule=schedule,
                    **evaluate_kwargs)


def first_inputs(data: Any, n: int = 8) -> Tensor | None:
    """The first ``n`` inputs of ``data`` (a pair, Dataset or DataLoader) stacked (N, ...), to
    find caps with; ``None`` if it cannot be indexed."""
    from ..data import as_dataset, unpack_batch

    try:
        dataset = as_dataset(data)
        xs = [torch.as_tensor(unpack_batch(dataset[i])[0]) for i in range(min(n, len(dataset)))]
    except Exception:  # a peek only: data the evaluation cannot read fail there, with its message
        return None
    return torch.stack(xs) if xs and all(x.is_floating_point() for x in xs) else None


def audit_inputs(model: Any, data: Any, threat_model: ThreatModel, config: Any, results: Any,
                 notes: list[str]) -> tuple[Any, Tensor]:
    """What :func:`~relucap_plugin.diagnostics.audit` adds to a suite run ``results`` on
    ``data`` = (x, y): the rows of ``torch:FGSM`` (same schedule and eps) when it has no
    single-step attack (unchanged, with a note, if it describes another evaluation than the
    audit's), and the adversarial inputs of the saturation check: the kept worst-case examples
    at the largest eps, else one PGD run."""
    from ..evaluation import evaluate

    families = {r["attack"]: r["family"] for r in results.rows}
    if all(attack_kind(a, families.get(a)) != "single-step" for a in results.attacks):
        fgsm = evaluate(model, data, "torch:FGSM", threat_model.replace(eps=tuple(results.eps)),
                        config, progress=False, model_name=results.metadata.get("model"),
                        schedule=results.schedule)
        try:
            results = results.merge(fgsm)
        except ValueError as exc:
            notes.append(f"single-step check without torch:FGSM: the results given describe "
                         f"another evaluation than the audit's model, data and config ({exc})")
    eps = max(threat_model.eps)
    try:
        if results._store() is not None:
            return results, results.worst_case_examples(eps)
    except ValueError:
        pass
    x, y = data
    pgd = get_attack("torch:PGD", threat_model.replace(eps=(eps,)))
    return results, pgd(model, x, y, eps, seed=config.seed)
