"""Soundness of the certify bounds: random nets of every supported op, every ball, checked
against random points, corners, PGD-found points and exact minima of tiny nets."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from relucap_plugin.activations import CappedReLU, LearnableCappedReLU
from relucap_plugin.certification import (
    Ball,
    Bounds,
    UnsupportedOpError,
    certified_margins,
    clip_relaxation,
    compile_model,
)

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow])
TOL = 1e-4


# ------------------------------------------------------------------ the relaxation
@settings(max_examples=400, **SETTINGS)
@given(
    low=st.floats(-5, 5), w=st.floats(0, 6), lo=st.one_of(st.just(-math.inf), st.floats(-3, 3)),
    span=st.one_of(st.just(math.inf), st.floats(0.01, 4)),
)
def test_clip_relaxation_encloses_the_function_on_the_interval(low, w, lo, span):
    """aL z + bL <= clip(z, lo, hi) <= aU z + bU on a dense grid of [l, u], for every case of
    l, u against both kinks (and missing sides)."""
    u = low + w
    hi = lo + span if math.isfinite(lo) else (span if math.isfinite(span) else math.inf)
    lt, ut = torch.tensor([low], dtype=torch.float64), torch.tensor([u], dtype=torch.float64)
    aL, bL, aU, bU = clip_relaxation(lt, ut, torch.tensor(lo), torch.tensor(hi))
    z = torch.linspace(low, u, 513, dtype=torch.float64)
    f = torch.minimum(torch.maximum(z, torch.tensor(lo)), torch.tensor(hi))
    assert torch.all(aL * z + bL <= f + 1e-9)
    assert torch.all(aU * z + bU >= f - 1e-9)
    assert all(torch.isfinite(t).all() for t in (aL, bL, aU, bU))


def test_clip_relaxation_is_exact_where_the_unit_is_stable():
    low = torch.tensor([-3.0, 2.0, 0.2, 5.0])
    u = torch.tensor([-1.0, 2.5, 0.8, 7.0])
    aL, bL, aU, bU = clip_relaxation(low, u, torch.tensor(0.0), torch.tensor(1.0))
    for z in (low, u, (low + u) / 2):
        f = z.clamp(0, 1)
        assert torch.allclose(aL * z + bL, f) and torch.allclose(aU * z + bU, f)


# ------------------------------------------------------------------ random nets
class Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


class Normalise(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


class Functional(nn.Module):
    """The functional spellings of the activations."""

    def __init__(self, kind: str, cap: float):
        super().__init__()
        self.kind, self.cap = kind, cap

    def forward(self, x):
        if self.kind == "relu":
            return F.relu(x)
        if self.kind == "clamp":
            return torch.clamp(x, 0.0, self.cap)
        if self.kind == "clip_method":
            return x.clip(min=-self.cap, max=self.cap)
        if self.kind == "relu6":
            return F.relu6(x * 4)
        if self.kind == "hardtanh":
            return F.hardtanh(x, -0.5, self.cap)
        return x.relu() - 0.25


def _activation(kind: str, channels: int, rng: np.random.Generator) -> nn.Module:
    cap = float(rng.uniform(0.05, 2.0))
    if kind == "relu":
        return nn.ReLU()
    if kind == "cap":
        return CappedReLU(cap)
    if kind == "cap_channel":
        return CappedReLU(torch.tensor(rng.uniform(0.05, 2.0, channels), dtype=torch.float32))
    if kind == "learnable":
        return LearnableCappedReLU(cap, num_channels=channels if rng.random() < 0.5 else None)
    if kind == "relu6":
        return nn.ReLU6()
    if kind == "hardtanh":
        return nn.Hardtanh(-cap, cap)
    return Functional(kind, cap)


ACTS = ["relu", "cap", "cap_channel", "learnable", "relu6", "hardtanh", "fn_relu", "clamp",
        "clip_method", "method_relu"]


def _act_kind(k: str) -> str:
    return "relu" if k == "fn_relu" else k


def random_net(seed: int, conv: bool, acts: list[str]) -> tuple[nn.Module, tuple[int, ...]]:
    """A small eval-mode net using ``acts`` in turn; conv nets hold every conv-side op."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    a = iter(itertools.cycle(acts))

    def act(c):
        k = next(a)
        return Functional("relu", 1.0) if k == "fn_relu" else _activation(_act_kind(k), c, rng)

    if conv:
        c = 3
        layers = [Normalise([0.5, 0.4, 0.3], [0.2, 0.3, 0.25]), nn.Conv2d(2 + 1, c, 3, padding=1),
                  nn.BatchNorm2d(c), act(c),
                  Residual(nn.Sequential(nn.Conv2d(c, c, 3, padding=1), act(c))),
                  nn.AvgPool2d(2), nn.Conv2d(c, 4, 3, stride=1, padding=1), act(4),
                  nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 2 * 2, 6), act(6), nn.Linear(6, 3)]
        shape = (3, 8, 8)
    else:
        layers = [nn.Flatten(), nn.Linear(6, 8), act(8), nn.Linear(8, 5), nn.BatchNorm1d(5),
                  act(5), Residual(nn.Sequential(nn.Linear(5, 5), act(5))), nn.Linear(5, 4)]
        shape = (6,)
    net = nn.Sequential(*layers)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.3, 0.3)
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(2.0)
    return net.eval(), shape


