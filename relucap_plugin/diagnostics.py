"""Gradient-masking checks, a plain-words verdict, and perturbation growth across layers.

Every check returns a :class:`Flag`: its ``name``, whether it ``fired``, a one-line ``meaning``
(what a fired flag says about the evaluation) and the ``evidence`` (numbers) it judged by. A
check that could not run (e.g. no cap, no transfer attack in the results) says so in
``evidence["skipped"]`` and does not fire. :func:`audit` runs them all on one model.

The verdict is calibrated (our own design): checks are either *evidence* (:data:`EVIDENCE`: an
attack gap on paired per-sample outcomes, significant by an exact one-sided McNemar test with a
Bonferroni correction, :mod:`relucap_plugin.significance`) or *risk factors* (:data:`RISK`:
zero gradients, saturated caps, ...). :func:`verdict` has three levels: ``"masking measured:
PGD over-reports by X points [interval]"``, ``"risk factors only"``, ``"no sign"``; its number
is :func:`over_report`, PGD (the plain white-box attacks) minus the worst case. The checks follow Carlini et al. 2019, Athalye
et al. 2018 and AutoAttack's own checks; docs/honest-evaluation.md explains each (and the fix).

:func:`perturbation_growth` (from :mod:`relucap_plugin.growth`) shows the mechanism of arXiv
2405.03777 on a user's model: how much an input perturbation grows layer by layer.
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
from ._format import markdown_table, short_repr
from .adaptive import attack_kind, audit_inputs, cap_statistics, evaluate_suite, find_caps
from ._torch import caller_state, logits_differ, looks_like_probabilities, model_device
from .attacks import get_attack
from .results import Results
from .significance import ALPHA, clopper_pearson, mcnemar_exact
from .threat import EvalConfig, ThreatModel
from .growth import GrowthTable, perturbation_growth  # noqa: F401  (re-exported: issue 5's home)
from ._gradient_layers import margin as _margin, zero_gradient_layers

__all__ = [
    "CHECKS",
    "Check",
    "EVIDENCE",
    "LEVELS",
    "RISK",
    "TOLERANCE",
    "Audit",
    "Flag",
    "GrowthTable",
    "audit",
    "determinism_check",
    "eps_check",
    "gradient_check",
    "other_attacks_check",
    "over_report",
    "perturbation_growth",
    "probability_check",
    "saturation_check",
    "steps_restarts_check",
    "unbounded_check",
    "verdict",
    "verdict_level",
    "zero_gradient_layers",
]

#: Accuracy gap (fraction, 2 points) above which two attacks are said to disagree.
TOLERANCE = 0.02
#: Fraction of samples above which zero gradients or fully saturated capped layers fire.
ZERO_FRACTION = 0.01


@dataclass(frozen=True)
class Check:
    """A check's ``label`` (a table cell), ``kind`` (``"evidence"``: an attack gap on paired
    per-sample outcomes, fires only when significant; ``"risk"``: measures no gap) and
    ``meaning`` (one line: what a fired flag says about the evaluation)."""

    label: str
    kind: str
    meaning: str


#: Flag name -> its :class:`Check` (label, kind, meaning); docs/honest-evaluation.md has more.
#: A new check is one function returning ``_flag(name, ...)``, one entry here and its call in
#: :func:`audit`; the tables, the verdict and the experiment report read everything else here.
CHECKS: dict[str, Check] = {
    "zero_gradients": Check("zero grads", "risk",
        "many inputs have an all-zero, NaN or inf input gradient: gradient attacks cannot move them"),
    "saturated_caps": Check("saturated caps", "risk",
        "a capped layer has every unit at 0 or at its cap for many inputs, so no gradient passes it"),
    "accuracy_rises_with_eps": Check("acc rises with eps", "risk",
        "robust accuracy rises with eps or exceeds clean accuracy: the attack fails, not the model"),
    "unbounded_not_chance": Check("unbounded > chance", "risk",
        "an attack with an unbounded budget stays above chance level: it cannot find examples that must exist"),
    "blackbox_beats_whitebox": Check("black-box wins", "evidence",
        "a black-box attack breaks samples the white-box attacks did not: the gradients mislead"),
    "transfer_beats_whitebox": Check("transfer wins", "evidence",
        "examples crafted on the uncapped twin break samples the white-box attacks did not: the gradients mislead"),
    "surrogate_beats_whitebox": Check("BPDA wins", "evidence",
        "the same attack with a surrogate gradient through the caps (BPDA) breaks samples plain white-box did not"),
    "single_step_beats_iterative": Check("FGSM wins", "evidence",
        "a single-step attack breaks samples the iterative ones did not: the iterative attacks are stuck"),
    "more_steps_change_verdict": Check("more steps change it", "evidence",
        "more steps or restarts break samples the base attack did not, beyond sampling noise: the attack has not converged"),
    "nondeterministic_logits": Check("random logits", "risk",
        "repeated forward passes give different logits: randomness can hide gradients (use EOT attacks)"),
    "probability_outputs": Check("softmax out", "risk",
        "the model returns probabilities (a softmax at its end): losses on them saturate, so gradient attacks weaken"),
}

#: Checks that measure an attack gap on paired per-sample outcomes (fire only when significant).
EVIDENCE = tuple(name for name, check in CHECKS.items() if check.kind == "evidence")
#: Checks that say masking may happen but measure no gap.
RISK = tuple(name for name, check in CHECKS.items() if check.kind == "risk")
#: The verdict's three levels, strongest first.
LEVELS = ("masking measured", "risk factors only", "no sign")


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
    return Flag(name, bool(fired), CHECKS[name].meaning, evidence)


def _skip(name: str, reason: str) -> Flag:
    return Flag(name, False, CHECKS[name].meaning, {"skipped": reason})


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


def verdict_level(flags: Sequence[Flag]) -> str:
    """One of :data:`LEVELS`: evidence fired, only risk factors fired, or nothing fired."""
    fired = {f.name for f in flags if f.fired}
    if fired & set(EVIDENCE):
        return LEVELS[0]
    return LEVELS[1] if fired else LEVELS[2]


def _points(v: float) -> str:
    return f"{100 * v:.1f}"


def verdict(flags: Sequence[Flag], model_name: str | None = None,
            over: Mapping[str, Any] | None = None) -> str:
    """The calibrated verdict as a sentence (see the module docstring).

    ``"masking measured: PGD over-reports by X points [lo, hi] at eps e (evidence: ...)"``,
    ``"risk factors only (...): no attack gap beyond sampling noise"`` or ``"no sign of gradient
    masking in N checks"``; ``over`` is :func:`over_report`'s headline.
    """
    who = f"{model_name}: " if model_name else ""
    level = verdict_level(flags)
    fired = [f for f in flags if f.fired]
    head = ""
    if over:
        lo, hi = over["interval"]
        head = (f"PGD over-reports by {_points(over['over_report'])} points "
                f"[{_points(lo)}, {_points(hi)}] at eps {over['eps']:g}")
    if level == LEVELS[0]:
        names = ", ".join(f.name for f in fired if f.name in EVIDENCE)
        return who + "masking measured: " + (head or "attack gap") + f" (evidence: {names})"
    if level == LEVELS[1]:
        names = ", ".join(f.name for f in fired)
        return who + f"risk factors only ({names}): no attack gap beyond sampling noise" + (
            f"; {head}" if head else "")
    ran = [f for f in flags if not f.skipped]
    skipped = len(flags) - len(ran)
    note = f" ({skipped} skipped)" if skipped else ""
    return who + f"no sign of gradient masking in {len(ran)} checks{note}"


# ------------------------------------------------------------------------------ model checks
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


def saturation_check(model: nn.Module, x: Tensor, x_adv: Tensor | None = None, *,
                     threshold: float = ZERO_FRACTION) -> Flag:
    """``saturated_caps``: per cap site (however written, ``"path:op"``), the fraction of units
    at or below the lower bound and at the cap on clean ``x`` (and adversarial ``x_adv``) inputs;
    fires if at some site more than ``threshold`` of the samples have *every* unit in a flat
    region (no gradient passes)."""
    clean = cap_statistics(model, x)
    if not clean:
        return _skip("saturated_caps", "the forward reaches no cap")
    evidence: dict[str, Any] = {"clean": clean}
    if x_adv is not None:
        evidence["adversarial"] = cap_statistics(model, x_adv)
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
    checks = [logits_differ(outs[0], o, rtol) for o in outs[1:]]
    diff, scale = max(c[1] for c in checks), checks[0][2]
    return _flag("nondeterministic_logits", any(c[0] for c in checks), max_abs_difference=diff,
                 max_abs_logit=scale, repeats=len(outs))


def probability_check(model: nn.Module, x: Tensor) -> Flag:
    """``probability_outputs``: the model's outputs on ``x`` are probabilities (every row in
    [0, 1], summing to 1), not logits."""
    with torch.no_grad(), caller_state(model):
        out = model(x.to(model_device(model, x.device)))
    row_sums = out.float().sum(1)
    return _flag("probability_outputs", looks_like_probabilities(out),
                 min_output=out.min().item(), max_output=out.max().item(),
                 max_row_sum_error=(row_sums - 1).abs().max().item())


def _robust(model: nn.Module, attack: Any, x: Tensor, y: Tensor, eps: float, seed: int) -> Tensor:
    """Per sample (N,) bool: robust to ``attack`` (clean errors count as not robust)."""
    device = model_device(model, x.device)
    with torch.no_grad(), caller_state(model):
        correct = model(x.to(device)).argmax(1).cpu() == y.cpu()
    robust = torch.zeros(len(x), dtype=torch.bool)
    if not bool(correct.any()):
        return robust
    x_adv = attack(model, x[correct], y[correct], eps, seed=seed)
    with torch.no_grad(), caller_state(model):
        robust[correct] = model(x_adv.to(device)).argmax(1).cpu() == y[correct].cpu()
    return robust


def _robust_fraction(model: nn.Module, attack: Any, x: Tensor, y: Tensor, eps: float, seed: int) -> float:
    """Robust accuracy of ``attack`` on ``x``: clean errors count as not robust."""
    return _robust(model, attack, x, y, eps, seed).float().mean().item()


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
                         restarts: int = 5, seed: int = 0, alpha: float = ALPHA) -> Flag:
    """``more_steps_change_verdict``: ``attack`` at ``eps`` (default the largest budget) against
    itself with ``step_factor`` times the steps and with ``restarts`` restarts, per sample; fires
    when a stronger run breaks samples the base run did not, significant by an exact McNemar
    test (Bonferroni over the two runs)."""
    eps = max(threat_model.eps) if eps is None else float(eps)
    tm = threat_model.replace(eps=(eps,))
    runs = {
        "base": tm,
        f"steps x{step_factor}": tm.replace(steps=tm.steps * step_factor),
        f"restarts {restarts}": tm.replace(restarts=max(restarts, tm.restarts)),
    }
    robust = {k: _robust(model, get_attack(attack, t), x, y, eps, seed) for k, t in runs.items()}
    acc = {k: r.float().mean().item() for k, r in robust.items()}
    base = robust.pop("base")
    tests = {k: _paired(base, r) for k, r in robust.items()}
    p_min = min(t["p_value"] for t in tests.values()) * len(tests)
    change = max(abs(a - acc["base"]) for a in acc.values())
    return _flag("more_steps_change_verdict", p_min < alpha, attack=attack, eps=eps,
                 robust_accuracy=acc, max_change=change, tests=tests, p_value=min(1.0, p_min),
                 alpha=alpha)


def _paired(reference: Tensor, challenger: Tensor) -> dict[str, Any]:
    """Exact McNemar on per-sample robust flags: ``b`` broken by the challenger alone."""
    b = int((reference & ~challenger).sum())
    c = int((~reference & challenger).sum())
    return {"b": b, "c": c, "p_value": mcnemar_exact(b, c)}


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


def _kinds(results: Results) -> dict[str, str]:
    families = {r["attack"]: r["family"] for r in results.rows}
    return {a: attack_kind(a, families.get(a)) for a in results.attacks}


def _beats(results: Results, kind: str, reference: str = "white-box", *, tests: int = 1,
           alpha: float = ALPHA) -> dict[str, Any] | str:
    """Per eps, the samples robust to every ``reference`` attack but broken by some ``kind``
    attack (``b``) and the reverse (``c``), with the exact one-sided McNemar p-value; fires when
    the smallest p-value times ``tests`` (Bonferroni) is below ``alpha``. Returns the reason if
    there is nothing to compare."""
    kinds = _kinds(results)
    ref = [a for a, k in kinds.items() if k == reference and not results.conditional(a)]
    others = [a for a, k in kinds.items() if k == kind]
    if not ref or not others:
        missing = "no " + (f"{reference} attack" if not ref else f"{kind} attack")
        return f"{missing} in the results"
    per_eps = {}
    for eps in results.eps:
        robust_ref = results.per_sample_worst_case(eps, ref)
        robust_other = results.per_sample_worst_case(eps, others)
        common = sorted(set(robust_ref) & set(robust_other))
        if not common:
            continue
        b = sum(robust_ref[s] and not robust_other[s] for s in common)
        c = sum(robust_other[s] and not robust_ref[s] for s in common)
        per_eps[eps] = {
            f"{reference} accuracy": sum(robust_ref[s] for s in common) / len(common),
            f"{kind} accuracy": sum(robust_other[s] for s in common) / len(common),
            "broken only by " + kind: b / len(common), "b": b, "c": c,
            "p_value": mcnemar_exact(b, c), "n": len(common)}
    if not per_eps:
        return "no sample was attacked by both"
    worst = max(v["broken only by " + kind] for v in per_eps.values())
    p_min = min(1.0, min(v["p_value"] for v in per_eps.values()) * tests * len(per_eps))
    return {"fired": p_min < alpha, "per_eps": per_eps, "reference_attacks": ref,
            f"{kind}_attacks": others, "max_fraction": worst, "p_value": p_min, "alpha": alpha}


def other_attacks_check(results: Results, *, alpha: float = ALPHA) -> list[Flag]:
    """The black-box, transfer, surrogate-gradient (BPDA) and single-step attacks in ``results``
    against the plain white-box iterative ones, per sample: four flags, each fired by an exact
    McNemar test significant at ``alpha`` after Bonferroni over the kinds and budgets compared."""
    flags = []
    pairs = (("blackbox_beats_whitebox", "black-box"), ("transfer_beats_whitebox", "transfer"),
             ("surrogate_beats_whitebox", "surrogate"), ("single_step_beats_iterative", "single-step"))
    present = set(_kinds(results).values())
    tests = max(1, sum(kind in present for _, kind in pairs))
    for name, kind in pairs:
        outcome = _beats(results, kind, tests=tests, alpha=alpha)
        if isinstance(outcome, str):
            flags.append(_skip(name, outcome))
        else:
            fired = outcome.pop("fired")
            flags.append(_flag(name, fired, **outcome))
    return flags


def over_report(results: Results, *, alpha: float = ALPHA) -> dict[str, Any] | None:
    """How much PGD over-reports: per eps, robust accuracy under the plain white-box attacks
    (per-sample worst case over those run on every sample) minus the worst case over every attack,
    with its exact ``1 - alpha`` interval (Clopper-Pearson on the samples only the others broke).

    Returns ``{"per_eps": {...}, "eps", "over_report", "interval", ...}`` for the eps with the
    largest over-report (the headline), or ``None`` without a white-box attack in ``results``.
    """
    ref = [a for a, k in _kinds(results).items() if k == "white-box" and not results.conditional(a)]
    if not ref:
        return None
    per_eps = {}
    for eps in results.eps:
        white = results.per_sample_worst_case(eps, ref)
        every = results.per_sample_worst_case(eps)
        common = sorted(set(white) & set(every))
        if not common:
            continue
        b = sum(white[s] and not every[s] for s in common)
        n = len(common)
        per_eps[eps] = {"pgd": sum(white[s] for s in common) / n,
                        "worst_case": sum(every[s] for s in common) / n,
                        "over_report": b / n, "interval": clopper_pearson(b, n, alpha), "n": n}
    if not per_eps:
        return None
    eps = max(per_eps, key=lambda e: (per_eps[e]["over_report"], -e))
    return {"per_eps": per_eps, "eps": eps, **per_eps[eps], "pgd_attacks": ref}


# ------------------------------------------------------------------------------ the audit
@dataclass
class Audit:
    """All flags for one model, the suite's results they came from, and the verdict."""

    flags: list[Flag]
    results: Results
    model_name: str | None = None
    caps: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def over_report(self) -> dict[str, Any] | None:
        """:func:`over_report` of the results: the headline number, PGD minus worst case."""
        return over_report(self.results)

    @property
    def level(self) -> str:
        """One of :data:`LEVELS`."""
        return verdict_level(self.flags)

    @property
    def verdict(self) -> str:
        return verdict(self.flags, self.model_name, self.over_report)

    @property
    def headline(self) -> str:
        """``"PGD X%, worst case Y%: PGD over-reports by Z points [lo, hi] at eps e"``."""
        over = self.over_report
        if over is None:
            return "no white-box attack in the results: no over-report to measure"
        lo, hi = over["interval"]
        return (f"PGD {_points(over['pgd'])}%, worst case {_points(over['worst_case'])}%: PGD "
                f"over-reports by {_points(over['over_report'])} points [{_points(lo)}, "
                f"{_points(hi)}] at eps {over['eps']:g}")

    @property
    def masking_likely(self) -> bool:
        """Whether masking is *measured* (an evidence check fired); risk factors alone are not."""
        return self.level == LEVELS[0]

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
        flags = (markdown_table if markdown else format_table)(columns, self._cells())
        return "\n\n".join([self.results.table(markdown).rstrip(), "Gradient-masking checks",
                            flags, *self._lines()]) + "\n"

    def _lines(self) -> list[str]:
        caps = ", ".join(self.caps[:8]) + (f" (+{len(self.caps) - 8})" if len(self.caps) > 8 else "")
        return ["Headline: " + self.headline, "Caps reached: " + (caps or "none"),
                *("Note: " + n for n in self.notes), "Verdict: " + self.verdict]

    def print(self, file=None) -> None:
        self.results.print(file=file)
        print_table(("check", "status", "evidence"), self._cells(), title="Gradient-masking checks",
                    file=file)
        for line in self._lines():
            print(line, file=file)

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model_name, "verdict": self.verdict, "level": self.level,
                "over_report": self.over_report, "caps": list(self.caps), "notes": list(self.notes),
                "flags": [f.to_dict() for f in self.flags]}


