"""Adversarial examples kept by :func:`~relucap_plugin.evaluation.evaluate` (``keep_adversarial=``).

Only verified examples are kept: an ``"ok"`` row (norm within the budget, inside the bounds,
finite) that the model misclassifies. A violation is never kept. Per eps, the *worst-case
example* of a sample is the verified example of the first attack (in the run's attack order)
that broke it, else the clean input; a sample misclassified clean has its clean input as
example. A sample the worst case counts as broken only through a violation has no verified
example, so its worst-case example is its clean input (``source`` -1).

Memory (and disk): ``"worst"`` holds N x input size x eps x itemsize bytes (4 for float32),
``"all"`` adds up to N x input size x attacks x eps x itemsize for the per-attack examples.

On disk (with ``out=``) the examples live in a safetensors file next to the results file,
``NAME.adversarial.safetensors``, written atomically (at most every :data:`SAVE_EVERY` seconds,
and when the run ends or is interrupted). Its metadata holds the run's fingerprint, so a
resumed run keeps the examples it had; for every (sample, attack, eps) whose example is not in
the file (the run kept none, was killed before the last save, or kept ``"worst"`` and now asks
for ``"all"``) the batch is attacked again with its own seed, which regenerates the example,
and the new verdict is checked against the stored row. Our own design.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from . import _files
from ._fingerprint import differences

__all__ = ["KEEP", "SAVE_EVERY", "AdversarialStore", "sidecar_path"]

KEEP = ("worst", "all")
FORMAT = "relucap-adversarial"
#: Seconds between two saves of the examples file during a run.
SAVE_EVERY = 30.0


def sidecar_path(results_path: str | os.PathLike) -> str:
    """The examples file of a results file: ``folder/NAME.adversarial.safetensors``."""
    return os.path.splitext(os.fspath(results_path))[0] + ".adversarial.safetensors"


def check_keep(keep: str | None) -> str | None:
    if keep is not None and keep not in KEEP:
        raise ValueError(f"keep_adversarial must be None, 'worst' or 'all', got {keep!r}")
    return keep


class AdversarialStore:
    """Verified adversarial examples of one run, in memory (CPU), with their coverage.

    ``worst[e]``: (N, ...) worst-case examples at eps index ``e``; ``source[e]``: (N,) index of
    the attack whose example it is (-1: the clean input); ``covered[(a, e)]``: (N,) bool, the
    outcome of attack ``a`` on each sample has been folded in; ``per_attack[(a, e)]``:
    sample -> example (``"all"`` only).
    """

    def __init__(self, keep: str, n: int, attacks: Sequence[str], eps: Sequence[float],
                 fingerprint: Mapping[str, Any] | None = None):
        self.keep, self.n = keep, n
        self.attacks, self.eps = list(attacks), [float(e) for e in eps]
        self.fingerprint = dict(fingerprint or {})
        self.worst: dict[int, Tensor] = {}
        self.source: dict[int, Tensor] = {}
        self.covered: dict[tuple[int, int], Tensor] = {}
        self.per_attack: dict[tuple[int, int], dict[int, Tensor]] = {}
        self._saved = time.monotonic()

    # ------------------------------------------------------------ indices
    def _a(self, attack: str) -> int:
        if attack not in self.attacks:
            self.attacks.append(attack)
        return self.attacks.index(attack)

    def _e(self, eps: float) -> int:
        if float(eps) not in self.eps:
            self.eps.append(float(eps))
        return self.eps.index(float(eps))

    def _cov(self, a: int, e: int) -> Tensor:
        if (a, e) not in self.covered:
            self.covered[(a, e)] = torch.zeros(self.n, dtype=torch.bool)
        return self.covered[(a, e)]

    # ------------------------------------------------------------ recording
    def covers(self, start: int, count: int, keys: Sequence[tuple[str, float]]) -> bool:
        """Whether samples ``start .. start+count-1`` have their examples for every key."""
        return all(bool(self._cov(self._a(a), self._e(e))[start:start + count].all())
                   for a, e in keys)

    def clean(self, start: int, x: Tensor, eps: Sequence[float]) -> None:
        """Fill the worst-case slots of a batch that hold no example with the clean inputs."""
        x = x.detach().to("cpu")
        for value in eps:
            e = self._e(value)
            if e not in self.worst:
                self.worst[e] = torch.zeros((self.n, *x.shape[1:]), dtype=x.dtype)
                self.source[e] = torch.full((self.n,), -1, dtype=torch.long)
            rows = slice(start, start + len(x))
            empty = (self.source[e][rows] == -1).view(-1, *[1] * (x.dim() - 1))
            self.worst[e][rows] = torch.where(empty, x, self.worst[e][rows])

    def record(self, attack: str, eps: float, samples: Sequence[int],
               examples: Mapping[int, Tensor]) -> None:
        """The outcome of ``attack`` at ``eps`` on ``samples``: ``examples`` (sample -> verified
        adversarial example) for the broken ones; the others are covered with no example."""
        a, e = self._a(attack), self._e(eps)
        for s, x_adv in examples.items():
            x_adv = x_adv.detach().to("cpu")
            if self.keep == "all":
                self.per_attack.setdefault((a, e), {})[s] = x_adv.clone()
            src = int(self.source[e][s])
            if src == -1 or a < src:
                self.worst[e][s] = x_adv
                self.source[e][s] = a
        self._cov(a, e)[list(samples)] = True

    # ------------------------------------------------------------ reading
    def _missing(self, attacks: Sequence[int], e: int, samples: Sequence[int]) -> list[int]:
        return [s for s in samples if not all(bool(self._cov(a, e)[s]) for a in attacks)]

    def worst_case(self, eps: float, samples: Sequence[int]) -> tuple[Tensor, Tensor]:
        """(N, ...) worst-case examples and (N,) source attack index at ``eps``."""
        e = self._index_eps(eps)
        attacks = [self.attacks.index(a) for a in self.attacks if not a.startswith("certify:")]
        missing = self._missing(attacks, e, samples)
        if missing or e not in self.worst:
            raise ValueError(
                f"the adversarial examples of samples {missing[:5]} at eps {eps:g} were not kept "
                "(the run was interrupted before they were saved); resume the run with "
                "keep_adversarial= (CLI --save-adversarial) to regenerate them")
        return self.worst[e].clone(), self.source[e].clone()

    def of_attack(self, attack: str, eps: float) -> tuple[Tensor, Tensor]:
        """(K,) sample indices and (K, ...) examples of ``attack`` at ``eps``, sorted by sample."""
        if self.keep != "all":
            raise ValueError(
                f"only the worst-case examples were kept (keep_adversarial={self.keep!r}); pass "
                "keep_adversarial='all' (CLI --save-adversarial all) to keep every attack's, or "
                "call adversarial_examples(attack=None, eps=...)")
        if attack not in self.attacks:
            raise ValueError(f"no adversarial examples of attack {attack!r}; kept: {self.attacks}")
        a, e = self.attacks.index(attack), self._index_eps(eps)
        missing = self._missing([a], e, range(self.n))
        if missing:
            raise ValueError(
                f"the examples of {attack} at eps {eps:g} for samples {missing[:5]} were not "
                "kept (interrupted run); resume it with keep_adversarial='all' to regenerate them")
        kept = self.per_attack.get((a, e), {})
        idx = sorted(kept)
        x = torch.stack([kept[s] for s in idx]) if idx else self.worst[e][:0].clone()
        return torch.tensor(idx, dtype=torch.long), x

    def _index_eps(self, eps: float) -> int:
        if float(eps) not in self.eps:
            raise ValueError(f"no adversarial examples at eps {eps!r}; kept eps: {self.eps}")
        return self.eps.index(float(eps))

    # ------------------------------------------------------------ files
    def save(self, path: str, *, force: bool = True) -> None:
        """Write the examples file atomically (``force=False``: only if :data:`SAVE_EVERY`
        seconds passed since the last save)."""
        if not force and time.monotonic() - self._saved < SAVE_EVERY:
            return
        import safetensors.torch

        tensors: dict[str, Tensor] = {}
        for e, x in self.worst.items():
            tensors[f"worst/e{e}/x"] = x.contiguous()
            tensors[f"worst/e{e}/source"] = self.source[e]
        for (a, e), cov in self.covered.items():
            tensors[f"covered/a{a}/e{e}"] = cov.to(torch.uint8)
        for (a, e), kept in self.per_attack.items():
            idx = sorted(kept)
            if idx:
                tensors[f"all/a{a}/e{e}/indices"] = torch.tensor(idx, dtype=torch.long)
                tensors[f"all/a{a}/e{e}/x"] = torch.stack([kept[s] for s in idx])
        meta = {"format": FORMAT, "version": "1", "keep": self.keep, "n": str(self.n),
                "attacks": json.dumps(self.attacks), "eps": json.dumps(self.eps),
                "fingerprint": json.dumps(self.fingerprint, sort_keys=True)}
        path = _files.check_target(path, "adversarial", what="adversarial examples file")
        _files.atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, meta))
        self._saved = time.monotonic()

    @classmethod
    def load(cls, path: str, fingerprint: Mapping[str, Any] | None = None,
             keep: str | None = None) -> AdversarialStore:
        """Read an examples file; ``fingerprint`` (if given) must match the one it records.
        ``keep="all"`` on a ``"worst"`` file drops its coverage (the per-attack examples were
        not kept, so every batch is attacked again to regenerate them)."""
        import safetensors.torch

        _files.check_target(path, "adversarial", what="adversarial examples file")
        try:
            with safetensors.torch.safe_open(path, "pt") as f:
                meta = f.metadata() or {}
            tensors = safetensors.torch.load_file(path)
        except Exception as exc:
            raise ValueError(f"{path!r} is not a readable adversarial examples file ({exc}); "
                             "remove it (a resumed run regenerates the examples)") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{path!r} is a safetensors file but not relucap adversarial "
                             "examples (no format metadata); move it away or remove it")
        stored = json.loads(meta["fingerprint"])
        diff = differences(stored, fingerprint) if fingerprint is not None else []
        if diff:
            raise ValueError(
                f"{path!r} holds the adversarial examples of a different evaluation (what "
                f"differs: {'; '.join(diff)}); remove it, pass resume=False, or write to "
                "another out= path")
        store = cls(keep or meta["keep"], int(meta["n"]), json.loads(meta["attacks"]),
                    json.loads(meta["eps"]), stored)
        for name, t in tensors.items():
            part = name.split("/")
            if part[0] == "worst":
                e = int(part[1][1:])
                (store.worst if part[2] == "x" else store.source)[e] = t
            elif part[0] == "covered":
                store.covered[(int(part[1][1:]), int(part[2][1:]))] = t.bool()
        if store.keep == "all" and meta["keep"] != "all":
            warnings.warn(
                f"{path!r} kept only the worst-case examples; keep_adversarial='all' runs the "
                "attacks again with their own seeds to regenerate every attack's examples",
                RuntimeWarning, stacklevel=4)
            store.covered.clear()
        elif store.keep == "all":
            for name, idx in tensors.items():
                part = name.split("/")
                if part[0] == "all" and part[3] == "indices":
                    x = tensors[f"all/{part[1]}/{part[2]}/x"]
                    store.per_attack[(int(part[1][1:]), int(part[2][1:]))] = dict(
                        zip(idx.tolist(), x.unbind(0)))
        return store


def open_store(keep: str | None, results_path: str | None, resume: bool, n: int,
               metadata: Mapping[str, Any], has_rows: bool) -> AdversarialStore | None:
    """The store of a run: loaded from the examples file next to ``results_path`` when resuming,
    else new; ``resume=False`` removes an old examples file even when keeping none (it would
    describe rows that are gone)."""
    path = None if results_path is None else sidecar_path(results_path)
    if path is not None and not resume and os.path.exists(path):
        _files.check_target(path, "adversarial", what="adversarial examples file")
        os.unlink(path)
    if keep is None:
        return None
    attacks, eps = metadata["attacks"], metadata["threat_model"]["eps"]
    fingerprint = metadata.get("fingerprint")
    if path is None:
        return AdversarialStore(keep, n, attacks, eps, fingerprint)
    if os.path.exists(path):
        store = AdversarialStore.load(path, fingerprint, keep)
        for a in attacks:
            store._a(a)
        for e in eps:
            store._e(e)
        store.fingerprint = dict(fingerprint or {})
        return store
    if resume and has_rows:
        warnings.warn(
            f"{results_path} holds rows but no adversarial examples file {path!r} (the run kept "
            "none, or was killed before saving them): the attacks are run again on those batches "
            "with their own seeds to regenerate the examples, and every verdict is checked "
            "against the stored row", RuntimeWarning, stacklevel=3)
    return AdversarialStore(keep, n, attacks, eps, fingerprint)
