"""The per-sample results table of an evaluation: aggregates, save/load/merge, print and plot.

One row per (sample index, attack, eps) says whether the sample was classified correctly clean
and on the verified adversarial example, how large the perturbation was and how verification
went. Everything else (accuracies, the per-sample worst case, cross-library agreement) is a
reduction of these rows, so tables from interrupted runs, several files or several processes
merge by key and give the same numbers as one run.

File format (JSON Lines): the first line is ``{"format": "relucap-results", "version": 1,
"metadata": {...}}``, every further line is one row. Rows are appended line-atomically while an
evaluation runs (:class:`ResultsWriter`); :meth:`Results.load` drops a torn last line with a
warning and keeps every complete row.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from .. import _files
from . import _render
from ._io import (
    ResultsWriter, _differences, _drop_torn_tail, _header, _merged_metadata, _read,
)
from ._rows import (  # noqa: F401 (FORMAT, FORMAT_VERSION: the file format, as before the split)
    _NO_OUTCOME, CERTIFY_LIBRARY, FORMAT, FORMAT_VERSION, ROW_FIELDS, STATUSES, BracketError, Key,
    ResultsFileWarning, _is_certify, _json_line, _key, _normalise_row, _ordered_union,
)

__all__ = [
    "CERTIFY_LIBRARY",
    "BracketError",
    "ROW_FIELDS",
    "STATUSES",
    "Results",
    "ResultsFileWarning",
    "ResultsWriter",
    "load_same_evaluation",
    "open_results_file",
]


class Results:
    """Per-sample table of an evaluation plus its metadata (threat model, config, model, versions).

    Rows are dicts with the fields of :data:`ROW_FIELDS`, unique by (sample, attack, eps). A row
    whose verification failed (``status="violation"``) is never robust; a ``"failed"`` row (the
    attack raised) has no outcome and is left out of accuracies and listed by :meth:`missing`.
    """

    def __init__(
        self, rows: Iterable[Mapping[str, Any]] = (), metadata: Mapping[str, Any] | None = None
    ):
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._rows: dict[Key, dict[str, Any]] = {}
        self._index: dict[tuple[str, float], list[dict[str, Any]]] | None = None
        self._has_certify = False
        self.extend(rows)

    # ------------------------------------------------------------------ rows
    def extend(self, rows: Iterable[Mapping[str, Any]]) -> int:
        """:meth:`add`, returning how many rows were added or replaced."""
        return len(self._add(_normalise_row(row) for row in rows))

    def add(self, rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Add rows under the table's one rule: a new key is added; a key already present is
        kept, except that a completed row replaces a ``"failed"`` one (a resumed run retried
        it). Returns what changed: the rows added or replaced (copies), in order, e.g. to
        append exactly those to a results file."""
        return [dict(r) for r in self._add(_normalise_row(row) for row in rows)]

    def get(self, key: Key) -> dict[str, Any] | None:
        """The row of ``key`` = (sample, attack, eps) (a copy), or ``None``."""
        row = self._rows.get((int(key[0]), str(key[1]), float(key[2])))
        return None if row is None else dict(row)

    def _add(self, rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
        """:meth:`add` for rows that already have every field in its plain type; returns the
        stored rows that changed."""
        changed = []
        for row in rows:
            key = _key(row)
            old = self._rows.get(key)
            if old is None or (old["status"] == "failed" and row["status"] != "failed"):
                self._rows[key] = row
                changed.append(row)
                self._has_certify = self._has_certify or row["library"] == CERTIFY_LIBRARY
        if changed:
            self._index = None
            if self._has_certify:
                self._check_bracket()
        return changed

    _is_certify = staticmethod(_is_certify)

    def _check_bracket(self) -> None:
        """Raise :class:`BracketError` if a sample certified at eps has a verified adversarial
        example (an ``ok`` row, clean correct, not robust) at some eps' <= eps."""
        certified: dict[int, tuple[float, str]] = {}
        for r in self._rows.values():
            if r["library"] == CERTIFY_LIBRARY and r["adv_correct"]:
                if r["eps"] > certified.get(r["sample"], (-1.0, ""))[0]:
                    certified[r["sample"]] = (r["eps"], r["attack"])
        if not certified:
            return
        for r in self._rows.values():
            cert = certified.get(r["sample"])
            if (cert is not None and r["library"] != CERTIFY_LIBRARY and r["status"] == "ok"
                    and r["clean_correct"] and not r["adv_correct"] and r["eps"] <= cert[0]):
                raise BracketError(
                    f"sample {r['sample']} is certified at eps {cert[0]:g} ({cert[1]}) but "
                    f"{r['attack']} found a verified adversarial example at eps {r['eps']:g} "
                    f"(norm {r['norm']}, predicted {r['adv_pred']} for label {r['label']}): a bug "
                    "in the bounds or in the verification; report it with the model and sample")

    def _group(self, attack: str, eps: float) -> list[dict[str, Any]]:
        """The rows of one (attack, eps), from an index rebuilt after rows change."""
        if self._index is None:
            self._index = {}
            for r in self._rows.values():
                self._index.setdefault((r["attack"], r["eps"]), []).append(r)
        return self._index.get((attack, float(eps)), [])

    @property
    def rows(self) -> list[dict[str, Any]]:
        """The rows (copies), in the order they were added."""
        return [dict(r) for r in self._rows.values()]

    def __len__(self) -> int:
        return len(self._rows)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return iter(self.rows)

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def keys(self) -> set[Key]:
        """The (sample, attack, eps) keys present."""
        return set(self._rows)

    def __repr__(self) -> str:
        return (
            f"Results({len(self.samples)} samples x {len(self.attacks)} attacks x "
            f"{len(self.eps)} eps, {len(self)} rows, model={self.metadata.get('model')!r})"
        )

    @property
    def attacks(self) -> list[str]:
        """Attack names: the metadata's order, then any others in order of appearance."""
        return _ordered_union(
            self.metadata.get("attacks", []), (r["attack"] for r in self._rows.values())
        )

    @property
    def eps(self) -> list[float]:
        """Budgets present (sorted)."""
        return sorted({r["eps"] for r in self._rows.values()})

    @property
    def samples(self) -> list[int]:
        """Sample indices present (sorted)."""
        return sorted({r["sample"] for r in self._rows.values()})

    def outcomes(self) -> list[tuple[Any, ...]]:
        """Every field except ``time``, sorted by key: equal for two runs with the same seed."""
        fields = [f for f in ROW_FIELDS if f != "time"]
        return [tuple(r.get(f) for f in fields) for _, r in sorted(self._rows.items())]

    # ------------------------------------------------------------ aggregates
    def _completed(self, attack: str, eps: float) -> list[dict[str, Any]]:
        return [r for r in self._group(attack, eps) if r["status"] not in _NO_OUTCOME]

    @property
    def schedule(self) -> str:
        """The schedule of the evaluation (``metadata["schedule"]``, default ``"full"``);
        ``"cascade"`` for rows with ``not_needed`` rows but no such metadata."""
        if "schedule" in self.metadata:
            return self.metadata["schedule"]
        if any(r["status"] == "not_needed" for r in self._rows.values()):
            return "cascade"
        return "full"

    def conditional(self, attack: str, eps: float | None = None) -> bool:
        """Whether ``attack`` (at ``eps``, or at any eps) skipped samples as ``not_needed``:
        its per-attack numbers are then conditional on the attacks before it."""
        groups = [self._group(attack, eps)] if eps is not None else [
            self._group(attack, e) for e in self.eps]
        return any(r["status"] == "not_needed" for rows in groups for r in rows)

    def conditional_accuracy(self, attack: str, eps: float) -> float | None:
        """Under the cascade: of the clean-correct samples ``attack`` ran on at ``eps`` (those no
        earlier attack had broken), the fraction it left robust. ``None`` if it ran on none or
        failed on one. Under the full schedule the same fraction over every clean-correct sample."""
        rows = self._group(attack, float(eps))
        ran = [r for r in rows if r["clean_correct"] and r["status"] != "not_needed"]
        if not ran or any(r["status"] == "failed" for r in ran):
            return None
        return sum(r["adv_correct"] for r in ran) / len(ran)

    def clean_accuracy(self) -> float | None:
        """Fraction of samples classified correctly without attack (None: no rows)."""
        clean = {r["sample"]: r["clean_correct"] for r in self._rows.values()}
        return sum(clean.values()) / len(clean) if clean else None

    def robust_accuracy(self, attack: str, eps: float) -> float | None:
        """Fraction of the rows of ``attack`` at ``eps`` that count as robust.

        ``None`` when there are no rows or any row failed: attacks fail only on samples they
        attack (correctly classified ones), so a fraction over the completed rows would be
        biased low (:meth:`missing` lists the failed rows; resume to fill them in). ``None``
        too when the attack did not run on some samples under the cascade schedule
        (``not_needed`` rows): use :meth:`conditional_accuracy` or :meth:`worst_case` then.
        """
        rows = self._group(attack, float(eps))
        if not rows or any(r["status"] in _NO_OUTCOME for r in rows):
            return None
        return sum(r["adv_correct"] for r in rows) / len(rows)

    def per_sample_worst_case(
        self, eps: float, attacks: Sequence[str] | None = None
    ) -> dict[int, bool]:
        """sample -> robust against every completed attack at ``eps`` (min over attacks)."""
        chosen = None if attacks is None else set(attacks)
        worst: dict[int, bool] = {}
        for attack in self.attacks:
            if (attack in chosen) if chosen is not None else not self._is_certify(attack):
                for r in self._completed(attack, eps):
                    worst[r["sample"]] = worst.get(r["sample"], True) and r["adv_correct"]
        return worst

    def worst_case(self, eps: float, attacks: Sequence[str] | None = None) -> float | None:
        """Mean over samples of the minimum over attacks at ``eps`` (not the minimum of means).

        Failed rows are left out, so a sample that some attack failed on is judged by the
        others (an upper bound for it; :meth:`missing` lists such rows).
        """
        worst = self.per_sample_worst_case(eps, attacks)
        return sum(worst.values()) / len(worst) if worst else None

    def certified(self, eps: float) -> float | None:
        """Fraction of samples certified at ``eps`` by any certify method (None: no such rows)."""
        best: dict[int, bool] = {}
        for attack in self.attacks:
            if self._is_certify(attack):
                for r in self._completed(attack, eps):
                    best[r["sample"]] = best.get(r["sample"], False) or r["adv_correct"]
        return sum(best.values()) / len(best) if best else None

    def violations(self) -> list[dict[str, Any]]:
        """Rows whose adversarial example failed verification (never counted as robust)."""
        return [dict(r) for r in self._rows.values() if r["status"] == "violation"]

    def failed(self) -> list[dict[str, Any]]:
        """Rows whose attack raised; ``reason`` holds the error."""
        return [dict(r) for r in self._rows.values() if r["status"] == "failed"]

    def missing(self) -> list[Key]:
        """Keys without an outcome: failed rows, and (sample, attack, eps) combinations expected
        from the metadata (``n_samples``, ``attacks``, threat-model ``eps``) or from the samples
        seen, that have no row (e.g. an interrupted run)."""
        n = self.metadata.get("n_samples")
        samples = range(int(n)) if n is not None else self.samples
        eps_list = _ordered_union(self.metadata.get("threat_model", {}).get("eps", []), self.eps)
        out = [k for k, r in self._rows.items() if r["status"] == "failed"]
        out += [
            (s, a, float(e))
            for s in samples
            for a in self.attacks
            for e in eps_list
            if (s, a, float(e)) not in self._rows
        ]
        return sorted(out)

    def agreement(self) -> list[dict[str, Any]]:
        """The same attack family run through several libraries, side by side per eps (attacks
        with ``not_needed`` rows, i.e. conditional under the cascade schedule, are left out).

        Each entry: ``family``, ``eps``, ``accuracy`` (library -> robust accuracy over the
        ``n_common`` samples completed by all of them, so that failed rows of one library do not
        skew the comparison), ``attacks`` (library -> attack name),
        ``disagreements`` (common samples whose robust verdict differs between libraries) and
        ``max_gap`` (largest accuracy difference, in points).
        """
        by_family: dict[str, dict[str, str]] = {}
        cond = {r["attack"] for r in self._rows.values() if r["status"] == "not_needed"}
        for r in self._rows.values():
            if r["attack"] not in cond:
                by_family.setdefault(r["family"], {}).setdefault(r["library"], r["attack"])
        out = []
        for family, libs in by_family.items():
            if len(libs) < 2:
                continue
            for eps in self.eps:
                verdicts = {
                    lib: {r["sample"]: r["adv_correct"] for r in self._completed(name, eps)}
                    for lib, name in sorted(libs.items())
                }
                common = set.intersection(*(set(v) for v in verdicts.values()))
                if not common:
                    continue
                acc = {lib: sum(v[s] for s in common) / len(common) for lib, v in verdicts.items()}
                disagree = sum(len({v[s] for v in verdicts.values()}) > 1 for s in common)
                out.append(
                    {
                        "family": family,
                        "eps": eps,
                        "accuracy": acc,
                        "attacks": dict(sorted(libs.items())),
                        "n_common": len(common),
                        "disagreements": disagree,
                        "max_gap": 100.0 * (max(acc.values()) - min(acc.values())),
                    }
                )
        return out

    def summary(self) -> list[dict[str, Any]]:
        """One aggregate per (attack, eps), then the worst case over all attacks per eps."""
        out = []
        for attack in self.attacks:
            for eps in self.eps:
                rows = self._group(attack, eps)
                if not rows:
                    continue
                done = [r for r in rows if r["status"] not in _NO_OUTCOME]
                attacked = [r for r in done if not r["skipped"] and r["norm"] is not None]
                conditional = len(done) + sum(r["status"] == "failed" for r in rows) < len(rows)
                out.append(
                    {
                        "attack": attack,
                        "library": rows[0]["library"],
                        "eps": eps,
                        "robust_accuracy": self.conditional_accuracy(attack, eps) if conditional
                        else self.robust_accuracy(attack, eps),
                        "conditional": conditional,
                        "n": sum(r["clean_correct"] for r in done) if conditional else len(done),
                        "violations": sum(r["status"] == "violation" for r in rows),
                        "failed": sum(r["status"] == "failed" for r in rows),
                        "mean_norm": sum(r["norm"] for r in attacked) / len(attacked)
                        if attacked
                        else None,
                        "time": sum(r["time"] for r in rows),
                    }
                )
        n_attacks = sum(not self._is_certify(a) for a in self.attacks)
        if n_attacks > 1:
            for eps in self.eps:
                worst = self.per_sample_worst_case(eps)
                out.append(
                    {
                        "attack": f"worst case ({n_attacks} attacks)",
                        "library": "",
                        "eps": eps,
                        "robust_accuracy": sum(worst.values()) / len(worst) if worst else None,
                        "conditional": False,
                        "n": len(worst),
                        "violations": None,
                        "failed": None,
                        "mean_norm": None,
                        "time": None,
                    }
                )
        return out

    # -------------------------------------------------------------- display
    def table(self, markdown: bool = False) -> str:
        """The summary (and agreement) tables and notes as text, or as Markdown."""
        return _render.table(self, markdown)

    def print(self, file=None) -> None:
        """Print the summary and agreement tables (rich if installed) and the notes."""
        _render.print_tables(self, file)

    def to_pandas(self):
        """The rows as a ``pandas.DataFrame`` (columns :data:`ROW_FIELDS`)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Results.to_pandas() needs pandas: pip install pandas") from None
        return pd.DataFrame(self.rows, columns=list(ROW_FIELDS))

    def plot(self, path: str | os.PathLike | None = None):
        """Robust accuracy vs eps, one line per attack plus the worst case; saved as PNG to
        ``path`` if given. Returns the matplotlib ``Figure`` (drawn with Agg; pyplot untouched)."""
        return _render.plot(self, path)

    # ------------------------------------------------ adversarial examples
    #: The kept examples (:class:`~relucap_plugin.adversarial.AdversarialStore`), set by
    #: ``evaluate(keep_adversarial=)``; :meth:`load` sets the path of the file to read on demand.
    _adversarial = None
    _adversarial_path: str | None = None

    def _store(self):
        if self._adversarial is None and self._adversarial_path is not None:
            from ..adversarial import AdversarialStore

            self._adversarial = AdversarialStore.load(
                self._adversarial_path, self.metadata.get("fingerprint"))
        return self._adversarial

    def _examples(self, eps: float | None):
        if self._store() is None:
            raise ValueError(
                "these results kept no adversarial examples: evaluate with "
                "keep_adversarial='worst' or 'all' (CLI --save-adversarial worst|all)")
        if eps is None:
            if len(self.eps) != 1:
                raise ValueError(f"these results hold several budgets {self.eps}: pass eps= (one of them)")
            eps = self.eps[0]
        return self._adversarial, float(eps)

    def adversarial_examples(self, attack: str | None = None, eps: float | None = None):
        """``(indices, x_adv)``: (K,) sample indices and (K, ...) verified adversarial examples
        of ``attack`` at ``eps`` (``attack=None``: the worst-case example of every sample broken
        by a verified example; a sample misclassified clean has its clean input)."""
        store, eps = self._examples(eps)
        if attack is None:
            x, source = store.worst_case(eps, self.samples)
            idx = (source >= 0).nonzero().flatten()
            return idx, x[idx]
        return store.of_attack(attack, eps)

    def worst_case_examples(self, eps: float | None = None):
        """(N, ...) per sample at ``eps``: the verified example of the first attack (run order)
        that broke it, else the clean input (robust, or broken only by a violation)."""
        store, eps = self._examples(eps)
        return store.worst_case(eps, self.samples)[0]

    # ------------------------------------------------------- files, merging
    def save(self, path: str | os.PathLike) -> None:
        """Write the JSONL file atomically (temporary file, then rename), and the kept
        adversarial examples next to it (``NAME.adversarial.safetensors``)."""
        lines = [_header(self.metadata)] + [_json_line(r) for r in self._rows.values()]
        path = _files.check_target(path, "results", what="results file")
        _files.atomic_write(path, "".join(lines))
        if self._store() is not None:
            from ..adversarial import sidecar_path

            self._adversarial.save(sidecar_path(path))

    @classmethod
    def load(cls, path: str | os.PathLike) -> Results:
        """Read a JSONL results file. A torn last line (interrupted write) is dropped with a
        :class:`ResultsFileWarning`; a damaged line elsewhere is a ``ValueError``."""
        metadata, rows = _read(os.fspath(path))
        loaded = cls(rows, metadata)
        sidecar = os.path.splitext(os.fspath(path))[0] + ".adversarial.safetensors"
        if os.path.exists(sidecar):
            loaded._adversarial_path = sidecar
        return loaded

    def merge(self, *others: Results) -> Results:
        """A new table with the rows of all tables; duplicate keys are dropped (idempotent).

        Tables must describe the same evaluation (same model and threat model apart from eps);
        attacks and eps of all of them are united in the metadata.
        """
        metadata = dict(self.metadata)
        for other in others:
            if not isinstance(other, Results):
                raise TypeError(f"can only merge Results, got {type(other).__name__} {other!r:.80}")
            metadata = _merged_metadata(metadata, other.metadata)
        merged = Results(self._rows.values(), metadata)
        for other in others:
            merged.extend(other._rows.values())
        return merged




def load_same_evaluation(path: str, metadata: Mapping[str, Any]) -> Results:
    """The results in ``path``, which must be of the evaluation ``metadata`` describes (same
    model, threat model apart from eps, seed, batch size, sample count): else a ``ValueError``."""
    loaded = Results.load(path)
    diff = _differences(loaded.metadata, metadata)
    if metadata.get("fingerprint") and not loaded.metadata.get("fingerprint"):
        diff.append("the file records no fingerprint of what produced it (written by an older "
                    "relucap-plugin), so its rows cannot be checked against this run")
    if diff:
        raise ValueError(
            f"{path} holds results of a different evaluation; what differs: " + "; ".join(diff)
            + ". Resume with the same model, data, threat model, attacks and config, or pass "
            "resume=False to start over (the file is rewritten), or write to another out= path"
        )
    _check_rows_in_run(path, loaded, metadata)
    return loaded


def _check_rows_in_run(path: str, loaded: Results, metadata: Mapping[str, Any]) -> None:
    """Refuse rows of samples the run does not have (an edited or foreign file)."""
    n = metadata.get("n_samples")
    outside = sorted({r["sample"] for r in loaded._rows.values()
                      if r["sample"] < 0 or (n is not None and r["sample"] >= n)})
    if outside:
        raise ValueError(
            f"{path} holds rows for sample(s) {outside[:5]} outside this run's {n} samples "
            "(indices 0..n-1); the file does not belong to this data: pass resume=False to start "
            "over, or write to another out= path"
        )



def open_results_file(
    path: str | os.PathLike, metadata: Mapping[str, Any], resume: bool
) -> tuple[Results, ResultsWriter]:
    """Prepare ``path`` for streaming rows: the rows already there (when resuming) and a writer.

    ``resume=False`` (or no file yet) starts a new file with ``metadata``. ``resume=True`` keeps
    the complete rows of an existing file; its evaluation must match ``metadata`` (model, threat
    model apart from eps, seed, batch size, sample count), and new attacks or eps are added to
    its metadata line (rewritten atomically).
    """
    path = _files.check_target(path, "results", what="out=",
                               hint="choose another out= path")
    lock = _files.Lock(path)
    try:
        if resume and os.path.exists(path) and os.path.getsize(path):
            existing = load_same_evaluation(path, metadata)
            _drop_torn_tail(path)
            merged = _merged_metadata(existing.metadata, metadata)
            merged = {
                **merged,
                **{k: v for k, v in metadata.items()
                   if k not in ("attacks", "threat_model", "fingerprint")},
            }
            if merged != existing.metadata:
                existing = Results(existing._rows.values(), merged)
                existing.save(path)
        else:
            existing = Results(metadata=metadata)
            existing.save(path)
        return existing, ResultsWriter(path, lock)
    except BaseException:
        lock.release()
        raise
