"""``certify``: per-sample certified margins at every budget of a threat model, as Results rows.

A sample is certified at eps when a lower bound of ``logit_y - logit_j`` over the whole input
set (the Linf or L2 ball of radius eps around it, intersected with the input bounds) is positive
for every other class j: no input in the set, adversarial or not, changes its prediction. Its
rows go into :class:`~relucap_plugin.results.Results` next to attack rows, so one table
brackets the truth: certified <= robust accuracy <= worst case over attacks.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._console import progress as _progress
from .._torch import ONE_OUTPUT, caller_state, check_inputs, model_device
from .._fingerprint import DataDigest, json_digest, run_fingerprint
from ..data import DataLike, as_loader, check_complete_loader, check_labels, unpack_batch
from ..results import CERTIFY_LIBRARY, Results
from ..surgery.verify import first_output
from ..threat import EvalConfig, ThreatModel, as_eval_config
from .bounds import Ball, Bounds, margin_spec
from .graph import BoundGraph, UnsupportedOpError, compile_model

__all__ = ["METHODS", "ROUNDING_UNITS", "certified_margins", "certify", "interval_widths",
           "margin_tolerance"]

METHODS = ("ibp", "crown", "best")
"""``ibp``: interval bounds (cheap, loose unless the model was trained for it). ``crown``:
CROWN bounds (intermediate nodes tightened by CROWN where they have at most ``max_neurons``
units). ``best``: the larger of the two per sample (both are sound)."""


ROUNDING_UNITS = 64
"""A certificate needs a margin above this many units of roundoff at the logits' scale."""


def margin_tolerance(logits: Tensor) -> Tensor:
    """(B,) the smallest certified margin that counts as a certificate, from clean ``logits``
    (B, K): ``ROUNDING_UNITS * finfo(dtype).eps * (1 + max_k |logit_k|)``.

    The bounds are computed in the model's dtype without directed rounding, so a computed
    margin can exceed the exact bound by the accumulated rounding error; a margin within this
    tolerance of zero is reported (``margin``) but not counted as certified. Our own choice,
    not from the papers: about 8e-6 of the logits' scale in float32, above the error of the
    short sums of a typical network and far below any margin a trained model certifies with."""
    return ROUNDING_UNITS * torch.finfo(logits.dtype).eps * (1 + logits.detach().abs().amax(1))


#: Units of roundoff at the logits' scale by which the bound graph's forward may differ from the
#: model's (folded batch norm, pooling as a convolution); our own choice, ~1e-4 in float32.
REPRODUCE_UNITS = 1024


def check_reproduces(graph: BoundGraph, model: nn.Module, x: Tensor, logits: Tensor,
                     where: str) -> None:
    """Refuse (UnsupportedOpError) a graph whose forward on ``x`` (B, ...) differs from the
    model's ``logits`` (B, K) by more than :data:`REPRODUCE_UNITS` units of roundoff: the bounds
    would be bounds of another function. Catches whatever the trace cannot see (forward hooks,
    ops that are random in eval mode such as ``F.dropout(x, p)``, state a forward changes)."""
    out = graph.values(x)[-1]
    scale = 1 + logits.detach().abs().amax(1)
    diff = (out - logits).abs().amax(1)
    bad = (~(diff <= REPRODUCE_UNITS * torch.finfo(logits.dtype).eps * scale)).nonzero().flatten()
    if len(bad):
        k = int(bad[diff[bad].argmax()])
        raise UnsupportedOpError(
            f"{where}: the bound graph of {graph.model_name} does not reproduce the model's "
            f"logits on {len(bad)} of {len(x)} samples (largest difference {float(diff[k]):.3g} at "
            f"logits up to {float(scale[k]) - 1:.3g}): the model computes something its trace "
            "does not show (forward hooks, random ops in eval mode such as F.dropout(x, p) "
            "without training=self.training, state its forward changes), so its certificates "
            "would be another function's. Move hooks into forward, make the model deterministic "
            "in eval mode, or certify a model that computes its logits in forward")


def _check_method(method: object) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    return method  # type: ignore[return-value]


