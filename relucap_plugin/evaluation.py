"""Run attacks from any library on a model and check every adversarial example it gets back.

:func:`evaluate` attacks each batch with each attack at each budget, re-verifies the examples
(norm within the budget, inside the bounds, finite; prediction recomputed with its own forward
pass) and returns a :class:`~relucap_plugin.results.Results` table, one row per
(sample, attack, eps). With ``out=`` the rows stream to a JSONL file as they are computed, so an
interrupted run resumes where it stopped.
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
import os
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .distributed import process_context
from ._console import progress as _progress
from .adapters import native_library, native_notes, read_native
from ._runner import Runner
from ._torch import caller_state, float_dtype
from .attacks import Attack, get_attack, make_attack, perturbation_norm
from .cascade import CascadeBatch, cascade_order, check_schedule, check_unconditional
from ._fingerprint import DataDigest, model_digest, run_fingerprint
from .data import DataLike, as_dataset, as_loader, check_complete_loader
from .results import Results
from .adversarial import check_keep, open_store, sidecar_path
from .threat import EvalConfig, ThreatModel, as_eval_config

__all__ = ["RTOL", "AttackFailedError", "evaluate", "norm_tolerance", "verify"]

#: Relative slack on the budget: an example passes if ``norm <= eps * (1 + RTOL) + atol``.
RTOL = 1e-5

AttackLike = str | Attack | Callable[..., Tensor]
OutputSelector = int | str | Callable[[Any], Tensor]


# ------------------------------------------------------------------------------ verification
def norm_tolerance(eps: float, threat_model: ThreatModel, x: Tensor) -> float:
    """Largest norm accepted at budget ``eps`` for inputs like ``x`` (N, ...).

    ``eps * RTOL`` plus the rounding of one step of the input's dtype at the bounds' scale
    (``finfo(dtype).eps * max(1, |low|, |high|)``), times ``sqrt(d)`` for L2 over ``d`` values
    per sample: float32 pixels in [0, 1] can round ``x + delta`` by that much.
    """
    lo, hi = threat_model.bounds
    atol = torch.finfo(x.dtype).eps * max(1.0, abs(lo), abs(hi))
    if threat_model.norm == "L2":
        atol *= math.sqrt(x[0].numel())
    return float(eps) * (1.0 + RTOL) + atol


def verify(
    x: Tensor, x_adv: Tensor, eps: float, threat_model: ThreatModel
) -> tuple[Tensor, list[str | None]]:
    """Check adversarial examples ``x_adv`` against clean ``x`` (both (N, ...)).

    Returns the per-sample perturbation norm in the threat model's norm (computed in the
    inputs' dtype, returned as float64; NaN where ``x_adv`` is not finite) and per sample
    ``None`` (valid) or the reasons it is not: norm over :func:`norm_tolerance`, values outside
    the bounds (beyond ``finfo(dtype).eps`` of slack), non-finite values.
    """
    lo, hi = threat_model.bounds
    norms = perturbation_norm(x.detach(), x_adv.detach(), threat_model.norm).double()
    finite = torch.isfinite(norms)  # NaN and inf propagate into the norm
    norms = norms.masked_fill(~finite, math.nan)
    tol = norm_tolerance(eps, threat_model, x)
    slack = torch.finfo(x.dtype).eps * max(1.0, abs(lo), abs(hi))
    mins, maxs = torch.aminmax(x_adv.detach().flatten(1), dim=1)
    over = norms > tol
    outside = finite & ((mins < lo - slack) | (maxs > hi + slack))
    reasons: list[str | None] = [None] * len(x)
    for i in (~finite | over | outside).nonzero().flatten().tolist():
        why = []
        if not bool(finite[i]):
            why.append("non-finite values (NaN/inf)")
        elif bool(over[i]):
            why.append(
                f"{threat_model.norm} norm {float(norms[i]):.6g} > eps {eps:g} "
                f"(tolerance {tol - eps:.2g})"
            )
        if bool(outside[i]):
            why.append(
                f"outside bounds [{lo:g}, {hi:g}] (min {float(mins[i]):.4g}, "
                f"max {float(maxs[i]):.4g})"
            )
        reasons[i] = "; ".join(why)
    return norms, reasons


# ------------------------------------------------------------------------------ inputs
class _SelectOutput(nn.Module):
    """Wraps a model whose forward returns a tuple/dict so that it returns the logits."""

    def __init__(self, model: nn.Module, output: OutputSelector):
        super().__init__()
        self.model = model
        self.output = output

    def forward(self, x: Tensor) -> Tensor:
        out = self.model(x)
        try:
            return self.output(out) if callable(self.output) else out[self.output]
        except (IndexError, KeyError, TypeError) as exc:
            raise TypeError(
                f"output={self.output!r} cannot select the logits from the model's "
                f"{type(out).__name__} output ({exc}); pass an index, a key or a function "
                "that returns the (N, classes) logits"
            ) from None


def _as_threat_model(threat_model: ThreatModel | Mapping[str, Any]) -> ThreatModel:
    if isinstance(threat_model, ThreatModel):
        return threat_model
    if isinstance(threat_model, Mapping):
        return ThreatModel.from_dict(dict(threat_model))
    raise TypeError(
        f"threat_model must be a ThreatModel (or its to_dict()), got "
        f"{type(threat_model).__name__} {threat_model!r:.80}; e.g. ThreatModel('Linf', eps=(0.1, 0.3))"
    )


def _as_attacks(
    attacks: AttackLike | Sequence[AttackLike], tm: ThreatModel, cfg: EvalConfig
) -> list[Attack]:
    if isinstance(attacks, (str, Attack)) or callable(attacks) or native_library(attacks):
        attacks = [attacks]
    if not isinstance(attacks, Sequence) or not attacks:
        raise ValueError(
            "attacks must be a non-empty list of specs ('torchattacks:PGD'), Attack "
            f"objects or functions fn(model, x, y, eps) -> x_adv; got {type(attacks).__name__} {attacks!r:.80}"
        )
    out = []
    for a in attacks:
        if isinstance(a, str):
            out.append(get_attack(a, tm, batch_size=cfg.batch_size))
        elif isinstance(a, Attack):
            out.append(get_attack(a, tm))
        elif native_library(a):
            out.append(read_native(a, tm, batch_size=cfg.batch_size))
        elif callable(a):
            out.append(make_attack(a, threat_model=tm))
        else:
            raise TypeError(
                f"cannot use {a!r} as an attack: pass a spec string, an Attack or a function "
                "fn(model, x, y, eps) -> x_adv, or a configured torchattacks/ART/Foolbox attack object"
            )
    specs = [a.spec for a in out]
    dupes = sorted({s for s in specs if specs.count(s) > 1})
    if dupes:
        raise ValueError(
            f"attack(s) {dupes} given twice; each attack is a column of the results, "
            "so give them distinct names (make_attack(fn, name=...)) or overrides"
        )
    return out


def _expected_samples(data: DataLike, cfg: EvalConfig) -> int | None:
    """How many samples the run covers, if the data says so without being iterated."""
    try:
        if isinstance(data, torch.utils.data.DataLoader):
            n = len(data.sampler) if data.batch_size is not None else None
        else:
            n = len(as_dataset(data))
    except TypeError:
        n = None
    if n is None:
        return cfg.n_samples
    return n if cfg.n_samples is None else min(n, cfg.n_samples)


def _versions(attacks: Sequence[Attack]) -> dict[str, str]:
    from . import __version__
    from .adapters import LIBRARIES

    out = {"relucap-plugin": __version__, "torch": torch.__version__}
    for lib in sorted({a.library for a in attacks}):
        info = LIBRARIES.get(lib)
        if info is not None and info.distribution:
            try:
                out[info.distribution] = importlib.metadata.version(info.distribution)
            except importlib.metadata.PackageNotFoundError:
                pass
    return out


# ------------------------------------------------------------------------------ identity
def evaluate(
    model: nn.Module,
    data: DataLike,
    attacks: AttackLike | Sequence[AttackLike],
    threat_model: ThreatModel | Mapping[str, Any],
    config: EvalConfig | Mapping[str, Any] | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = True,
    output: OutputSelector | None = None,
    progress: bool = True,
    model_name: str | None = None,
    notes: Sequence[str] = (),
    keep_adversarial: str | None = None,
    schedule: str = "full",
    unconditional: Sequence[str] = (),
) -> Results:
    """Attack ``model`` on ``data`` with every attack at every budget of ``threat_model``.

    ``data``: an ``(x, y)`` pair, a ``Dataset`` or any ``DataLoader`` (kept as given; a sample's
    index is its position in iteration order). ``attacks``: spec strings (``"art:PGD"``),
    :class:`~relucap_plugin.attacks.Attack` objects, configured attack objects of the libraries
    (a torchattacks ``Attack``, an ART ``EvasionAttack``, a Foolbox ``Attack`` or
    ``(foolbox_attack, epsilons)``: their budget must match ``threat_model``, their other settings
    are read into the attack's threat model and named on stderr) or functions
    ``fn(model, x, y, eps)``. An attack that fails on every sample it attacks raises
    :class:`AttackFailedError` at the end (its rows are kept).
    ``config``: batch size, device (``"auto"``), seed, ``n_samples`` (the first N).
    ``output``: index, key or function selecting the logits of a model returning a tuple/dict.

    Each batch is predicted once clean; samples misclassified clean are not attacked (their rows
    say ``skipped`` and count as not robust). Every returned example is verified by
    :func:`verify` and predicted again by the harness (eval mode, ``no_grad``): a violation is
    recorded and never counts as robust; an attack that raises gives ``"failed"`` rows with its
    error and the run goes on. Each attack call is seeded from (seed, attack, eps, first sample
    of the batch), so the same seed, data order and batch size give the same table.

    ``out``: a JSONL file (or a folder, for ``folder/results.jsonl``) the rows are appended to
    as they are computed. With ``resume=True`` the rows already there are kept and only missing
    or failed (sample, attack, eps) rows are computed, re-running the whole batch of a missing
    row so that the result equals an uninterrupted run; ``resume=False`` starts the file over.
    The model's modes, device, ``requires_grad`` flags and torch's global RNG are restored.

    Under ``torchrun`` (or in an initialised process group of several ranks) each rank evaluates
    every ``world_size``-th batch with the same seeds, so the rows equal a single-process run's;
    with ``out=`` each rank streams to its shard ``results.rankR-of-W.jsonl`` next to ``out`` and
    resumes from it. Rank 0 returns the merged table (and writes it to ``out``), the other ranks
    the rows of their own batches; only rank 0 shows progress (see :mod:`.distributed`).

    Black-box attacks search on the input's real layout: ``config.input_shape``, else the data's
    (see :func:`~relucap_plugin.adaptive.black_box_layout`). ``notes`` (and a note when a
    black-box attack could only run on a flat layout) go to ``results.metadata["notes"]``.

    ``keep_adversarial``: ``"worst"`` keeps the worst-case example per sample and eps,
    ``"all"`` also every attack's verified examples (see :mod:`.adversarial` for the memory
    cost, the file next to ``out=`` and how a resumed run regenerates missing ones); read them
    with :meth:`~relucap_plugin.results.Results.adversarial_examples` and
    :meth:`~relucap_plugin.results.Results.worst_case_examples`.

    ``schedule``: ``"full"`` runs every attack on every sample (exact per-attack and agreement
    tables); ``"cascade"`` runs the attacks cheapest first, each at an eps only on the samples
    still robust there, budgets in increasing order with verified examples reused at larger eps
    (see :mod:`.cascade`): the same per-sample worst case or a lower one (up to the random draws
    of library attacks that draw for the whole call; ours draw per sample), at a fraction of the cost; its per-attack numbers are conditional and rows it did not need say ``not_needed``.
    ``"audit"``: the cascade, but BPDA, transfer and black-box attacks each run on all the
    survivors of the white-box attacks (what :func:`~relucap_plugin.diagnostics.audit` compares).
    ``unconditional``: specs of attacks that run on every sample under a cascade too (their
    per-attack and agreement numbers stay exact), besides the first.
    """
    from .adaptive import attack_kind, black_box_layout, first_inputs

    if not isinstance(model, nn.Module):
        raise TypeError(f"evaluate: model must be a torch.nn.Module, got {type(model).__name__} {repr(model)[:80]}")
    if isinstance(data, Tensor) and isinstance(attacks, Tensor):
        raise TypeError(
            "evaluate takes the data as one argument: evaluate(model, (x, y), attacks, threat_model, "
            "...), not evaluate(model, x, y, ...)"
        )
    if output is not None and not isinstance(output, (int, str)) and not callable(output):
        raise TypeError(f"output must be an int index, a str key or a function, got {output!r}")
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be True or False, got {resume!r}")
    if isinstance(notes, str) or not isinstance(notes, Sequence) or not all(isinstance(n, str) for n in notes):
        raise TypeError(f"notes must be a list of strings, got {repr(notes)[:80]}; e.g. notes=['retrained']")
    if model_name is not None and not isinstance(model_name, str):
        raise TypeError(f"model_name must be a string or None, got {type(model_name).__name__} {model_name!r:.80}")
    tm = _as_threat_model(threat_model)
    cfg = as_eval_config(config)
    check_keep(keep_adversarial)
    cascade = check_schedule(schedule) != "full"
    ctx = process_context(cfg.device)
    ctx.check_options(keep_adversarial)
    device = ctx.device
    net = model if output is None else _SelectOutput(model, output)
    attack_list = _as_attacks(attacks, tm, cfg)
    first = first_inputs(data, 1)
    attack_list, layout_notes = black_box_layout(
        attack_list, cfg.input_shape, None if first is None else tuple(first.shape[1:]))
    if progress and ctx.rank == 0:
        for line in native_notes(attack_list):
            print(line, file=sys.stderr)
    def kind(attack: Attack) -> str:
        return attack_kind(attack.spec, attack.family)

    unconditional = check_unconditional(unconditional, [a.spec for a in attack_list], schedule)
    if cascade:
        attack_list = cascade_order(attack_list, kind, unconditional, schedule)
    for attack in attack_list:
        attack.check_dtype(float_dtype(net, torch.float32))
    check_complete_loader(data, "evaluate")
    loader = as_loader(data, batch_size=cfg.batch_size)
    if _expected_samples(data, cfg) == 0:
        raise ValueError("the data set is empty; pass at least one (x, y) sample")
    with torch.random.fork_rng(devices=[]):
        # another random stream than the run's, so a loader that draws from torch's RNG
        # (shuffle=True, random transforms) shows up as data that changed between passes
        torch.random.default_generator.manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)
        data_digest = ctx.data_digest(loader, cfg.n_samples)
    n_expected = data_digest.n
    if n_expected == 0:
        raise ValueError("the data set is empty; pass at least one (x, y) sample")
    versions = _versions(attack_list)
    metadata = {
        "model": model_name or type(model).__name__,
        "threat_model": tm.to_dict(),
        "config": cfg.to_dict(),
        "device": str(device),
        "attacks": [a.spec for a in attack_list],
        "n_samples": n_expected,
        "versions": versions,
        "package_version": versions["relucap-plugin"],
        "rtol": RTOL,
        "fingerprint": run_fingerprint(model, data_digest, tm, cfg, attack_list, net),
    }
    if cascade:
        metadata["schedule"] = metadata["fingerprint"]["schedule"] = schedule
        if unconditional:
            metadata["unconditional"] = metadata["fingerprint"]["unconditional"] = unconditional
    if [*notes, *layout_notes]:
        metadata["notes"] = [*notes, *layout_notes]
    metadata.update(ctx.metadata())
    ctx.check_same(model, metadata)
    writer = None
    if out is not None:
        path = os.fspath(out)
        if os.path.isdir(path):
            path = os.path.join(path, "results.jsonl")
        results, writer = ctx.open_shard(path, metadata, resume)
    else:
        results = Results(metadata=metadata)
    try:
        store = open_store(keep_adversarial, None if out is None else path, resume, n_expected,
                           results.metadata, len(results) > 0)
    except BaseException:
        if writer is not None:
            writer.close()
        raise
    store_path = None if out is None or store is None else sidecar_path(path)

    bs = loader.batch_size if isinstance(data, torch.utils.data.DataLoader) else cfg.batch_size
    n_batches = None if n_expected is None or bs is None else math.ceil(n_expected / bs)
    if n_batches is not None:
        n_batches = ctx.share(n_batches)
    units_per_batch = len(tm.eps) if cascade else len(attack_list) * len(tm.eps)
    total = None if n_batches is None else n_batches * units_per_batch
    keys = [(a.spec, e) for a in attack_list for e in tm.eps]
    try:
        cuda = (
            [torch.cuda.current_device() if device.index is None else device.index]
            if device.type == "cuda"
            else []
        )
        with caller_state(net), torch.random.fork_rng(devices=cuda):
            net.to(device)
            runner = Runner(net, tm, cfg, device, results, writer, verify)
            runner.params = model_digest(net)
            runner.store = store

            def units() -> Iterator[Callable[[], None] | None]:
                for start, x, y in ctx.batches(loader, cfg.n_samples):
                    if DataDigest.batch(x, y) != data_digest.batches.get(start):
                        raise ValueError(
                            f"the data changed between two passes over it (the batch from "
                            f"sample {start}): the loader reorders or alters samples (shuffle="
                            "True, random transforms); a run's rows are keyed by position, so "
                            "pass shuffle=False and deterministic transforms"
                        )
                    done = runner.complete(start, y, keys) and (
                        store is None or store.covers(start, len(y), keys))
                    batch = None if done else runner.prepare(start, x, y)
                    if cascade:
                        steps = None if batch is None else CascadeBatch(
                            runner, batch, attack_list, schedule, kind, verify, unconditional)
                        for eps in sorted(tm.eps):
                            yield None if steps is None else functools.partial(steps.run, eps)
                        continue
                    for attack in attack_list:
                        for eps in tm.eps:
                            yield None if batch is None else functools.partial(
                                runner.run, batch, attack, eps)

            description = f"{len(attack_list)} attack(s) x {len(tm.eps)} eps" + (
                f", {schedule}" if cascade else "")
            description += ctx.progress_note()
            for work in _progress(
                units(), description, total=total, enabled=progress and ctx.rank == 0
            ):
                if work is not None:
                    work()
                    if store_path is not None:
                        store.save(store_path, force=False)
    finally:
        try:
            if store_path is not None:
                store.save(store_path)
        finally:
            if writer is not None:
                writer.close()
    results._adversarial = store
    final = ctx.gather(results, None if out is None else path)
    _refuse_total_failure(final, None if out is None else path)
    return final


class AttackFailedError(RuntimeError):
    """Every attack failed on every sample it attacked: nothing was measured. ``results`` holds
    the rows (also in ``out=``); one failing attack among working ones only warns."""

    def __init__(self, message: str, results: Results) -> None:
        super().__init__(message)
        self.results = results


def _refuse_total_failure(results: Results, path: str | None) -> None:
    rows = [r for r in results if not r["skipped"]]
    if rows and all(r["status"] == "failed" for r in rows):
        raise AttackFailedError(
            f"every attack failed on all {len(rows)} attacked rows, e.g. {rows[0]['attack']}: "
            f"{rows[0]['reason']}; fix the attack (configured torchattacks/ART/Foolbox objects are "
            "read directly, a function must take (model, x, y, eps)); the rows are in the "
            "exception's .results" + (f" and in {path}" if path else ""), results)
