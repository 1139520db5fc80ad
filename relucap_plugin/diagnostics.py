"""Gradient-masking checks, a plain-words verdict, and perturbation growth across layers.

Every check returns a :class:`Flag`: its ``name``, whether it ``fired``, a one-line ``meaning``
(what a fired flag says about the evaluation) and the ``evidence`` (numbers) it judged by. A
check that could not run (e.g. no capped activation, no transfer attack in the results) says so
in ``evidence["skipped"]`` and does not fire. :func:`audit` runs them all on one model;
:func:`verdict` turns the flags into a sentence. The checks follow Carlini et al. 2019, Athalye
et al. 2018 and AutoAttack's own checks; ``docs/honest-evaluation.md`` explains each one and
what to do when it fires.

:func:`perturbation_growth` shows the mechanism of arXiv 2405.03777 on a user's model: how much
an input perturbation grows layer by layer, for the capped model and its uncapped twin.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ._console import format_table, print_table
from .adaptive import attack_kind, capped_sites, evaluate_suite, module_cap, uncapped_twin
from .attacks import caller_state, get_attack, model_device
from .results import Results
from .threat import EvalConfig, ThreatModel

__all__ = [
    "CHECKS",
    "TOLERANCE",
    "Audit",
    "Flag",
    "GrowthTable",
    "audit",
    "determinism_check",
    "eps_check",
    "gradient_check",
    "other_attacks_check",
    "perturbation_growth",
    "saturation_check",
    "steps_restarts_check",
    "unbounded_check",
    "verdict",
]

#: Accuracy gap (fraction, 2 points) above which two attacks are said to disagree.
TOLERANCE = 0.02
#: Fraction of samples above which zero gradients or fully saturated capped layers fire.
ZERO_FRACTION = 0.01

#: Flag name -> what it means when it fires (one line each; docs/honest-evaluation.md has more).
CHECKS: dict[str, str] = {
    "zero_gradients": "many inputs have an all-zero, NaN or inf input gradient: gradient attacks "
                      "cannot move them",
    "saturated_caps": "a capped layer has every unit at 0 or at its cap for many inputs, so no "
                      "gradient passes it",
    "accuracy_rises_with_eps": "robust accuracy rises with eps or exceeds clean accuracy: the "
                               "attack fails, not the model",
    "unbounded_not_chance": "an attack with an unbounded budget stays above chance level: it "
                            "cannot find examples that must exist",
    "blackbox_beats_whitebox": "a black-box attack breaks samples the white-box attacks did not: "
                               "the gradients mislead",
    "transfer_beats_whitebox": "examples crafted on the uncapped twin break samples the white-box "
                               "attacks did not: the gradients mislead",
    "surrogate_beats_whitebox": "the same attack with a surrogate gradient through the caps (BPDA) "
                                "breaks samples plain white-box did not",
    "single_step_beats_iterative": "a single-step attack breaks samples the iterative ones did "
                                   "not: the iterative attacks are stuck",
    "more_steps_change_verdict": "more steps or restarts change robust accuracy by more than 2 "
                                 "points: the attack has not converged",
    "nondeterministic_logits": "repeated forward passes give different logits: randomness can "
                               "hide gradients (use EOT attacks)",
}


@dataclass(frozen=True)
class Flag:
    """The outcome of one check: ``fired`` means a sign of gradient masking (or a weak attack)."""

    name: str
    fired: bool
    meaning: str
    evidence: dict[str, Any] = field(default_factory=dict)

    @property
    def skipped(self) -> bool:
        """The check could not run (``evidence["skipped"]`` says why); it never fires then."""
        return "skipped" in self.evidence

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "fired": self.fired, "meaning": self.meaning,
                "evidence": dict(self.evidence)}

    def __str__(self) -> str:
        state = "SKIPPED" if self.skipped else "FIRED" if self.fired else "ok"
        return f"[{state}] {self.name}: {self.meaning} ({_evidence_text(self.evidence)})"


def _flag(name: str, fired: bool, **evidence: Any) -> Flag:
    return Flag(name, bool(fired), CHECKS[name], evidence)


def _skip(name: str, reason: str) -> Flag:
    return Flag(name, False, CHECKS[name], {"skipped": reason})


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {_fmt(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


def _evidence_text(evidence: Mapping[str, Any]) -> str:
    return "; ".join(f"{k}={_fmt(v)}" for k, v in evidence.items())


def verdict(flags: Sequence[Flag], model_name: str | None = None) -> str:
    """``"gradient masking likely: <reasons>"`` or ``"no sign of gradient masking in N checks"``."""
    who = f"{model_name}: " if model_name else ""
    fired = [f for f in flags if f.fired]
    if fired:
        return who + "gradient masking likely: " + "; ".join(f.meaning for f in fired)
    ran = [f for f in flags if not f.skipped]
    skipped = len(flags) - len(ran)
    note = f" ({skipped} skipped)" if skipped else ""
    return who + f"no sign of gradient masking in {len(ran)} checks{note}"


# ------------------------------------------------------------------------------ model checks
def _margin(logits: Tensor, y: Tensor) -> Tensor:
    z_y = logits.gather(1, y[:, None]).squeeze(1)
    z_other = logits.scatter(1, y[:, None], -torch.inf).amax(1)
    return z_other - z_y


def gradient_check(model: nn.Module, x: Tensor, y: Tensor, *, threshold: float = ZERO_FRACTION) -> Flag:
    """``zero_gradients``: fraction of samples whose input gradient is all zero / has NaN or inf.

    The gradient is that of the logit margin (best other logit minus the true one), which does
    not underflow for confident predictions as cross-entropy does; ``x`` (N, ...), ``y`` (N,).
    """
    device = model_device(model, x.device)
    with caller_state(model), torch.enable_grad():
        xd = x.detach().to(device).requires_grad_(True)
        (grad,) = torch.autograd.grad(_margin(model(xd), y.to(device)).sum(), xd)
    flat = grad.flatten(1)
    nonfinite = ~torch.isfinite(flat).all(1)
    zero = (flat == 0).all(1) & ~nonfinite
    zero_f, bad_f = zero.float().mean().item(), nonfinite.float().mean().item()
    return _flag("zero_gradients", zero_f + bad_f > threshold, zero_fraction=zero_f,
                 nonfinite_fraction=bad_f, n=len(x), threshold=threshold)


@torch.no_grad()
def _site_statistics(model: nn.Module, x: Tensor) -> dict[str, dict[str, float]]:
    """Per capped site: fraction of units below/at 0, at/above the cap, and of samples with all
    units in those flat regions (``blocked``)."""
    stats: dict[str, dict[str, float]] = {}

    def hook(name):
        def record(module, args, output):
            z = args[0]
            low = z <= 0
            high = z >= module_cap(module, z)
            flat = (low | high).flatten(1)
            stats[name] = {"below_zero": low.float().mean().item(),
                           "at_cap": high.float().mean().item(),
                           "blocked": flat.all(1).float().mean().item()}
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in capped_sites(model)]
    try:
        with caller_state(model):
            model(x.to(model_device(model, x.device)))
    finally:
        for h in handles:
            h.remove()
    return stats


def saturation_check(model: nn.Module, x: Tensor, x_adv: Tensor | None = None, *,
                     threshold: float = ZERO_FRACTION) -> Flag:
    """``saturated_caps``: per capped site, the fraction of units below 0 and at the cap on
    clean ``x`` (and adversarial ``x_adv``) inputs; fires if at some site more than
    ``threshold`` of the samples have *every* unit in a flat region (no gradient passes)."""
    if not capped_sites(model):
        return _skip("saturated_caps", "the model has no capped activation")
    evidence: dict[str, Any] = {"clean": _site_statistics(model, x)}
    if x_adv is not None:
        evidence["adversarial"] = _site_statistics(model, x_adv)
    worst = max(s["blocked"] for part in evidence.values() for s in part.values())
    return _flag("saturated_caps", worst > threshold, **evidence, max_blocked_fraction=worst,
                 threshold=threshold)


@torch.no_grad()
def determinism_check(model: nn.Module, x: Tensor, *, repeats: int = 3, rtol: float = 1e-5) -> Flag:
    """``nondeterministic_logits``: ``repeats`` eval-mode forward passes of ``x`` must agree
    (max difference at most ``rtol`` times the largest logit)."""
    with caller_state(model):
        xd = x.to(model_device(model, x.device))
        outs = [model(xd) for _ in range(max(2, repeats))]
    diff = max((o - outs[0]).abs().max().item() for o in outs[1:])
    scale = outs[0].abs().max().item()
    return _flag("nondeterministic_logits", diff > rtol * max(scale, 1.0), max_abs_difference=diff,
                 max_abs_logit=scale, repeats=len(outs))


def _robust_fraction(model: nn.Module, attack: Any, x: Tensor, y: Tensor, eps: float, seed: int) -> float:
    """Robust accuracy of ``attack`` on ``x``: clean errors count as not robust."""
    device = model_device(model, x.device)
    with torch.no_grad(), caller_state(model):
        correct = model(x.to(device)).argmax(1).cpu() == y.cpu()
    if not bool(correct.any()):
        return 0.0
    x_adv = attack(model, x[correct], y[correct], eps, seed=seed)
    with torch.no_grad(), caller_state(model):
        robust = model(x_adv.to(device)).argmax(1).cpu() == y[correct].cpu()
    return robust.sum().item() / len(x)


def unbounded_check(model: nn.Module, x: Tensor, y: Tensor, threat_model: ThreatModel, *,
                    attack: str = "torch:PGD", seed: int = 0) -> Flag:
    """``unbounded_not_chance``: ``attack`` with a budget that reaches every input (Linf: the
    width of the bounds) must bring accuracy down to chance level, 1 / classes."""
    lo, hi = threat_model.bounds
    eps = hi - lo if threat_model.norm == "Linf" else (hi - lo) * math.sqrt(x[0].numel())
    tm = threat_model.replace(eps=(eps,), targeted=False)
    with torch.no_grad(), caller_state(model):
        classes = model(x[:1].to(model_device(model, x.device))).shape[1]
    acc = _robust_fraction(model, get_attack(attack, tm), x, y, eps, seed)
    return _flag("unbounded_not_chance", acc > 1.0 / classes, attack=attack, eps=eps,
                 robust_accuracy=acc, chance=1.0 / classes)


def steps_restarts_check(model: nn.Module, x: Tensor, y: Tensor, threat_model: ThreatModel, *,
                         attack: str = "torch:PGD", eps: float | None = None, step_factor: int = 4,
                         restarts: int = 5, seed: int = 0, tolerance: float = TOLERANCE) -> Flag:
    """``more_steps_change_verdict``: ``attack`` at ``eps`` (default the largest budget) against
    itself with ``step_factor`` times the steps and with ``restarts`` restarts."""
    eps = max(threat_model.eps) if eps is None else float(eps)
    tm = threat_model.replace(eps=(eps,))
    runs = {
        "base": tm,
        f"steps x{step_factor}": tm.replace(steps=tm.steps * step_factor),
        f"restarts {restarts}": tm.replace(restarts=max(restarts, tm.restarts)),
    }
    acc = {k: _robust_fraction(model, get_attack(attack, t), x, y, eps, seed) for k, t in runs.items()}
    change = max(abs(a - acc["base"]) for a in acc.values())
    return _flag("more_steps_change_verdict", change > tolerance, attack=attack, eps=eps,
                 robust_accuracy=acc, max_change=change, tolerance=tolerance)


# ------------------------------------------------------------------------------ results checks
def eps_check(results: Results, *, tolerance: float = TOLERANCE) -> Flag:
    """``accuracy_rises_with_eps``: for every attack (and the worst case), robust accuracy must
    not rise with eps by more than ``tolerance``, nor exceed clean accuracy."""
    clean = results.clean_accuracy()
    if clean is None:
        return _skip("accuracy_rises_with_eps", "the results are empty")
    curves = {a: [(e, results.robust_accuracy(a, e)) for e in results.eps] for a in results.attacks}
    curves["worst case"] = [(e, results.worst_case(e)) for e in results.eps]
    rises = []
    for name, pts in curves.items():
        pts = [(0.0, clean)] + [(e, a) for e, a in pts if a is not None]
        for (e0, a0), (e1, a1) in zip(pts, pts[1:]):
            if a1 > a0 + tolerance:
                rises.append({"attack": name, "from_eps": e0, "to_eps": e1, "from": a0, "to": a1})
    return _flag("accuracy_rises_with_eps", bool(rises), clean_accuracy=clean, eps=results.eps,
                 rises=rises, tolerance=tolerance)


def _beats(results: Results, kind: str, reference: str = "white-box", *,
           tolerance: float = TOLERANCE) -> dict[str, Any] | str:
    """Per eps, the fraction of samples robust to every ``reference`` attack but broken by some
    ``kind`` attack; the largest one decides. Returns the reason if there is nothing to compare."""
    families = {r["attack"]: r["family"] for r in results.rows}
    kinds = {a: attack_kind(a, families.get(a)) for a in results.attacks}
    ref = [a for a, k in kinds.items() if k == reference]
    others = [a for a, k in kinds.items() if k == kind]
    if not ref or not others:
        missing = "no " + (f"{reference} attack" if not ref else f"{kind} attack")
        return f"{missing} in the results"
    per_eps = {}
    for eps in results.eps:
        robust_ref = results.per_sample_worst_case(eps, ref)
        robust_other = results.per_sample_worst_case(eps, others)
        common = set(robust_ref) & set(robust_other)
        if not common:
            continue
        broken = sum(robust_ref[s] and not robust_other[s] for s in common)
        per_eps[eps] = {
            f"{reference} accuracy": sum(robust_ref[s] for s in common) / len(common),
            f"{kind} accuracy": sum(robust_other[s] for s in common) / len(common),
            "broken only by " + kind: broken / len(common), "n": len(common)}
    if not per_eps:
        return "no sample was attacked by both"
    worst = max(v["broken only by " + kind] for v in per_eps.values())
    return {"fired": worst > tolerance, "per_eps": per_eps, "reference_attacks": ref,
            f"{kind}_attacks": others, "max_fraction": worst, "tolerance": tolerance}


def other_attacks_check(results: Results, *, tolerance: float = TOLERANCE) -> list[Flag]:
    """The black-box, transfer, surrogate-gradient (BPDA) and single-step attacks in ``results``
    against the plain white-box iterative ones, per sample: four flags."""
    flags = []
    for name, kind in (("blackbox_beats_whitebox", "black-box"), ("transfer_beats_whitebox", "transfer"),
                       ("surrogate_beats_whitebox", "surrogate"),
                       ("single_step_beats_iterative", "single-step")):
        outcome = _beats(results, kind, tolerance=tolerance)
        if isinstance(outcome, str):
            flags.append(_skip(name, outcome))
        else:
            fired = outcome.pop("fired")
            flags.append(_flag(name, fired, **outcome))
    return flags


# ------------------------------------------------------------------------------ the audit
@dataclass
class Audit:
    """All flags for one model, the suite's results they came from, and the verdict."""

    flags: list[Flag]
    results: Results
    model_name: str | None = None

    @property
    def verdict(self) -> str:
        return verdict(self.flags, self.model_name)

    @property
    def masking_likely(self) -> bool:
        return any(f.fired for f in self.flags)

    def flag(self, name: str) -> Flag:
        """The flag called ``name`` (see :data:`CHECKS`)."""
        for f in self.flags:
            if f.name == name:
                return f
        raise KeyError(f"no flag {name!r}; flags: {', '.join(f.name for f in self.flags)}")

    def _cells(self) -> list[list[str]]:
        return [[f.name, "skipped" if f.skipped else "FIRED" if f.fired else "ok",
                 _evidence_text(f.evidence)[:160]] for f in self.flags]

    def table(self, markdown: bool = False) -> str:
        """Results table, flags table and verdict as text (or Markdown)."""
        columns = ("check", "status", "evidence")
        if markdown:
            from .results import _markdown

            flags = _markdown(columns, self._cells())
        else:
            flags = format_table(columns, self._cells())
        return "\n\n".join([self.results.table(markdown).rstrip(), "Gradient-masking checks",
                            flags, "Verdict: " + self.verdict]) + "\n"

    def print(self, file=None) -> None:
        self.results.print(file=file)
        print_table(("check", "status", "evidence"), self._cells(), title="Gradient-masking checks",
                    file=file)
        print("Verdict: " + self.verdict, file=file)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model_name, "verdict": self.verdict,
                "flags": [f.to_dict() for f in self.flags]}


