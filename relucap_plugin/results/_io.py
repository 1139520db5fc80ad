"""Results files: reading (torn last line dropped, damaged lines refused), identity of an
evaluation across files, merging metadata, and the line-atomic :class:`ResultsWriter`."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .. import _files
from .._fingerprint import differences as _fingerprint_differences
from ._rows import (
    _IDENTITY, _THREAT_IDENTITY_SKIP, FORMAT, FORMAT_VERSION, ROW_FIELDS, Key, ResultsFileWarning,
    _is_certify, _json_line, _key, _normalise_row, _ordered_union,
)

def _header(metadata: Mapping[str, Any]) -> str:
    return _json_line({"format": FORMAT, "version": FORMAT_VERSION, "metadata": dict(metadata)})


def _read(path: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    if os.path.exists(path):
        _files.check_target(path, None, what="results file")
        if os.path.getsize(path) and not _files.is_ours(path, "results"):
            raise ValueError(
                f"{path} is not a relucap results file: its first line must be the "
                f'metadata line {{"format": "{FORMAT}", ...}}'
            )
    if not os.path.exists(path):
        raise FileNotFoundError(f"results file {path!r} does not exist; check the path (evaluate(..., out=) "
                                "or relucap evaluate --out writes it)")
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise ValueError(f"{path} is empty: not a relucap results file (expected a metadata line)")
    try:
        header = json.loads(lines[0])
    except json.JSONDecodeError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a relucap results file: its first line must be the "
            f'metadata line {{"format": "{FORMAT}", ...}}'
        )
    if header.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path} has results format version {header.get('version')!r}; this "
            f"relucap-plugin reads version {FORMAT_VERSION}: upgrade relucap-plugin"
        )
    rows = []
    for i, line in enumerate(lines[1:], start=2):
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
            rows.append(_normalise_row(row))
        except ValueError as exc:
            if i == len(lines):
                warnings.warn(
                    f"{path}: dropped a torn last line {i} (an interrupted write); every "
                    "complete row was kept and a resumed run recomputes the lost one",
                    ResultsFileWarning,
                    stacklevel=3,
                )
                break
            raise ValueError(
                f"{path} line {i} is damaged ({exc}); only a torn last line can be "
                "dropped. Remove the line or re-run the evaluation"
            ) from None
    _check_duplicates(path, rows)
    return dict(header.get("metadata") or {}), rows


def _check_duplicates(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
    """Refuse two completed rows of one (sample, attack, eps) with different outcomes: the file
    was edited or concatenated from different runs, and either row could be the wrong one."""
    seen: dict[Key, Mapping[str, Any]] = {}
    fields = [f for f in ROW_FIELDS if f not in ("time", "reason")]
    for row in rows:
        if row["status"] == "failed":
            continue
        key = _key(row)
        old = seen.setdefault(key, row)
        if old is not row and any(old[f] != row[f] for f in fields):
            raise ValueError(
                f"{path} holds two rows for sample {key[0]}, attack {key[1]}, eps {key[2]:g} "
                "with different outcomes (the file was edited or joined from different runs); "
                "re-run the evaluation into a new out= path"
            )


def _identity(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The metadata fields that must agree for two tables to be parts of one evaluation."""
    tm = {
        k: v
        for k, v in (metadata.get("threat_model") or {}).items()
        if k not in _THREAT_IDENTITY_SKIP
    }
    cfg = metadata.get("config") or {}
    ident = {f"threat_model.{k}": v for k, v in tm.items()}
    ident.update(
        {f"config.{k}": cfg.get(k) for k in ("seed", "batch_size", "n_samples") if k in cfg}
    )
    ident.update({k: metadata.get(k) for k in _IDENTITY if k in metadata})
    return ident


def _differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    ia, ib = _identity(a), _identity(b)
    out = [f"{k}: {ia[k]!r} vs {ib[k]!r}" for k in sorted(set(ia) & set(ib)) if ia[k] != ib[k]]
    sa, sb = _schedule(a), _schedule(b)
    if sa and sb and sa != sb:
        out.append(f"the schedule ({sa[0]!r} vs {sb[0]!r}, unconditional attacks {sa[1]} vs "
                   f"{sb[1]}: tables of different schedules are never parts of one run)")
    return out + _fingerprint_differences(a.get("fingerprint") or {}, b.get("fingerprint") or {})


def _schedule(metadata: Mapping[str, Any]) -> tuple[str, Any] | None:
    """(schedule, unconditional attacks) of a table's metadata; ``None`` for a table of certify
    rows only (they merge into a table of any schedule)."""
    attacks = metadata.get("attacks") or []
    if attacks and all(_is_certify(str(a)) for a in attacks):
        return None
    return metadata.get("schedule", "full"), metadata.get("unconditional")


def _merged_metadata(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    diff = _differences(a, b)
    if diff:
        raise ValueError(
            "cannot merge results of different evaluations ("
            + "; ".join(diff)
            + "); merge only tables of the same model, threat model and config"
        )
    out = {**b, **a}
    out["attacks"] = _ordered_union(a.get("attacks", []), b.get("attacks", []))
    if a.get("fingerprint") and b.get("fingerprint"):
        out["fingerprint"] = {**b["fingerprint"], **a["fingerprint"], "attacks": {
            **(b["fingerprint"].get("attacks") or {}), **(a["fingerprint"].get("attacks") or {})}}
    if a.get("threat_model") or b.get("threat_model"):
        tm = dict(a.get("threat_model") or b.get("threat_model"))
        tm["eps"] = _ordered_union(
            (a.get("threat_model") or {}).get("eps", []),
            (b.get("threat_model") or {}).get("eps", []),
        )
        out["threat_model"] = tm
    return out


class ResultsWriter:
    """Appends rows to a JSONL results file: whole lines, flushed and fsynced per call, so an
    interrupted run leaves at most a torn last line. ``lock``: the file's advisory lock
    (released by :meth:`close`), taken here if not given."""

    def __init__(self, path: str | os.PathLike, lock: _files.Lock | None = None):
        self.path = _files.check_target(path, "results", what="results file")
        self._lock = lock or _files.Lock(self.path)
        try:
            self._file = open(self.path, "ab")
        except BaseException:
            self._lock.release()
            raise

    def write(self, rows: Iterable[Mapping[str, Any]]) -> None:
        data = "".join(_json_line(r) for r in rows).encode("utf-8")
        if data:
            self._file.write(data)
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()
        self._lock.release()

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _drop_torn_tail(path: str) -> None:
    """Truncate ``path`` after its last newline, so appended rows start on a line of their own."""
    with open(path, "rb+") as f:
        data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # Results.load warned about it
            f.truncate(end)
            f.flush()
            os.fsync(f.fileno())
