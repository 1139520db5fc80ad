"""The attack loop of :func:`~relucap_plugin.evaluation.evaluate`: one :class:`Runner` per run
validates and predicts each batch once, attacks it (seeded per call, halving the batch when out
of memory), verifies every example with the ``verify`` it is given (evaluation's, passed in so
that this module does not import evaluation back) and records rows in the run's ``Results``.
"""

from __future__ import annotations

import hashlib
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._fingerprint import model_digest
from ._torch import (BATCH_DEPENDENT, NONDETERMINISTIC, PROBABILITIES, check_inputs, check_logits, clean_logits,
                     float_dtype, is_out_of_memory, logits_differ, looks_like_probabilities)
from .adversarial import AdversarialStore
from .attacks import Attack
from .data import check_labels
from .results import Results, ResultsWriter
from .threat import EvalConfig, ThreatModel

__all__ = ["Batch", "Runner"]


def _call_seed(seed: int, attack: str, eps: float, start: int, offset: int = 0) -> int:
    """Seed of one attack call, from (seed, attack, eps, first sample index of the batch) and,
    for a part of a batch split after running out of memory, the part's offset in the call."""
    part = f"|{offset}" if offset else ""
    digest = hashlib.sha256(f"{seed}|{attack}|{eps!r}|{start}{part}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


# ------------------------------------------------------------------------------ identity
class _ModelChangedError(RuntimeError):
    """An attack call changed the model's parameters or buffers (never recorded as a failed row)."""


# ------------------------------------------------------------------------------ the loop
@dataclass
class Batch:
    start: int
    x: Tensor  # (B, ...) on the device, in the model's dtype
    y: Tensor  # (B,) int64 on the device
    labels: list[int]
    clean_pred: list[int]
    logits: Tensor  # (B, classes) clean logits

    @property
    def index(self) -> range:
        return range(self.start, self.start + len(self.labels))


class Runner:
    """The state of one evaluation: validates and predicts batches, attacks them, records rows."""

    def __init__(
        self,
        net: nn.Module,
        tm: ThreatModel,
        cfg: EvalConfig,
        device: torch.device,
        results: Results,
        writer: ResultsWriter | None,
        verify: Callable[..., tuple[Tensor, list]],
    ):
        self.net, self.tm, self.cfg, self.device = net, tm, cfg, device
        self.results, self.writer, self.verify = results, writer, verify
        rows = results.rows
        self.done = {(r["sample"], r["attack"], r["eps"]) for r in rows if r["status"] != "failed"}
        self.labels = {r["sample"]: r["label"] for r in rows if r["label"] is not None}
        self.dtype: torch.dtype | None = None
        self.warned: set[str] = set()
        self.params: str | None = None
        self.store: AdversarialStore | None = None
        self._x_adv: Tensor | None = None

    def complete(self, start: int, y: Tensor, keys: Sequence[tuple[str, float]]) -> bool:
        """Whether every (attack, eps) row of the batch exists (checking that labels match)."""
        ys = y.tolist()
        clash = [start + k for k, lab in enumerate(ys) if self.labels.get(start + k, lab) != lab]
        if clash:
            raise ValueError(
                f"samples {clash[:5]} have other labels than in the results file being "
                "resumed: the data differ (order or content); evaluate the same data "
                "in the same order, or write to another out= path"
            )
        return all((start + k, a, e) in self.done for k in range(len(ys)) for a, e in keys)

    def prepare(self, start: int, x: Tensor, y: Tensor) -> Batch:
        """Validate a batch, move it to the device and predict it once (clean)."""
        if not x.is_floating_point():
            raise TypeError(
                f"data x must be floating point in {self.tm.bounds} (got {x.dtype}); "
                "convert uint8 images with x.float() / 255"
            )
        where = f"data samples {start}..{start + len(x) - 1}"
        check_inputs(x, self.tm.bounds, where)
        if self.dtype is None:
            self.dtype = float_dtype(self.net, x.dtype)
        xd = x.to(device=self.device, dtype=self.dtype)
        yd = y.to(device=self.device, dtype=torch.long)
        logits = clean_logits(self._logits, xd, where)
        check_labels(y, logits.shape[1], where)
        if "probabilities" not in self.warned and looks_like_probabilities(logits):
            self.warned.add("probabilities")
            warnings.warn(PROBABILITIES.format(where=where), UserWarning, stacklevel=4)
        if "random" not in self.warned:
            self.warned.add("random")
            self._check_per_sample(xd, logits, where)
        labels = yd.tolist()
        if self.store is not None:
            self.store.clean(start, xd, self.tm.eps)
        return Batch(start, xd, yd, labels, logits.argmax(1).tolist(), logits)

    def _check_per_sample(self, x: Tensor, logits: Tensor, where: str) -> None:
        """Warn when the model's logits of a sample are not a function of that sample alone:
        the first half of the first batch predicted again on its own must give the same logits
        (one more forward of half a batch per run). If not, a second pass of the whole batch
        tells a model random in eval mode from one whose outputs depend on the other samples
        of its batch (batch norm without running statistics)."""
        half = x[: max(1, len(x) // 2)]
        rtol = max(1e-5, 16 * torch.finfo(x.dtype).eps)  # other batch sizes round differently
        try:
            differ, diff, scale = logits_differ(logits[: len(half)], self._logits(half), rtol)
        except Exception as exc:  # e.g. batch norm on batch statistics cannot take one sample
            differ, diff, scale = True, math.inf, float(logits.abs().max())
            error = f"{type(exc).__name__}: {exc}"[:300]
        else:
            error = None
        if not differ:
            return
        random, diff2, scale2 = logits_differ(logits, self._logits(x), rtol)
        if random:
            message = NONDETERMINISTIC.format(where=where, diff=diff2, scale=scale2)
        else:
            message = BATCH_DEPENDENT.format(where=where, n=len(x), k=len(half), diff=diff,
                                             scale=scale, error=f" ({error})" if error else "")
        warnings.warn(message, UserWarning, stacklevel=5)

    def _check_parameters(self, attack: Attack) -> None:
        """Stop the run if an attack call changed the model's parameters or buffers (batch-norm
        running statistics, from running it in train mode): every later row would describe
        another model (the attack gets copies of the inputs, so those cannot change)."""
        if self.params is not None and model_digest(self.net) != self.params:
            raise _ModelChangedError(
                f"attack {attack.spec} changed the model's parameters or buffers during its call "
                "(e.g. batch-norm running statistics, by running the model in train mode); the "
                "rows before it are kept, but the run stops because the model is no longer the "
                "one evaluated: fix the attack (it must not train, edit or run the model in "
                "train mode) and evaluate a fresh copy of the model"
            )

    @torch.no_grad()
    def _logits(self, x: Tensor) -> Tensor:
        return check_logits(
            self.net(x), "for a model returning a tuple or dict pass output=<index, key or function>",
            x=x)

    def _attack(
        self, attack: Attack, eps: float, batch: Batch, attacked: list[int]
    ) -> tuple[dict, float]:
        """Attack the batch's ``attacked`` positions.

        Returns per position (status, reason, adv_pred, norm) and the call's wall time.
        """
        sel = torch.tensor(attacked, device=self.device)
        x, y = batch.x[sel], batch.y[sel]
        t0 = time.perf_counter()
        try:
            x_adv = self._split_call(attack, eps, x, y, batch.start, logits=batch.logits[sel],
                                     ids=torch.tensor([batch.start + k for k in attacked]))
            if x_adv.shape != x.shape:
                raise RuntimeError(
                    f"returned shape {tuple(x_adv.shape)} for inputs {tuple(x.shape)}"
                )
        except _ModelChangedError:
            raise
        except Exception as exc:
            elapsed = time.perf_counter() - t0
            error = f"{type(exc).__name__}: {exc}"[:2000]
            if attack.spec not in self.warned:
                self.warned.add(attack.spec)
                warnings.warn(
                    f"{attack.spec} failed at eps={eps:g} on samples {batch.index[0]}.."
                    f"{batch.index[-1]}: {error} (recorded as failed rows; further "
                    "failures of this attack are recorded without a warning)",
                    RuntimeWarning,
                    stacklevel=4,
                )
            return {k: ("failed", error, None, None) for k in attacked}, elapsed
        elapsed = time.perf_counter() - t0
        norms, reasons = self.verify(x, x_adv, eps, self.tm)
        finite = ~norms.isnan()
        if not bool(finite.all()):  # predict the clean input in place of a non-finite example
            x_adv = torch.where(finite.view(-1, *[1] * (x.dim() - 1)).to(x.device), x_adv, x)
        logits = self._logits(x_adv)
        self._x_adv = x_adv
        pred = logits.argmax(1).tolist()
        nan_logits = (~torch.isfinite(logits)).any(1).tolist()
        out = {}
        for j, (k, n, why) in enumerate(zip(attacked, norms.tolist(), reasons)):
            finite = math.isfinite(n)
            if finite and nan_logits[j]:  # an undefined prediction never counts as robust
                why = "; ".join(filter(None, [why, "the model returns NaN/inf logits on it"]))
            out[k] = (
                "ok" if why is None else "violation",
                why,
                pred[j] if finite and not nan_logits[j] else None,
                n if finite else None,
            )
        return out, elapsed

    def _split_call(
        self, attack: Attack, eps: float, x: Tensor, y: Tensor, start: int, offset: int = 0,
        logits: Tensor | None = None, ids: Tensor | None = None,
    ) -> Tensor:
        """``attack`` on ``x`` (B, ...), seeded by (batch ``start``, ``offset`` of ``x`` in the call);
        ``ids``: the samples' indices, from which our own attacks draw each sample's noise.

        Out of memory: warn, then attack the two halves separately (each seeded by its own
        offset), halving down to one sample; so a split batch gives the unsplit table for
        deterministic attacks, and for random ones the same table whenever memory splits alike.
        """
        seed = _call_seed(self.cfg.seed, attack.spec, eps, start, offset)
        try:
            x_adv = attack(self.net, x.clone(), y.clone(), eps, seed=seed,
                           logits=None if logits is None else logits.clone(), sample_ids=ids)
        except Exception as exc:
            self._check_parameters(attack)
            if len(x) == 1 or not is_out_of_memory(exc):
                raise
        else:
            self._check_parameters(attack)
            return torch.as_tensor(x_adv).to(device=self.device, dtype=x.dtype)
        half = (len(x) + 1) // 2
        warnings.warn(
            f"{attack.spec} ran out of memory at eps={eps:g} on {len(x)} samples from sample "
            f"{start}; retrying in batches of {half} and {len(x) - half} (a smaller "
            "EvalConfig(batch_size=...) avoids the retries)",
            RuntimeWarning,
            stacklevel=5,
        )
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        parts = [(x[:half], y[:half], offset, None if logits is None else logits[:half]),
                 (x[half:], y[half:], offset + half, None if logits is None else logits[half:])]
        return torch.cat([self._split_call(attack, eps, a, b, start, o, z,
                                           None if ids is None else ids[o - offset:o - offset + len(a)])
                          for a, b, o, z in parts])

    def run(self, batch: Batch, attack: Attack, eps: float) -> None:
        """Rows of ``attack`` at ``eps`` for the batch's samples that have none yet.

        The attack runs on all correctly classified samples of the batch even if only some rows
        are missing, so a resumed run reproduces the uninterrupted one; only missing rows are
        written.
        """
        todo = [k for k, i in enumerate(batch.index) if (i, attack.spec, eps) not in self.done]
        redo = self.store is not None and not self.store.covers(
            batch.start, len(batch.labels), [(attack.spec, eps)])
        if not todo and not redo:
            return
        correct = [p == lab for p, lab in zip(batch.clean_pred, batch.labels)]
        attacked = [k for k, c in enumerate(correct) if c]
        outcome: dict[int, tuple] = {}
        per_sample = 0.0
        if any(correct[k] for k in todo) or (redo and attacked):
            outcome, elapsed = self._attack(attack, eps, batch, attacked)
            per_sample = elapsed / len(attacked)
        family = _family(attack)
        rows = []
        for k in todo:
            label, clean = batch.labels[k], batch.clean_pred[k]
            if correct[k]:
                status, reason, adv_pred, norm = outcome[k]
                robust = None if status == "failed" else status == "ok" and adv_pred == label
                time_k = per_sample
            else:
                status, reason, adv_pred, norm, robust, time_k = "ok", None, clean, 0.0, False, 0.0
            rows.append(self._row(batch, k, attack, family, eps, status, reason, adv_pred, norm,
                                  robust, time_k))
        self._record(rows)
        if redo:
            self._keep(batch, attack, eps, correct, attacked, outcome)

    @staticmethod
    def _row(batch: Batch, k: int, attack: Attack, family: str | None, eps: float, status: str,
             reason: str | None, adv_pred: int | None, norm: float | None, robust: bool | None,
             time_k: float) -> dict[str, Any]:
        """The row of position ``k`` of ``batch`` (every field of ``ROW_FIELDS`` but ``margin``;
        ``family`` None: :func:`_family` of the attack)."""
        correct = batch.clean_pred[k] == batch.labels[k]
        return {
            "sample": batch.start + k,
            "attack": attack.spec,
            "library": attack.library,
            "family": family or _family(attack),
            "eps": eps,
            "label": batch.labels[k],
            "clean_pred": batch.clean_pred[k],
            "adv_pred": adv_pred,
            "clean_correct": correct,
            "adv_correct": robust,
            "norm": norm,
            "status": status,
            "reason": reason,
            "skipped": not correct,
            "time": time_k,
        }

    def _record(self, rows: list[dict[str, Any]], warn_clash: bool = False) -> None:
        """Write and add the ``rows`` that are not done yet. ``warn_clash``: warn when a row
        computed again differs in outcome from its stored one (the stored one is kept)."""
        new = [r for r in rows if (r["sample"], r["attack"], r["eps"]) not in self.done]
        if warn_clash and len(new) < len(rows):
            from .cascade import warn_clash as _warn
            from .results import ROW_FIELDS

            fields = [f for f in ROW_FIELDS if f not in ("time", "margin")]
            _warn([(r["sample"], r["attack"], r["eps"]) for r in rows if r not in new
                   and any(self.results.get((r["sample"], r["attack"], r["eps"]))[f] != r[f]
                           for f in fields)])
        if self.writer is not None:
            self.writer.write(new)
        self.results.add(new)
        self.done.update(
            (r["sample"], r["attack"], r["eps"]) for r in new if r["status"] != "failed"
        )
        self.labels.update((r["sample"], r["label"]) for r in new)

    def _keep(self, batch: Batch, attack: Attack, eps: float, correct: list[bool],
              attacked: list[int], outcome: dict[int, tuple]) -> None:
        """Hand the verified adversarial examples of this call to the store: a sample whose row
        (new or resumed) is an ``ok`` row it is not robust on; checks that a recomputed verdict
        matches a resumed row (an example that contradicts its row is never kept)."""
        pos = {k: j for j, k in enumerate(attacked)}
        examples, clash = {}, []
        for k, i in enumerate(batch.index):
            row = self.results.get((i, attack.spec, float(eps)))
            kept = row is not None and row["status"] == "ok" and not row["adv_correct"]
            if not correct[k]:
                broken, x_adv = True, batch.x[k]
            else:
                status, _, adv_pred, _ = outcome.get(k, ("failed", None, None, None))
                broken = status == "ok" and adv_pred != batch.labels[k]
                x_adv = self._x_adv[pos[k]] if broken else None
            if kept and broken:
                examples[i] = x_adv
            elif kept != broken:
                clash.append(i)
        if clash:
            warnings.warn(
                f"{attack.spec} at eps={eps:g} gave other verdicts than the stored rows on samples "
                f"{clash[:5]} when run again to regenerate their adversarial examples (a "
                "non-deterministic attack or device): the rows keep their verdicts and those "
                "samples have no kept example",
                RuntimeWarning, stacklevel=4)
        done = [i for i in batch.index
                if (self.results.get((i, attack.spec, float(eps))) or {}).get("status") != "failed"]
        self.store.record(attack.spec, eps, done, examples)


def _family(attack: Attack) -> str:
    """Agreement key: the attack family plus any threat-model fields the attack changes."""
    changes = getattr(attack, "changes", None) or {}
    if not changes:
        return attack.family
    return f"{attack.family}(" + ", ".join(f"{k}={v!r}" for k, v in sorted(changes.items())) + ")"