def audit(
    model: nn.Module,
    data: Any,
    threat_model: ThreatModel,
    config: EvalConfig | None = None,
    *,
    results: Results | None = None,
    suite: str = "standard",
    model_name: str | None = None,
    progress: bool = False,
    out: str | os.PathLike | None = None,
) -> Audit:
    """Evaluate ``model`` with ``suite`` plus ``torch:FGSM`` (unless ``results`` are given) and
    run every check of :data:`CHECKS` on the same samples.

    ``data`` as for :func:`~relucap_plugin.evaluation.evaluate` (``config.n_samples`` limits it);
    the model checks use the largest budget of ``threat_model``. Pass several budgets for a
    stronger ``accuracy_rises_with_eps`` check.
    """
    from .data import as_tensors

    config = config or EvalConfig()
    x, y = as_tensors(data, limit=config.n_samples)
    if results is None:
        results = evaluate_suite(model, (x, y), threat_model, suite, config, extra_attacks=["torch:FGSM"],
                                 progress=progress, model_name=model_name, out=out)
    eps = max(threat_model.eps)
    pgd = get_attack("torch:PGD", threat_model.replace(eps=(eps,)))
    x_adv = pgd(model, x, y, eps, seed=config.seed)
    flags = [
        gradient_check(model, x, y),
        saturation_check(model, x, x_adv),
        eps_check(results),
        unbounded_check(model, x, y, threat_model, seed=config.seed),
        *other_attacks_check(results),
        steps_restarts_check(model, x, y, threat_model, seed=config.seed),
        determinism_check(model, x),
    ]
    order = list(CHECKS)
    flags.sort(key=lambda f: order.index(f.name))
    return Audit(flags, results, model_name)


