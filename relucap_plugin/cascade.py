"""The cascade schedule of :func:`~relucap_plugin.evaluation.evaluate`: each attack only where it
is still needed, budgets in increasing order, verified examples reused at larger budgets.

Under ``schedule="cascade"`` the attacks run in :func:`cascade_order` (cheapest first). The first
attack of that order (the *unconditional* one, a white-box gradient attack whenever there is
one) runs on every clean-correct sample at every eps, so the audit's comparison of PGD with the
worst case stays exact per sample. Every later attack runs at an eps only on the samples no
attack has broken yet at that eps (clean-correct, no verified adversarial example); its other rows
say ``status="not_needed"`` and name the attack that broke the sample. Budgets run in increasing
order, and a verified example at eps ``e`` is verified again at every larger eps ``e'`` (same
norm: an example within ``e`` is within ``e'``) and recorded as the row of the attack that found
it (its ``reason`` says it was reused), instead of attacking that sample again.

The per-sample worst case over attacks is exact under both schedules (a sample counts as robust
only if every attack that ran on it failed); compared with the full schedule it is the same or
lower on every sample for our own attacks, whose random draws are per sample (seeded by the
call's seed, the same under both schedules, and the sample's index), and up to their draws for
library attacks that draw for the whole call (torchattacks' Square). A per-attack accuracy under the cascade is conditional on the sample having
survived the attacks before it. AutoAttack (Croce and Hein 2020)
runs its members on the points still robust in the same way; the nesting of budgets, the
unconditional first attack and the rows that say why an attack did not run are our own design.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .attacks import Attack
    from ._runner import Batch, Runner

__all__ = ["COST_RANK", "MULTI_TARGET_FAMILIES", "NOT_NEEDED", "SCHEDULES", "cascade_order", "check_schedule",
           "check_unconditional", "gates"]

#: The evaluation schedules: every attack on every sample; the cascade (this module); the
#: audit's cascade, where BPDA, transfer and black-box attacks each run on the survivors of the
#: white-box attacks (not of each other), so that each gap the audit tests is measured.
SCHEDULES = ("full", "cascade", "audit")
#: Row status of an attack that did not run on a sample because it was already broken.
NOT_NEEDED = "not_needed"
#: Cost order of attack kinds (:func:`~relucap_plugin.adaptive.attack_kind`), cheapest first:
#: one gradient step, iterative white-box, white-box through surrogate gradients (BPDA: the same
#: steps plus the surrogate's overhead), transfer (crafted on another model, then judged), and
#: black-box last (thousands of queries per sample). Our own ranking, by measured cost per sample.
#: ``"multi-target"`` (:data:`MULTI_TARGET_FAMILIES`: one white-box run per target class) comes
#: after the other white-box attacks and before BPDA, so that under ``schedule="audit"`` every
#: white-box attack has run before the evidence kinds (BPDA of APGD-T is ``"surrogate"``). Under
#: ``schedule="cascade"`` the multi-target attacks (and their BPDA twins) run later, after
#: transfer and before black-box: one run per target class costs more than a BPDA or transfer
#: run, so they get only what those leave (see :func:`cascade_order`).
COST_RANK = {"single-step": 0, "white-box": 1, "multi-target": 2, "surrogate": 3, "transfer": 4,
             "black-box": 5}
#: White-box families ranked as ``"multi-target"``: APGD-T (``torch:APGD-T`` and the libraries').
MULTI_TARGET_FAMILIES = ("APGD-T",)


def check_schedule(schedule: Any) -> str:
    """``schedule`` if it is one of :data:`SCHEDULES`, else a ``ValueError`` naming it."""
    if schedule not in SCHEDULES:
        raise ValueError(
            f"schedule={schedule!r} is not a schedule; pass schedule='cascade' (each attack only "
            "on the samples still robust: the worst case at a fraction of the cost), "
            "schedule='full' (every attack on every sample: exact per-attack and agreement "
            "tables) or schedule='audit' (BPDA, transfer and black-box attacks each on the "
            "survivors of the white-box attacks)"
        )
    return schedule


def cascade_order(attacks: Sequence[Attack], kind: Callable[[Attack], str],
                  unconditional: Sequence[str] = (), schedule: str = "cascade") -> list[Attack]:
    """``attacks`` in the order the cascade runs them: the first white-box iterative attack (as
    given; a multi-target one only if there is no other) first, then the ``unconditional`` ones
    (specs), then the rest by :data:`COST_RANK` of their ``kind`` (e.g. from
    :func:`~relucap_plugin.adaptive.attack_kind`), ties in the given order
    (:data:`MULTI_TARGET_FAMILIES` ranked as ``"multi-target"``). Under ``schedule="cascade"``
    the multi-target attacks, plain and through BPDA, go after every other attack but the
    black-box ones (our own order: they cost one run per target class, so they run on what the
    cheaper kinds leave); under ``"audit"`` they stay with the white-box attacks, before the
    evidence kinds. Without a white-box attack the cheapest one goes first; the first attack
    is unconditional."""
    def multi_target(a: Attack) -> bool:
        return a.family.split("+", 1)[0] in MULTI_TARGET_FAMILIES

    def rank(a: Attack) -> tuple[int, int]:
        if schedule == "cascade" and multi_target(a) and kind(a) != "black-box":
            return (COST_RANK["transfer"], 1 + COST_RANK.get(kind(a), 1))
        return (COST_RANK.get("multi-target" if a.family in MULTI_TARGET_FAMILIES else kind(a), 1), 0)

    ranked = sorted(range(len(attacks)), key=lambda i: (attacks[i].spec not in unconditional,
                                                         rank(attacks[i]), i))
    white = sorted((i for i in range(len(attacks)) if kind(attacks[i]) == "white-box"),
                   key=lambda i: (rank(attacks[i]), i))
    first = white[0] if white else ranked[0]
    return [attacks[first], *(attacks[i] for i in ranked if i != first)]


def gates(attacks: Sequence[Attack], schedule: str, kind: Callable[[Attack], str],
          unconditional: Sequence[str] = ()) -> list[set[str]]:
    """Per attack (in run order), the attacks whose verified examples make it unnecessary on a
    sample: none for the first attack and the ``unconditional`` ones (they run on every sample);
    under ``"cascade"`` every other attack, under ``"audit"`` the white-box and single-step
    attacks only, so each other kind (BPDA, transfer, black-box) runs on all their survivors
    and the audit's checks see what it adds."""
    specs = [a.spec for a in attacks]
    every = set(specs)
    if schedule == "audit":
        every = {a.spec for a in attacks if kind(a) in ("white-box", "single-step")}
    return [set() if n == 0 or s in unconditional else every - {s} for n, s in enumerate(specs)]


