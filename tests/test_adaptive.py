"""Surrogate-gradient mode, BPDA and transfer attacks, and the standard suite (issue 5)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relucap_plugin import EvalConfig, ThreatModel, get_attack
from relucap_plugin.activations import CappedReLU, DynamicCappedReLU, LearnableCappedReLU
from relucap_plugin.adaptive import (
    SurrogateAttack,
    TransferAttack,
    attack_kind,
    bpda,
    capped_sites,
    evaluate_suite,
    get_suite,
    surrogate_gradients,
    transfer,
    uncapped_twin,
    with_surrogate_gradients,
)

TM = ThreatModel("Linf", eps=(0.3,))


@pytest.fixture(scope="module")
def test_batch(mnist5k):
    _, test = mnist5k
    return test.tensors[0][:200], test.tensors[1][:200]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.int32)


def _input_grad(model, x):
    x = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(model(x).sum(), x)
    return g


def _mixed_model() -> nn.Module:
    """Every capped type, per-channel and in-place variants, in one small model."""
    torch.manual_seed(0)
    dyn = DynamicCappedReLU(num_channels=4)
    dyn.train()
    dyn(torch.randn(64, 4, 3, 3))
    dyn.eval()
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), CappedReLU(0.3, inplace=True),
        nn.Conv2d(4, 4, 3, padding=1), CappedReLU([0.2, 0.5, 1.0, 2.0]),
        nn.Conv2d(4, 4, 1), LearnableCappedReLU(0.4, num_channels=4),
        nn.Conv2d(4, 4, 1), dyn,
        nn.Flatten(), nn.Linear(4 * 3 * 3, 5),
    ).eval()


@pytest.mark.parametrize("mode", ["ste", "softcap"])
def test_surrogate_forward_bit_identical_and_model_restored(mode):
    model = _mixed_model()
    x = torch.randn(16, 1, 3, 3) * 3
    before = model(x)
    grad_before = _input_grad(model, x)
    state = copy.deepcopy(model.state_dict())
    with surrogate_gradients(model, mode) as m:
        assert m is model
        inside = model(x)
        assert torch.equal(_bits(inside), _bits(before))
        with torch.no_grad():
            assert torch.equal(_bits(model(x)), _bits(before))
        grad_inside = _input_grad(model, x)
        assert model[1].inplace is False
    assert not torch.equal(grad_inside, grad_before)
    assert model[1].inplace is True
    assert all(not m._forward_hooks for _, m in capped_sites(model))
    assert torch.equal(_bits(model(x)), _bits(before))
    assert torch.equal(_input_grad(model, x), grad_before)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_surrogate_restores_after_an_exception():
    model = _mixed_model()
    with pytest.raises(RuntimeError, match="boom"):
        with surrogate_gradients(model, "ste"):
            raise RuntimeError("boom")
    assert model[1].inplace is True
    assert all(not m._forward_hooks for _, m in capped_sites(model))


def test_ste_is_relu_gradient_and_softcap_is_the_smooth_caps_derivative():
    x = torch.linspace(-2, 3, 101, dtype=torch.float64)
    cap, temperature = 0.5, 4.0
    act = CappedReLU(cap)
    with surrogate_gradients(act, "ste"):
        g = _input_grad(act, x)
    assert torch.equal(g, (x > 0).double())
    with surrogate_gradients(act, "softcap", temperature):
        g_soft = _input_grad(act, x)
    t = temperature / cap
    xr = x.clone().requires_grad_(True)
    smooth = F.softplus(t * xr) / t - F.softplus(t * (xr - cap)) / t
    (expected,) = torch.autograd.grad(smooth.sum(), xr)
    torch.testing.assert_close(g_soft, expected, rtol=1e-6, atol=1e-8)  # the reference cancels in its tails
    # saturated units keep a small non-zero gradient in float32, unlike the true derivative
    xf = torch.tensor([0.5 + 1.0, 3.0], dtype=torch.float32)
    with surrogate_gradients(act, "softcap", temperature):
        g32 = _input_grad(act, xf)
    assert bool((g32 > 0).all()) and bool((_input_grad(act, xf) == 0).all())


def test_bad_mode_and_temperature_are_rejected_and_nothing_is_installed():
    model = _mixed_model()
    with pytest.raises(ValueError, match="surrogate mode must be one of"):
        with surrogate_gradients(model, "sigmoid"):
            pass
    with pytest.raises(ValueError, match="temperature must be a positive"):
        with_surrogate_gradients(model, "softcap", temperature=0)
    assert all(not m._forward_hooks for _, m in capped_sites(model))


def test_model_transform_copies_and_keeps_forward(capped_mlp, test_batch):
    x, _ = test_batch
    transformed = with_surrogate_gradients(capped_mlp, "ste")
    assert transformed is not capped_mlp
    assert not capped_mlp[4]._forward_hooks and transformed[4]._forward_hooks
    assert torch.equal(_bits(transformed(x)), _bits(capped_mlp(x)))
    grad_plain, grad_ste = _input_grad(capped_mlp, x), _input_grad(transformed, x)
    zero = lambda g: (g.flatten(1) == 0).all(1).float().mean().item()  # noqa: E731
    assert zero(grad_plain) > 0.3 and zero(grad_ste) == 0.0


def test_uncapped_twin_replaces_every_capped_type_and_leaves_the_model_alone():
    model = _mixed_model()
    twin = uncapped_twin(model)
    assert len(capped_sites(model)) == 4 and capped_sites(twin) == []
    assert [type(m) for m in twin if not isinstance(m, (nn.Conv2d, nn.Flatten, nn.Linear))] == [nn.ReLU] * 4
    assert twin[0].weight is not model[0].weight and torch.equal(twin[0].weight, model[0].weight)
    x = torch.rand(3, 1, 3, 3)
    h = model[0](x)
    assert torch.equal(twin[1](h), torch.relu(h)) and not torch.equal(model[1](h.clone()), torch.relu(h))
    assert isinstance(model[1], CappedReLU) and model[1].inplace


def test_uncapped_twin_undoes_surgery_exactly_including_functional_relus():
    from relucap_plugin.surgery import cap_relus, find_relus

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.fc2 = nn.Linear(6, 8), nn.Linear(8, 3)

        def forward(self, x):
            return self.fc2(torch.nn.functional.relu(self.fc1(x)) * 2)

    torch.manual_seed(0)
    original = Functional().eval()
    capped, _ = cap_relus(original, 0.05)
    x = torch.randn(16, 6) * 3
    assert not torch.equal(capped(x), original(x))
    twin = uncapped_twin(capped)
    assert torch.equal(twin(x), original(x))
    assert [s.kind for s in find_relus(twin)] == [s.kind for s in find_relus(original)]
    assert not torch.equal(capped(x), original(x))  # the capped model itself is untouched


@pytest.mark.parametrize("spec", ["torch:PGD", "torchattacks:PGD", "torchattacks:APGD", "art:ProjectedGradientDescent",
                                  "foolbox:PGD"])
def test_bpda_through_each_library_breaks_the_capped_model(capped_mlp, test_batch, spec):
    x, y = test_batch
    x, y = x[:100], y[:100]
    plain = get_attack(spec, TM)
    wrapped = bpda(spec, TM)
    assert wrapped.spec == f"{plain.spec}+bpda(ste)" and wrapped.library == plain.library
    assert attack_kind(wrapped.spec) == "surrogate"

    def acc(attack):
        x_adv = attack(capped_mlp, x, y, 0.3, seed=0)
        assert float((x_adv - x).abs().max()) <= 0.3 + 1e-6
        return (capped_mlp(x_adv).argmax(1) == y).float().mean().item()

    a_plain, a_bpda = acc(plain), acc(wrapped)
    assert a_plain > 0.2, a_plain
    assert a_bpda < 0.05, (a_plain, a_bpda)
    assert not capped_mlp[4]._forward_hooks


def test_wrappers_follow_the_threat_model_and_transfer_uses_the_surrogate(capped_mlp, test_batch):
    x, y = test_batch
    pgd = get_attack("torch:PGD", TM)
    tm2 = TM.replace(eps=(0.1,), steps=5)
    w = SurrogateAttack(pgd, "softcap", 2.0).with_threat_model(tm2)
    assert w.inner.threat_model.steps == 5 and w.spec == "torch:PGD+bpda(softcap,t=2)"
    t = transfer(pgd)
    assert isinstance(t, TransferAttack) and t.spec == "torch:PGD+transfer(uncapped)"
    assert attack_kind(t.spec) == "transfer"
    assert capped_sites(t.source_model(capped_mlp)) == []
    # a given surrogate is used as is: transfer from the model itself is plain PGD, run with the
    # wrapper's seed and sample ids (so its per-sample random starts are the wrapper's)
    same = transfer(pgd, surrogate=capped_mlp, surrogate_name="self")
    expected = pgd(capped_mlp, x[:50], y[:50], 0.3, seed=3)
    assert torch.equal(same(capped_mlp, x[:50], y[:50], 0.3, seed=3), expected)
    ids = torch.arange(100, 150)
    assert torch.equal(same(capped_mlp, x[:50], y[:50], 0.3, seed=3, sample_ids=ids),
                       pgd(capped_mlp, x[:50], y[:50], 0.3, seed=3, sample_ids=ids))
    with pytest.raises(ValueError, match="pass threat_model"):
        bpda("torch:PGD")
    with pytest.raises(TypeError, match="surrogate must be"):
        transfer(pgd, surrogate=3)


def test_standard_suite_composition():
    suite = get_suite("standard", TM, square_queries=100)
    kinds = [attack_kind(a.spec, a.family) for a in suite]
    assert kinds == ["white-box", "white-box", "surrogate", "surrogate", "white-box", "surrogate", "black-box",
                     "transfer"]
    assert suite[1].threat_model.loss == "margin" and suite[6].threat_model.steps == 100
    assert suite[4].family == "APGD-T" and suite[4].threat_model.loss == "margin"
    assert len({a.spec for a in suite}) == len(suite)
    with pytest.raises(ValueError, match="unknown attack suite"):
        get_suite("strong", TM)


def test_suite_for_a_model_without_caps_leaves_out_what_only_repeats_white_box_pgd(capped_mlp, test_batch):
    x = test_batch[0][:8]
    relu_net = uncapped_twin(capped_mlp)
    assert [a.spec for a in get_suite("standard", TM, capped_mlp)] == [a.spec for a in get_suite("standard", TM)]
    kept = get_suite("standard", TM, relu_net, x)
    assert [attack_kind(a.spec, a.family) for a in kept] == ["white-box", "white-box", "white-box", "black-box"]
    own_source = get_suite("standard", TM, relu_net, x, surrogate=copy.deepcopy(relu_net))
    assert attack_kind(own_source[-1].spec, own_source[-1].family) == "transfer"  # a chosen source stays
    # without an example input a model without cap modules may cap with ops: every member stays
    assert len(get_suite("standard", TM, relu_net)) == 8
    clamp_net = copy.deepcopy(relu_net)
    clamp_net[4] = nn.Hardtanh(0.0, 0.1)
    assert len(get_suite("standard", TM, clamp_net, x)) == 8


@pytest.mark.slow
def test_standard_suite_finds_what_pgd_misses_on_the_capped_model(capped_mlp, test_batch):
    results = evaluate_suite(capped_mlp, test_batch, TM, config=EvalConfig(batch_size=200, device="cpu"),
                             progress=False, schedule="full")
    pgd = results.robust_accuracy("torch:PGD", 0.3)
    worst = results.worst_case(0.3)
    assert pgd > 0.20, pgd
    assert worst < 0.05, worst
    assert len(results.attacks) == 8
    assert all(results.robust_accuracy(a, 0.3) is not None for a in results.attacks)
    assert not results.violations() and not results.failed()


def test_standard_suite_agrees_with_pgd_on_a_relu_model(mnist_mlp, test_batch):
    results = evaluate_suite(mnist_mlp, test_batch, TM, config=EvalConfig(batch_size=200, device="cpu"),
                             progress=False)
    pgd = results.robust_accuracy("torch:PGD", 0.3)
    assert abs(results.worst_case(0.3) - pgd) <= 0.02, (pgd, results.worst_case(0.3))
    assert not results.violations() and not results.failed()


def test_cli_evaluate_with_the_standard_suite(tmp_path, capsys):
    """`relucap evaluate --suite standard` runs every suite attack and reports the worst case."""
    import json

    from relucap_plugin.cli import main

    x = torch.rand(12, 1, 28, 28)
    torch.save({"x": x, "y": torch.arange(12) % 10}, tmp_path / "data.pt")
    out = tmp_path / "out"
    assert main(["evaluate", "mlp:16:capped_relu(cap=0.1)", "--data", str(tmp_path / "data.pt"),
                 "--suite", "standard", "--attack", "torch:FGSM", "--eps", "0.3", "--steps", "3",
                 "--square-queries", "20", "--quiet", "--out", str(out)]) == 0
    lines = (out / "results.jsonl").read_text().splitlines()
    attacks = {json.loads(line)["attack"] for line in lines[1:]}
    expected = {a.spec for a in get_suite("standard", ThreatModel("Linf", 0.3, steps=3), square_queries=20)}
    assert attacks == expected | {"torch:FGSM"} and len(expected) == 8
    assert any("+bpda(ste)" in a for a in attacks) and any("transfer" in a for a in attacks)
    assert "worst case (9 attacks)" in capsys.readouterr().out