# ------------------------------------------------------------------------------ growth
_SKIP_LAYERS = (nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)
_SKIP_NAMES = {t.__name__ for t in _SKIP_LAYERS}


@torch.no_grad()
def _layer_growth(model: nn.Module, x: Tensor, x_adv: Tensor) -> dict[str, tuple[str, float]]:
    """layer name -> (type, mean over samples of ||h(x_adv) - h(x)||_2 / ||x_adv - x||_2)."""
    outputs: dict[str, list[Tensor]] = {}
    types: dict[str, str] = {}

    def hook(name):
        def record(module, args, output):
            if isinstance(output, Tensor):
                outputs.setdefault(name, []).append(output.detach().flatten(1).double())
                types[name] = type(module).__name__
        return record

    leaves = [(n, m) for n, m in model.named_modules()
              if n and not any(True for _ in m.children()) and not isinstance(m, _SKIP_LAYERS)]
    handles = [m.register_forward_hook(hook(n)) for n, m in leaves]
    try:
        with caller_state(model):
            device = model_device(model, x.device)
            model(x.to(device))
            model(x_adv.to(device))
    finally:
        for h in handles:
            h.remove()
    d_in = (x_adv - x).flatten(1).double().norm(dim=1).to(device)
    moved = d_in > 0
    out = {}
    for name, (clean, adv) in ((n, o) for n, o in outputs.items() if len(o) == 2):
        ratio = (adv - clean).norm(dim=1)[moved] / d_in[moved]
        out[name] = (types[name], ratio.mean().item() if len(ratio) else math.nan)
    return out