def margins_on_graph(graph: BoundGraph, x: Tensor, y: Tensor, eps: float | Tensor, norm: str,
                     bounds: tuple[float, float], method: str, max_neurons: int = 2048,
                     num_classes: int | None = None) -> Tensor:
    """Certified margin lower bounds (B,) of a compiled graph: min over j != y of the lower
    bound of ``logit_y - logit_j`` (``inf`` for a one-class model)."""
    k = num_classes or graph.ops[-1].shape[-1]
    spec = margin_spec(y, k, x.dtype)
    b = Bounds(graph, Ball(x, eps, norm, bounds), crown_intermediate=method != "ibp",
               max_neurons=max_neurons)
    if method == "ibp":
        m = b.ibp_margin(spec, y)
    elif method == "crown":
        m = b.crown_margin(spec)
    else:
        m = torch.maximum(b.ibp_margin(spec, y), b.crown_margin(spec))
    m = m.masked_fill(torch.nn.functional.one_hot(y, k).bool(), math.inf)
    return m.min(1).values


def _check_logits(graph: BoundGraph, model: nn.Module) -> None:
    if len(graph.ops[-1].shape) != 1:
        raise ValueError(
            f"certify needs a classifier returning logits (N, classes); "
            f"{type(model).__name__} returns per-sample shape {graph.ops[-1].shape}")
    if graph.ops[-1].shape[0] < 2:
        raise ValueError(f"certify: {ONE_OUTPUT.format(shape=('N', *graph.ops[-1].shape))}")


def certified_margins(model: nn.Module, x: Tensor, y: Tensor, eps: float, norm: str = "Linf",
                      bounds: tuple[float, float] = (0.0, 1.0), method: str = "best",
                      max_neurons: int = 2048) -> Tensor:
    """Certified margin lower bounds (B,) of ``model`` at ``(x, y)`` over the ``norm`` ball of
    radius ``eps`` intersected with ``bounds``; :func:`certify` counts a sample as certified when
    it exceeds :func:`margin_tolerance`. The model is bounded with eval-mode semantics (batch
    norm with its running statistics)."""
    _check_method(method)
    tm = ThreatModel(norm=norm, eps=eps, bounds=bounds)
    with caller_state(model), torch.no_grad():
        graph = compile_model(model, x[:1])
        _check_logits(graph, model)
        check_reproduces(graph, model, x, model(x), "certified_margins")
        return margins_on_graph(graph, x, y.long(), eps, tm.norm, tm.bounds, method, max_neurons)


def interval_widths(model: nn.Module, x: Tensor, eps: float | Tensor,
                    bounds: tuple[float, float] = (-math.inf, math.inf)) -> dict[str, tuple[str, float]]:
    """Module path -> (type, mean IBP interval width of its output) over the Linf ball of radius
    ``eps`` (a float or one per sample) around ``x`` (N, ...): the perturbation growth of a
    network as a bound. A capped unit's interval is never wider than its cap."""
    with caller_state(model), torch.no_grad():
        graph = compile_model(model, x[:1])
        b = Bounds(graph, Ball(x, eps, "Linf", bounds))
        modules = dict(model.named_modules())
        return {op.module: (type(modules[op.module]).__name__, float((hi - lo).mean()))
                for op, (lo, hi) in zip(graph.ops, b.bounds) if op.module is not None}


def _as_threat(threat_model: ThreatModel | Mapping[str, Any]) -> ThreatModel:
    if isinstance(threat_model, ThreatModel):
        return threat_model
    if isinstance(threat_model, Mapping):
        return ThreatModel.from_dict(dict(threat_model))
    raise TypeError(f"threat_model must be a ThreatModel or a dict, got {type(threat_model).__name__} {threat_model!r:.80}")


