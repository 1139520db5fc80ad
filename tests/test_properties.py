"""Property tests (hypothesis) over random tiny models, caps, budgets and attack configurations.

Invariants: nothing raises but the documented errors; every attack output is inside the eps-ball
and the bounds; in evaluate() no row counts as robust with a perturbation over budget, a row is
``ok`` exactly when :func:`verify` accepts its example, and aggregates are consistent. Example
counts (at least 500 in total) are set per test with ``max_examples``.
"""

import math
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from relucap_plugin.activations import CappedReLU
from relucap_plugin.attacks import get_attack, make_attack, perturbation_norm
from relucap_plugin.evaluation import evaluate, norm_tolerance
from relucap_plugin.threat import EvalConfig, ThreatModel

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: the configuration errors an attack documents (class count for DLR, targeted support)
DOCUMENTED = re.compile(r"needs a model with at least \d classes|has no targeted mode|supports loss")


@st.composite
def models(draw):
    """(model, input shape, classes): Flatten -> Linear/activation layers -> Linear, seeded."""
    side = draw(st.integers(2, 4))
    classes = draw(st.integers(2, 4))
    widths = draw(st.lists(st.integers(2, 8), min_size=1, max_size=2))
    caps = [draw(st.one_of(st.just(math.inf), st.floats(0.01, 10.0))) for _ in widths]
    seed = draw(st.integers(0, 2**16))
    layers, n = [nn.Flatten()], side * side
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        for w, cap in zip(widths, caps):
            layers += [nn.Linear(n, w), CappedReLU(cap)]
            n = w
        layers.append(nn.Linear(n, classes))
        model = nn.Sequential(*layers).eval()
    return model, (1, side, side), classes


@st.composite
def threat_models(draw):
    norm = draw(st.sampled_from(["Linf", "L2"]))
    lo = draw(st.sampled_from([0.0, -1.0]))
    hi = 1.0
    eps_max = (hi - lo) if norm == "Linf" else 3.0
    eps = draw(st.lists(st.floats(0.0, eps_max), min_size=1, max_size=2, unique=True))
    return ThreatModel(
        norm, eps=tuple(eps), bounds=(lo, hi), steps=draw(st.integers(1, 3)),
        restarts=draw(st.integers(1, 2)), random_start=draw(st.booleans()),
        targeted=draw(st.booleans()), loss=draw(st.sampled_from(["ce", "margin", "dlr"])),
        step_size=draw(st.one_of(st.none(), st.floats(1e-3, 1.0))),
    )


def inputs(shape, n, bounds, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(n, *shape, generator=g)


@settings(max_examples=250, **SETTINGS)
@given(models(), threat_models(), st.sampled_from(["torch:PGD", "torch:FGSM"]), st.integers(1, 6),
       st.integers(0, 2**16))
def test_attack_outputs_stay_in_the_ball_and_bounds(net, tm, spec, n, seed):
    model, shape, classes = net
    x = inputs(shape, n, tm.bounds, seed)
    try:
        attack = get_attack(spec, tm)
        outs = [(eps, attack(model, x, eps=eps, seed=seed)) for eps in tm.eps]
    except ValueError as exc:
        assert DOCUMENTED.search(str(exc)), exc
        return
    for eps, x_adv in outs:
        assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and bool(torch.isfinite(x_adv).all())
        assert float(x_adv.min()) >= tm.bounds[0] and float(x_adv.max()) <= tm.bounds[1]
        norms = perturbation_norm(x, x_adv, tm.norm)
        assert float(norms.max()) <= norm_tolerance(eps, tm, x)


@settings(max_examples=150, **SETTINGS)
@given(models(), threat_models(), st.floats(0.0, 2.5), st.sampled_from(["sign", "gauss", "none"]),
       st.integers(1, 12), st.integers(1, 5), st.integers(0, 2**16))
def test_evaluate_never_counts_an_over_budget_example_as_robust(net, tm, scale, kind, n, batch, seed):
    """A user attack returns a perturbation of ``scale`` times the budget (often over it)."""
    model, shape, classes = net
    tm = tm.replace(targeted=False, loss="ce")
    x = inputs(shape, n, tm.bounds, seed)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::3] = (y[::3] + 1) % classes

    def scaled(model, x, y, eps):
        g = torch.Generator().manual_seed(seed)
        d = torch.randn(x.shape, generator=g) if kind == "gauss" else torch.randn(x.shape, generator=g).sign()
        if kind == "none":
            d = torch.zeros_like(x)
        norm = perturbation_norm(torch.zeros_like(d), d, tm.norm).clamp_min(1e-12)
        d = d * (scale * eps / norm).view(-1, *[1] * (x.dim() - 1))
        return x + d  # not clipped: may leave the bounds too

    res = evaluate(model, (x, y), [make_attack(scaled, name="scaled"), "torch:FGSM"], tm,
                   EvalConfig(batch_size=batch, seed=seed), progress=False)
    assert len(res) == n * 2 * len(tm.eps) and not res.failed() and not res.missing()
    for r in res.rows:
        tol = norm_tolerance(r["eps"], tm, x)
        if r["adv_correct"]:
            assert r["status"] == "ok" and r["clean_correct"] and r["norm"] is not None
            assert r["norm"] <= tol
        if r["status"] == "ok" and not r["skipped"]:
            assert r["norm"] <= tol
        if r["status"] == "violation":
            assert r["adv_correct"] is False and r["reason"]
        if r["norm"] is not None and r["norm"] > tol:
            assert r["status"] == "violation"
    for eps in res.eps:
        accs = [res.robust_accuracy(a, eps) for a in res.attacks]
        assert all(a <= res.clean_accuracy() for a in accs)
        assert res.worst_case(eps) <= min(accs)


@settings(max_examples=100, **SETTINGS)
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 3), st.text(max_size=3),
                 st.none(), st.booleans(), st.lists(st.floats(-2, 2), min_size=0, max_size=3)),
       st.integers(1, 3))
def test_caps_are_valid_or_a_documented_error(cap, channels):
    try:
        act = CappedReLU(cap)
    except (ValueError, TypeError) as exc:
        assert "math.inf" in str(exc) or "cap" in str(exc)
        return
    if isinstance(cap, list):
        if len(cap) != channels:
            with pytest.raises(ValueError, match="per-channel entries but the input has shape"):
                act(torch.randn(4, channels))
            return
        limit = torch.tensor(cap)
    else:
        limit = torch.tensor(float(cap))
    z = torch.randn(64, channels) * 10
    out = act(z)
    assert bool((out >= 0).all()) and bool((out <= limit).all())
    half = act(z.half())  # a cap beyond float16's range must not overflow
    assert half.dtype == torch.float16 and bool(torch.isfinite(half).all())


@settings(max_examples=100, **SETTINGS)
@given(st.sampled_from(["Linf", "L2", "l1", "inf", 2, 3]), st.one_of(st.floats(allow_nan=True), st.integers(-1, 3)),
       st.tuples(st.floats(-2, 2), st.floats(-2, 2)), st.integers(-1, 3))
def test_threat_models_are_valid_or_a_documented_error(norm, eps, bounds, steps):
    try:
        tm = ThreatModel(norm, eps=eps, bounds=bounds, steps=steps)
    except (ValueError, TypeError) as exc:
        assert re.search(r"must be|exceeds|must hold", str(exc)), exc
        return
    lo, hi = tm.bounds
    assert lo < hi and tm.steps >= 1 and all(e >= 0 and math.isfinite(e) for e in tm.eps)
    if tm.norm == "Linf":
        assert max(tm.eps) <= hi - lo