@dataclass
class GrowthTable:
    """Per layer, the perturbation growth of the model and of its uncapped twin."""

    rows: list[dict[str, Any]]
    title: str | None = None

    def table(self) -> str:
        return format_table(("layer", "type", "capped", "uncapped"), self._cells())

    def _cells(self) -> list[list[str]]:
        return [[r["layer"], r["type"], f"{r['capped']:.4g}",
                 "" if r["uncapped"] is None else f"{r['uncapped']:.4g}"] for r in self.rows]

    def print(self, file=None) -> None:
        print_table(("layer", "type", "capped", "uncapped"), self._cells(),
                    title=self.title or "perturbation growth ||h(x_adv) - h(x)|| / ||x_adv - x||",
                    file=file)

    def plot(self, path: str | os.PathLike | None = None):
        """Growth per layer (log scale) for both models; saved as PNG to ``path`` if given.
        Returns the matplotlib ``Figure`` (Agg, pyplot untouched)."""
        try:
            from matplotlib.figure import Figure
        except ImportError:
            raise ImportError("GrowthTable.plot() needs matplotlib: pip install matplotlib") from None
        fig = Figure(figsize=(7, 4), layout="constrained")
        ax = fig.add_subplot()
        idx = range(len(self.rows))
        ax.plot(idx, [r["capped"] for r in self.rows], marker="o", label="capped")
        if any(r["uncapped"] is not None for r in self.rows):
            ax.plot(idx, [r["uncapped"] for r in self.rows], marker="s", label="uncapped twin")
        ax.set_xticks(list(idx), [f"{r['layer']}\n{r['type']}" for r in self.rows], fontsize="x-small")
        ax.set_yscale("log")
        ax.set_ylabel("||h(x_adv) - h(x)|| / ||x_adv - x||")
        ax.grid(alpha=0.3)
        ax.legend()
        if path is not None:
            fig.savefig(os.fspath(path), dpi=120)
        return fig