def certify(
    model: nn.Module,
    data: DataLike,
    threat_model: ThreatModel | Mapping[str, Any],
    method: str = "best",
    config: EvalConfig | Mapping[str, Any] | None = None,
    *,
    max_neurons: int = 2048,
    chunk: int = 32,
    progress: bool = True,
    model_name: str | None = None,
) -> Results:
    """Certify every sample of ``data`` at every eps of ``threat_model``; rows of the attack
    ``"certify:<method>"`` whose ``adv_correct`` says certified and ``margin`` holds the bound.

    ``method``: one of :data:`METHODS`. ``config`` (an :class:`EvalConfig`, as for
    :func:`~relucap_plugin.evaluation.evaluate`): ``batch_size`` and ``n_samples`` are used, and
    the run is recorded with it so that the table merges with an evaluation of the same settings
    (``evaluate(...).merge(certify(...))``). The bounds run on the model's device; CROWN
    works on ``chunk`` samples at a time (its memory grows with the widest bounded layer,
    ``max_neurons``). Models with an op that cannot be bounded raise
    :class:`~relucap_plugin.certification.UnsupportedOpError` naming the op.
    """
    _check_method(method)
    if not isinstance(model, nn.Module):
        raise TypeError(f"certify: model must be a torch.nn.Module, got {type(model).__name__} {repr(model)[:80]}")
    tm = _as_threat(threat_model)
    cfg = as_eval_config(config)
    for arg, value in (("max_neurons", max_neurons), ("chunk", chunk)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"certify: {arg} must be an int >= 1, got {value!r:.40}")
    if model_name is not None and not isinstance(model_name, str):
        raise TypeError(f"certify: model_name must be a string or None, got "
                        f"{type(model_name).__name__} {model_name!r:.40}")
    device = model_device(model)
    name = f"{CERTIFY_LIBRARY}:{method}"
    metadata = {
        "model": model_name or type(model).__name__,
        "threat_model": tm.to_dict(),
        "config": cfg.to_dict(),
        "device": str(device),
        "attacks": [name],
    }
    rows: list[dict[str, Any]] = []
    check_complete_loader(data, "certify", limit=cfg.n_samples)
    loader = as_loader(data, batch_size=cfg.batch_size)
    graph = None
    seen = 0
    digest = DataDigest()
    with caller_state(model), torch.no_grad(), contextlib.ExitStack() as scope:
        for batch in _progress(loader, f"certify ({method})", total=len(loader)
                               if hasattr(loader, "__len__") else None, enabled=progress):
            x, y = unpack_batch(batch)
            if cfg.n_samples is not None:
                x, y = x[: cfg.n_samples - seen], y[: cfg.n_samples - seen]
            if len(x) == 0:
                break
            x, y = torch.as_tensor(x), torch.as_tensor(y).reshape(-1)
            digest.update(seen, x, y)  # the exact inputs, as evaluate() hashes them
            where = f"certify: data samples {seen}..{seen + len(x) - 1}"
            check_inputs(x, tm.bounds, where)
            x, y = x.to(device), y.to(device).long()
            if graph is None:
                first_output("certify", model, x, "data (batch 0)")
                graph = compile_model(model, x[:1])
                _check_logits(graph, model)
                scope.enter_context(graph.reuse_abs_weights())
            logits = model(x)
            check_labels(y, logits.shape[-1], where)
            check_reproduces(graph, model, x, logits, where)
            pred, tol = logits.argmax(1), margin_tolerance(logits)
            for eps in tm.eps:
                start = time.perf_counter()
                margins = torch.cat([
                    margins_on_graph(graph, x[i:i + chunk], y[i:i + chunk], eps, tm.norm,
                                     tm.bounds, method, max_neurons)
                    for i in range(0, len(x), chunk)])
                per = (time.perf_counter() - start) / len(x)
                for k in range(len(x)):
                    correct = bool(pred[k] == y[k])
                    m = float(margins[k])
                    rows.append({
                        "sample": seen + k, "attack": name, "library": CERTIFY_LIBRARY,
                        "family": "certified", "eps": eps, "label": int(y[k]),
                        "clean_pred": int(pred[k]), "adv_pred": None, "clean_correct": correct,
                        "adv_correct": correct and m > float(tol[k]), "norm": None, "status": "ok",
                        "reason": None, "skipped": not correct, "time": per,
                        "margin": m if math.isfinite(m) else None,
                    })
            seen += len(x)
            if cfg.n_samples is not None and seen >= cfg.n_samples:
                break
    if seen == 0:
        raise ValueError("the data set is empty; pass at least one (x, y) sample")
    metadata["n_samples"] = seen
    # the same identity as an evaluate() run, so merging certified rows into the attack rows of
    # another model, other data or another threat model is refused instead of mixing the two
    metadata["fingerprint"] = {
        **run_fingerprint(model, digest, tm, cfg, ()),
        "attacks": {name: json_digest({"method": method, "max_neurons": max_neurons})},
    }
    return Results(rows, metadata)
