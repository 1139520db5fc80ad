"""The row format of a results table: fields, statuses, normalisation and the JSON line."""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

FORMAT = "relucap-results"
FORMAT_VERSION = 1

#: Columns of a row, in file and DataFrame order.
ROW_FIELDS = (
    "sample",  # index of the sample in the evaluated data (iteration order)
    "attack",  # unique attack name, "library:Name"
    "library",  # "torchattacks", "foolbox", "art", or the library of a user attack
    "family",  # the attack across libraries (e.g. "PGD"): rows of one family are compared
    "eps",  # budget in the threat model's norm
    "label",  # true label
    "clean_pred",  # prediction on the clean input
    "adv_pred",  # prediction on the returned example (None: failed)
    "clean_correct",
    "adv_correct",  # counts as robust: clean correct AND correct on a verified example
    "norm",  # perturbation norm in the threat model's norm (None: failed or non-finite)
    "status",  # "ok" | "violation" | "failed"
    "reason",  # why a row is a violation (norm, bounds, non-finite) or the error of a failure
    "skipped",  # True: misclassified clean, so not attacked (the example is the clean input)
    "time",  # wall seconds of the attack call that produced the row / samples in that call
    "margin",  # certify rows: the certified margin lower bound (None: attack rows)
)
#: Library of the rows of :func:`relucap_plugin.certification.certify`: ``adv_correct`` says certified.
#: They are a lower bound, so they are left out of the worst case over attacks.
CERTIFY_LIBRARY = "certify"
#: ``"not_needed"``: under the cascade schedule the attack did not run on the sample because
#: another attack had broken it at that eps (``reason`` names it); no outcome, never robust nor
#: failed (see :mod:`relucap_plugin.cascade`).
STATUSES = ("ok", "violation", "failed", "not_needed")
_NO_OUTCOME = ("failed", "not_needed")
_KEY = ("sample", "attack", "eps")
_REQUIRED = ("sample", "attack", "eps", "clean_correct", "adv_correct", "status")
#: Metadata fields that must agree for two tables to describe the same evaluation.
_IDENTITY = ("model",)
_THREAT_IDENTITY_SKIP = ("eps",)


class BracketError(RuntimeError):
    """A sample certified at some eps was broken by a verified adversarial example within it:
    a bug in the bounds or in the verification, never a result."""


class ResultsFileWarning(UserWarning):
    """A results file had a torn last line (an interrupted write); that line was dropped."""


Key = tuple[int, str, float]


def _key(row: Mapping[str, Any]) -> Key:
    return (row["sample"], row["attack"], row["eps"])


def _normalise_row(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row with every field of :data:`ROW_FIELDS`, plain Python types and a valid status."""
    missing = [f for f in _REQUIRED if f not in row]
    if missing:
        raise ValueError(
            f"results row {dict(row)!r} lacks field(s) {missing}; rows need {list(_REQUIRED)}"
        )
    if row["status"] not in STATUSES:
        raise ValueError(f"results row status must be one of {STATUSES}, got {row['status']!r}")
    _check_types(row)
    out = {f: row.get(f) for f in ROW_FIELDS}
    out["sample"] = int(out["sample"])
    out["attack"] = str(out["attack"])
    out["eps"] = float(out["eps"])
    if out["library"] is None:
        out["library"] = out["attack"].split(":", 1)[0] if ":" in out["attack"] else "custom"
    if out["family"] is None:
        out["family"] = out["attack"].split(":", 1)[-1]
    out["clean_correct"] = bool(out["clean_correct"])
    out["adv_correct"] = None if out["status"] in _NO_OUTCOME else bool(out["adv_correct"])
    if out["status"] == "violation":
        out["adv_correct"] = False
    out["skipped"] = bool(out["skipped"])
    out["time"] = float(out["time"] or 0.0)
    if out["margin"] is not None:
        out["margin"] = float(out["margin"])
    for f in ("label", "clean_pred", "adv_pred"):
        if out[f] is not None:
            out[f] = int(out[f])
    if out["norm"] is not None:
        out["norm"] = float(out["norm"]) if math.isfinite(float(out["norm"])) else None
    _check_consistent(out)
    return out


_BOOLS = ("clean_correct", "adv_correct", "skipped")
_INTS = ("sample", "label", "clean_pred", "adv_pred")
_NUMBERS = ("eps", "norm", "time", "margin")


def _bad_row(row: Mapping[str, Any], what: str) -> ValueError:
    key = tuple(row.get(f) for f in _KEY)
    return ValueError(
        f"results row (sample, attack, eps) = {key!r}: {what}; the evaluation never writes "
        "such a row, so the file was edited or written by something else: restore the row "
        "(or delete it and resume the run to recompute it)")


def _check_types(row: Mapping[str, Any]) -> None:
    """Refuse row values that would be read as another value: a string ``"false"`` is a true
    ``bool``, 2.7 an ``int`` 2. ``None`` is allowed where a field may be empty."""
    for f in _BOOLS:
        v = row.get(f)
        if v is not None and type(v).__name__ not in ("bool", "bool_"):
            raise _bad_row(row, f"{f} must be true or false, got {type(v).__name__} {v!r:.40}")
    for f in (*_INTS, *_NUMBERS):
        v = row.get(f)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, numbers.Real):
            raise _bad_row(row, f"{f} must be a number, got {type(v).__name__} {v!r:.40}")
        if f in _INTS and not float(v).is_integer():
            raise _bad_row(row, f"{f} must be an integer, got {type(v).__name__} {v!r:.40}")


def _check_consistent(row: Mapping[str, Any]) -> None:
    """Refuse a row whose verdicts contradict its predictions: robust only if correct clean and
    status ``ok``; ``clean_correct`` is ``clean_pred == label`` and, for an ``ok`` attack row,
    ``adv_correct`` is ``adv_pred == label``."""
    label = row["label"]
    if row["adv_correct"] and not (row["clean_correct"] and row["status"] == "ok"):
        raise _bad_row(row, f"adv_correct is true but clean_correct is {row['clean_correct']} "
                            f"and status {row['status']!r}")
    if label is not None and row["clean_pred"] is not None \
            and row["clean_correct"] != (row["clean_pred"] == label):
        raise _bad_row(row, f"clean_correct is {row['clean_correct']} but clean_pred "
                            f"{row['clean_pred']} and label {label}")
    if label is not None and row["adv_pred"] is not None and row["status"] == "ok" \
            and row["adv_correct"] != (row["adv_pred"] == label):
        raise _bad_row(row, f"adv_correct is {row['adv_correct']} but adv_pred "
                            f"{row['adv_pred']} and label {label}")


_ENCODER = json.JSONEncoder(allow_nan=False, separators=(",", ":"))


def _json_line(obj: Mapping[str, Any]) -> str:
    return _ENCODER.encode(obj) + "\n"


def _ordered_union(*lists: Iterable[Any]) -> list[Any]:
    seen: dict[Any, None] = {}
    for items in lists:
        for item in items:
            seen.setdefault(item, None)
    return list(seen)



def _is_certify(attack: str) -> bool:
    return attack.startswith(CERTIFY_LIBRARY + ":")