def perturbation_growth(model: nn.Module, x: Tensor, x_adv: Tensor, *, twin: bool = True,
                        certified: bool = False) -> GrowthTable:
    """Per layer (each leaf module's output), ``||h_l(x_adv) - h_l(x)||_2 / ||x_adv - x||_2``,
    mean over the samples of ``x``/``x_adv`` (N, ...) that differ, for ``model`` and (with
    ``twin``) its uncapped twin fed the same inputs. Flatten, Identity and Dropout are left out.

    ``certified=True`` measures the same mechanism as a bound: the mean IBP interval width of
    each layer's output over the whole Linf ball of radius ``max |x_adv - x|`` per sample
    (:func:`relucap_plugin.certify.interval_widths`); the model must be one certify supports.
    """
    if not isinstance(x, Tensor) or not isinstance(x_adv, Tensor) or x.shape != x_adv.shape:
        raise ValueError("x and x_adv must be tensors of the same shape (N, ...), the clean inputs "
                         "and their perturbed versions")
    if not bool(((x_adv - x).flatten(1).abs().amax(1) > 0).any()):
        raise ValueError("x_adv equals x for every sample: there is no perturbation to follow; "
                         "pass adversarial (or noisy) inputs")
    measure = _certified_widths if certified else _layer_growth
    capped = measure(model, x, x_adv)
    uncapped = measure(uncapped_twin(model), x, x_adv) if twin else {}
    rows = [{"layer": n, "type": t, "capped": g, "uncapped": uncapped[n][1] if n in uncapped else None}
            for n, (t, g) in capped.items() if not certified or t not in _SKIP_NAMES]
    return GrowthTable(rows, "certified interval width per layer (IBP)" if certified else None)


def _certified_widths(model: nn.Module, x: Tensor, x_adv: Tensor) -> dict[str, tuple[str, float]]:
    from .certify import interval_widths

    eps = (x_adv - x).flatten(1).abs().amax(1)
    return interval_widths(model, x.to(model_device(model, x.device)), eps)
