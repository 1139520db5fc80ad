"""The row format of a results table: fields, statuses, normalisation and the JSON line."""

from __future__ import annotations

import json
import math
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
    return out


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