class CascadeBatch:
    """The cascade on one batch: :meth:`run` once per eps, in increasing order.

    ``found[attack][k]``: the first verified adversarial example (eps, (...) tensor) ``attack``
    found for position ``k``; it is verified again (by ``verify``, the harness's check) and
    reused at every larger eps.
    """

    def __init__(self, runner: Runner, batch: Batch, attacks: Sequence[Attack], schedule: str,
                 kind: Callable[[Attack], str], verify: Callable[..., tuple[Tensor, list]],
                 unconditional: Sequence[str] = ()):
        self.runner, self.batch, self.attacks, self.verify = runner, batch, list(attacks), verify
        self.gates = gates(self.attacks, schedule, kind, unconditional)
        self.correct = [p == lab for p, lab in zip(batch.clean_pred, batch.labels)]
        self.found: dict[str, dict[int, tuple[float, Tensor]]] = {a.spec: {} for a in attacks}
        self.last_eps: float | None = None

    def _reverify(self, eps: float, found: dict[int, tuple[float, Tensor]]) -> dict[int, tuple]:
        """position -> (eps0, example, norm, prediction) for the examples of ``found`` that are
        still verified adversarial examples at ``eps``."""
        if not found:
            return {}
        ks = sorted(found)
        x = self.batch.x[torch.tensor(ks, device=self.batch.x.device)]
        x_adv = torch.stack([found[k][1] for k in ks])
        norms, reasons = self.verify(x, x_adv, eps, self.runner.tm)
        logits = self.runner._logits(x_adv)
        finite = torch.isfinite(logits).all(1).tolist()
        pred = logits.argmax(1).tolist()
        return {k: (found[k][0], found[k][1], float(norms[j]), pred[j]) for j, k in enumerate(ks)
                if reasons[j] is None and finite[j] and pred[j] != self.batch.labels[k]}

    def run(self, eps: float) -> None:
        """Every attack's rows at ``eps`` for this batch (only the missing ones are written)."""
        if self.last_eps is not None and eps < self.last_eps:
            raise RuntimeError("the cascade runs the budgets of a batch in increasing order")
        self.last_eps = eps
        runner, batch = self.runner, self.batch
        reused = {a.spec: self._reverify(eps, self.found[a.spec]) for a in self.attacks}
        broken: dict[int, dict[str, str]] = {}  # position -> attack -> how it broke it
        for spec, mine in reused.items():
            for k, v in mine.items():
                broken.setdefault(k, {})[spec] = f"{spec} (its example of eps {v[0]:g})"
        for attack, gate in zip(self.attacks, self.gates):
            mine = reused[attack.spec]
            by = {k: next(how for a, how in b.items() if a in gate)
                  for k, b in broken.items() if gate & set(b)}
            attacked = [k for k, c in enumerate(self.correct) if c and k not in mine and k not in by]
            outcome: dict[int, tuple] = {}
            per_sample = 0.0
            if attacked:
                outcome, elapsed = runner._attack(attack, eps, batch, attacked)
                per_sample = elapsed / len(attacked)
            examples: dict[int, Tensor] = {}
            pos = {k: j for j, k in enumerate(attacked)}
            rows = []
            for k in range(len(self.correct)):
                label = batch.labels[k]
                if not self.correct[k]:
                    row = ("ok", None, batch.clean_pred[k], 0.0, False, 0.0)
                    examples[k] = batch.x[k]
                elif k in mine:
                    eps0, x_adv, norm, pred = mine[k]
                    row = ("ok", f"reused: the verified example of eps {eps0:g}, verified again "
                           f"at eps {eps:g}", pred, norm, False, 0.0)
                    examples[k] = x_adv
                elif k in outcome:
                    status, reason, adv_pred, norm = outcome[k]
                    robust = None if status == "failed" else status == "ok" and adv_pred == label
                    row = (status, reason, adv_pred, norm, robust, per_sample)
                    if status == "ok" and not robust:
                        examples[k] = runner._x_adv[pos[k]]
                        broken.setdefault(k, {})[attack.spec] = attack.spec
                        self.found[attack.spec].setdefault(k, (eps, examples[k]))
                else:
                    row = ("not_needed", f"not needed: broken by {by[k]}", None, None, None, 0.0)
                rows.append(runner._row(batch, k, attack, None, eps, *row))
            runner._record(rows, warn_clash=True)
            if runner.store is not None:
                done = [batch.start + k for k, r in enumerate(rows) if r["status"] != "failed"]
                runner.store.record(attack.spec, eps, done,
                                    {batch.start + k: x for k, x in examples.items()})


def check_unconditional(unconditional: Any, specs: Sequence[str], schedule: str) -> list[str]:
    """``unconditional`` as a list of attack specs of the run, else a ``ValueError`` naming it."""
    if isinstance(unconditional, str):
        unconditional = [unconditional]
    out = list(unconditional or ())
    unknown = [u for u in out if u not in specs]
    if unknown:
        raise ValueError(f"unconditional={unknown} names no attack of this run; pass specs of "
                         f"its attacks ({', '.join(specs)})")
    if out and schedule == "full":
        raise ValueError("unconditional= only applies to schedule='cascade' or 'audit' (under "
                         "'full' every attack runs on every sample); drop it or pick a cascade")
    return out


def warn_clash(clash: list[tuple[int, str, float]]) -> None:
    """Warn that a batch run again on resume gave other outcomes than its stored rows."""
    if clash:
        warnings.warn(
            f"resuming the cascade ran batch rows again and got other outcomes than the stored "
            f"rows for {clash[:3]} (a non-deterministic attack or device): the stored rows are "
            "kept, so later attacks of that batch may have run on other samples than in the "
            "interrupted run", RuntimeWarning, stacklevel=4)