def _points(x0: torch.Tensor, eps: float, norm: str, n: int, gen: torch.Generator):
    """Random points of the ball intersected with [0, 1], plus Linf corners: (n, B, ...)."""
    b = x0.shape[0]
    d = x0[0].numel()
    if norm == "Linf":
        delta = (torch.rand(n, *x0.shape, generator=gen) * 2 - 1) * eps
        corners = torch.randint(0, 2, (n, *x0.shape), generator=gen) * 2.0 - 1
        delta = torch.cat([delta, corners * eps])
    else:
        g = torch.randn(2 * n, b, d, generator=gen)
        r = torch.rand(2 * n, b, 1, generator=gen) ** (1 / d)
        r[n:] = 1.0
        delta = (g / g.norm(dim=2, keepdim=True) * r * eps).view(2 * n, *x0.shape)
    return (x0 + delta).clamp(0, 1)


def _pgd_points(graph, x0, eps, norm, steps=15):
    """Points found by PGD pushing every output up and down (one direction per output and
    sign; both signs run as one batch)."""
    k = graph.ops[-1].shape[0]
    sign = torch.tensor([1.0, -1.0]).repeat_interleave(k).view(2 * k, 1, 1)
    with torch.enable_grad():
        x = x0.unsqueeze(0).repeat(2 * k, *[1] * x0.dim()).clone()
        for _ in range(steps):
            x.requires_grad_(True)
            out = graph.values(x.flatten(0, 1))[-1].view(2 * k, x0.shape[0], k)
            obj = (out * sign * torch.eye(k).repeat(2, 1).unsqueeze(1)).sum()
            (g,) = torch.autograd.grad(obj, x)
            with torch.no_grad():
                if norm == "Linf":
                    x = x + eps / 4 * g.sign()
                    x = x0 + (x - x0).clamp(-eps, eps)
                else:
                    flat = g.flatten(2)
                    x = x + eps / 4 * (flat / flat.norm(dim=2, keepdim=True).clamp_min(1e-12)).view_as(x)
                    dd = (x - x0).flatten(2)
                    scale = (eps / dd.norm(dim=2, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)
                    x = x0 + (dd * scale).view_as(x)
                x = x.clamp(0, 1).detach()
    return x


@settings(max_examples=40, **SETTINGS)
@given(seed=st.integers(0, 2**16), conv=st.booleans(),
       acts=st.lists(st.sampled_from(ACTS), min_size=1, max_size=4),
       eps=st.sampled_from([0.0, 0.01, 0.05, 0.2, 0.6]), norm=st.sampled_from(["Linf", "L2"]))
def test_every_point_of_the_ball_lies_within_ibp_and_crown_bounds(seed, conv, acts, eps, norm):
    net, shape = random_net(seed, conv, acts)
    gen = torch.Generator().manual_seed(seed)
    x0 = torch.rand(2, *shape, generator=gen)
    graph = compile_model(net, x0[:1])
    with torch.no_grad():
        assert torch.allclose(graph.values(x0)[-1], net(x0), atol=1e-5)
        ibp = Bounds(graph, Ball(x0, eps, norm, (0.0, 1.0)))
        crown = Bounds(graph, Ball(x0, eps, norm, (0.0, 1.0)), crown_intermediate=True)
        k = graph.ops[-1].shape[0]
        eye = torch.eye(k).expand(2, k, k)
        spec = torch.cat([eye, -eye], 1)
        out_c = crown.crown_margin(spec)
        out_i = ibp.ibp_margin(spec)
        pts = torch.cat([_points(x0, eps, norm, 64, gen), _pgd_points(graph, x0, eps, norm)])
        vals = graph.values(pts.flatten(0, 1))
        for i, v in enumerate(vals):
            v = v.view(len(pts), *x0.shape[:1], *v.shape[1:])
            for bounds in (ibp.bounds[i], crown.bounds[i]):
                assert torch.all(v >= bounds[0] - TOL), (i, graph.ops[i].where)
                assert torch.all(v <= bounds[1] + TOL), (i, graph.ops[i].where)
        out = v
        for res in (out_c, out_i):
            assert torch.all(out >= res[:, :k] - TOL)
            assert torch.all(out <= -res[:, k:] + TOL)


@settings(max_examples=25, **SETTINGS)
@given(seed=st.integers(0, 2**16), conv=st.booleans(),
       acts=st.lists(st.sampled_from(ACTS), min_size=1, max_size=3),
       eps=st.sampled_from([0.01, 0.05, 0.3]), norm=st.sampled_from(["Linf", "L2"]),
       method=st.sampled_from(["ibp", "crown", "best"]))
def test_certified_margin_is_below_the_margin_of_every_point(seed, conv, acts, eps, norm, method):
    net, shape = random_net(seed, conv, acts)
    gen = torch.Generator().manual_seed(seed + 1)
    x0 = torch.rand(3, *shape, generator=gen)
    y = torch.randint(0, 3, (3,), generator=gen)
    m = certified_margins(net, x0, y, eps, norm, method=method)
    with torch.no_grad():
        pts = _points(x0, eps, norm, 64, gen)
        out = net(pts.flatten(0, 1)).view(len(pts), len(x0), -1)
        yy = y.expand(len(pts), -1)[..., None]
        true = out.gather(2, yy)[..., 0] - out.scatter(2, yy, -math.inf).max(2).values
        assert torch.all(m <= true + TOL)


# ------------------------------------------------------------------ exact minima
def _exact_min(w1, b1, cap, c, x0, eps):
    """min over the Linf box of c . W2 clip(W1 x + b1, 0, cap) (W2 folded into c), by one LP
    per activation pattern (each unit off, linear, or at its cap)."""
    from scipy.optimize import linprog

    n, d = w1.shape
    lo, hi = np.clip(x0 - eps, 0, 1), np.clip(x0 + eps, 0, 1)
    # a unit's pre-activation range over the box (exact for one layer): patterns outside it
    # are infeasible LPs, skipped without solving them
    zl = np.clip(w1, 0, None) @ lo + np.clip(w1, None, 0) @ hi + b1
    zu = np.clip(w1, 0, None) @ hi + np.clip(w1, None, 0) @ lo + b1
    allowed = [[p for p, ok in enumerate((zl[j] <= 0, zu[j] >= 0 and zl[j] <= cap, zu[j] >= cap))
                if ok] for j in range(n)]
    best = math.inf
    for pattern in itertools.product(*allowed):
        a_ub, b_ub, cost, const = [], [], np.zeros(d), 0.0
        for j, p in enumerate(pattern):
            if p == 0:  # z <= 0
                rows = [(w1[j], -b1[j])]
            elif p == 1:  # 0 <= z <= cap
                rows = [(-w1[j], b1[j]), (w1[j], cap - b1[j])]
                cost += c[j] * w1[j]
                const += c[j] * b1[j]
            else:  # z >= cap
                rows = [(-w1[j], b1[j] - cap)]
                const += c[j] * cap
            a_ub += [r[0] for r in rows]
            b_ub += [r[1] for r in rows]
        res = linprog(cost, A_ub=np.array(a_ub), b_ub=np.array(b_ub), bounds=list(zip(lo, hi)))
        if res.status == 0:
            best = min(best, res.fun + const)
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("cap", [math.inf, 0.4])
def test_crown_margin_is_below_the_exact_minimum_and_exact_when_stable(seed, cap):
    torch.manual_seed(seed)
    d, n, k = 3, 4, 3
    net = nn.Sequential(nn.Linear(d, n), CappedReLU(cap), nn.Linear(n, k)).double().eval()
    x0 = torch.rand(1, d, dtype=torch.float64)
    y = net(x0).argmax(1)
    w1, b1 = net[0].weight.detach().numpy(), net[0].bias.detach().numpy()
    w2, b2 = net[2].weight.detach().numpy(), net[2].bias.detach().numpy()
    capf = cap if math.isfinite(cap) else 1e6
    for eps in (0.05, 0.3):
        exact = min(_exact_min(w1, b1, capf, w2[y.item()] - w2[j], x0[0].numpy(), eps)
                    + b2[y.item()] - b2[j] for j in range(k) if j != y.item())
        crown = certified_margins(net, x0, y, eps, method="crown").item()
        assert crown <= exact + 1e-7
        ibp = certified_margins(net, x0, y, eps, method="ibp").item()
        assert ibp <= exact + 1e-7
    # tiny eps: every unit stable, so CROWN's linear bound is the exact minimum
    eps = 1e-6
    exact = min(_exact_min(w1, b1, capf, w2[y.item()] - w2[j], x0[0].numpy(), eps)
                + b2[y.item()] - b2[j] for j in range(k) if j != y.item())
    assert certified_margins(net, x0, y, eps, method="crown").item() == pytest.approx(exact, abs=1e-8)


# ------------------------------------------------------------------ unsupported ops
class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return torch.sigmoid(self.fc(x))


def test_unsupported_module_is_named_with_its_path():
    net = nn.Sequential(nn.Linear(4, 5), nn.Sequential(nn.GELU()), nn.Linear(5, 2))
    with pytest.raises(UnsupportedOpError, match=r"module '1\.0' \(GELU\)"):
        certified_margins(net, torch.rand(2, 4), torch.tensor([0, 1]), 0.1)


def test_unsupported_function_is_named_with_its_source_line():
    with pytest.raises(UnsupportedOpError, match=r"sigmoid.*test_certify\.py"):
        compile_model(Gated(), torch.rand(1, 4))


def test_product_of_two_input_dependent_tensors_is_refused():
    class Square(nn.Module):
        def forward(self, x):
            return x * x

    with pytest.raises(UnsupportedOpError, match="not affine"):
        compile_model(Square(), torch.rand(1, 4))


# ------------------------------------------------------------------ |W| reuse
def _ibp_lower(graph, x, y):
    from relucap_plugin.certification import margin_spec

    return Bounds(graph, Ball(x, 0.1, "Linf", (0.0, 1.0))).ibp_margin(margin_spec(y, 3, x.dtype), y)


def test_reused_abs_weights_follow_every_change_of_the_weights():
    """Inside ``reuse_abs_weights`` an in-place change through the parameter (version bump) or
    a new tensor (``.data =``) gives the bounds of the changed model; outside the scope, even a
    ``.data`` write that bumps no version does. Compared with a freshly compiled graph."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 6), CappedReLU(0.5), nn.Linear(6, 5), nn.ReLU(),
                        nn.Linear(5, 3)).eval()
    x, y = torch.rand(4, 4), torch.tensor([0, 1, 2, 0])
    graph = compile_model(net, x[:1])

    def fresh():
        return _ibp_lower(compile_model(net, x[:1]), x, y)

    with torch.no_grad():
        with graph.reuse_abs_weights():
            first = _ibp_lower(graph, x, y)
            assert torch.equal(first, fresh())
            net[0].weight.mul_(-3.0)
            changed = _ibp_lower(graph, x, y)
            assert not torch.allclose(changed, first) and torch.equal(changed, fresh())
            net[2].weight.data = torch.randn(5, 6)
            replaced = _ibp_lower(graph, x, y)
            assert not torch.allclose(replaced, changed) and torch.equal(replaced, fresh())
        net[0].weight.data.mul_(0.25)
        assert torch.equal(_ibp_lower(graph, x, y), fresh())
        assert not torch.allclose(_ibp_lower(graph, x, y), replaced)