def _check_results_describe(model: nn.Module, y: Tensor, results: Results) -> None:
    """Refuse ``results=`` of another model (their fingerprint's weights or architecture) or of
    other data (a row's sample out of range or with another label): the audit would give the
    verdict of one evaluation with the model checks of another."""
    from ._fingerprint import architecture_digest, differences, model_digest

    stored = results.metadata.get("fingerprint") or {}
    diff = differences(stored, {"model": model_digest(model), "architecture": architecture_digest(model)})
    labels = y.tolist()
    clash = sorted({r["sample"] for r in results.rows if r["label"] is not None and (
        r["sample"] >= len(labels) or labels[r["sample"]] != r["label"])})
    if clash:
        diff.append(f"the data (samples {clash[:5]} are missing from it or have other labels)")
    if diff:
        raise ValueError(
            f"audit: results= describe another evaluation than the audited model and data; what "
            f"differs: {'; '.join(diff)}. Pass the results of this model on this data (in the same "
            "order), or leave results= out to run the suite")


def audit(
    model: nn.Module,
    data: Any,
    threat_model: ThreatModel,
    config: EvalConfig | None = None,
    *,
    results: Results | None = None,
    suite: str = "standard",
    suite_kwargs: dict[str, Any] | None = None,
    model_name: str | None = None,
    progress: bool = False,
    out: str | os.PathLike | None = None,
) -> Audit:
    """Evaluate ``model`` with ``suite`` plus ``torch:FGSM`` (schedule ``"audit"``) unless
    ``results`` are given (then reused: :func:`.adaptive.audit_inputs`); run every check.

    ``data`` as for :func:`~relucap_plugin.evaluation.evaluate` (``config.n_samples`` limits it);
    the model checks use the largest budget of ``threat_model``. Pass several budgets for a
    stronger ``accuracy_rises_with_eps`` check. ``suite_kwargs`` go to the suite (e.g.
    ``{"square_queries": 1000}``).
    """
    from .data import as_tensors

    if results is not None and not isinstance(results, Results):
        raise TypeError(f"audit: results= must be a Results (from evaluate() or Results.load(path)), "
                        f"got {type(results).__name__} {short_repr(results)}; or leave it out to "
                        "run the suite")
    config = config or EvalConfig()
    x, y = as_tensors(data, limit=config.n_samples)
    notes: list[str] = []
    if results is not None:
        _check_results_describe(model, y, results)
    if results is None:
        results = evaluate_suite(model, (x, y), threat_model, suite, config, extra_attacks=["torch:FGSM"],
                                 suite_kwargs=suite_kwargs, progress=progress, model_name=model_name,
                                 out=out, schedule="audit")
    results, x_adv = audit_inputs(model, (x, y), threat_model, config, results, notes)
    scan = find_caps(model, x[:8])
    notes = [*results.metadata.get("notes", []), *notes]
    if scan.warning and scan.warning not in notes:
        notes.append(scan.warning)
    grad = gradient_check(model, x, y)
    if grad.fired and not scan.sites:
        layers = zero_gradient_layers(model, x, y)
        grad = _flag("zero_gradients", True, **grad.evidence, no_cap_reached=True, zero_at=layers)
        notes.append("gradients vanish at ops that are not a known cap (no cap reached); they "
                     "become zero at " + (", ".join(f"{r['layer']} ({r['type']}, {_points(r['fraction'])}% "
                                                     "of samples)" for r in layers) or "the input"))
    flags = [
        grad,
        saturation_check(model, x, x_adv),
        eps_check(results),
        unbounded_check(model, x, y, threat_model, seed=config.seed),
        *other_attacks_check(results),
        steps_restarts_check(model, x, y, threat_model, seed=config.seed),
        determinism_check(model, x),
        probability_check(model, x),
    ]
    order = list(CHECKS)
    flags.sort(key=lambda f: order.index(f.name))
    return Audit(flags, results, model_name, [str(site) for site in scan.sites], notes)
