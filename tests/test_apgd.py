"""torch:APGD and torch:APGD-T (relucap_plugin.adapters.plain_torch) and their place in the
standard suite and the cascade."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from relucap_plugin import ThreatModel, get_attack
from relucap_plugin.adapters.plain_torch import apgd, apgd_targets, top_targets
from relucap_plugin.adaptive import attack_kind, get_suite
from relucap_plugin.attacks import perturbation_norm
from relucap_plugin.cascade import cascade_order

LINF = ThreatModel("Linf", eps=0.08, steps=10)


@pytest.fixture(scope="module")
def data(mnist5k):
    _, test = mnist5k
    return test.tensors[0][:100], test.tensors[1][:100]


def _robust(model, x_adv, y):
    with torch.no_grad():
        return model(x_adv).argmax(1) == y


def test_apgd_t_breaks_samples_that_untargeted_pgd_misses(mnist_mlp, data):
    x, y = data
    robust = {spec: _robust(mnist_mlp, get_attack(spec, LINF)(mnist_mlp, x, y, seed=0), y)
              for spec in ("torch:PGD", "torch:PGD-margin", "torch:APGD-T-margin")}
    gained = robust["torch:PGD"] & robust["torch:PGD-margin"] & ~robust["torch:APGD-T-margin"]
    assert gained.any()


@pytest.mark.parametrize("spec", ["torch:APGD-T-margin(targets=3)", "torch:APGD-DLR"])
def test_a_sample_gets_the_same_example_alone_and_in_a_batch(mnist_mlp, data, spec):
    x, y = data[0][:12], data[1][:12]
    attack = get_attack(spec, LINF)
    batch = attack(mnist_mlp, x, y, seed=5)
    for k in (0, 7, 11):
        alone = attack(mnist_mlp, x[k:k + 1], y[k:k + 1], seed=5, sample_ids=[k])
        assert torch.equal(alone[0], batch[k])
    assert not torch.equal(attack(mnist_mlp, x, y, seed=6), batch)


@pytest.mark.parametrize("rows", [1, 24, 10**6])
def test_batched_targets_give_the_examples_of_one_target_at_a_time(mnist_mlp, data, rows):
    """Targets run several at a time (rows = samples x targets) give every sample the example of
    the plain loop: target after target, one sample alone, its first success kept."""
    x, y = data[0][:12], data[1][:12]
    eps, kwargs = 0.04, dict(steps=8, loss="margin")
    gen = lambda i, j: torch.Generator().manual_seed(1000 * int(i) + j)  # noqa: E731
    with torch.no_grad():
        order = top_targets(mnist_mlp(x), y, 9)
    batched = apgd_targets(mnist_mlp, x, y, eps, targets=9, rows=rows,
                           generators=lambda todo, j: [gen(i, j) for i in todo], **kwargs)
    broke_at = []
    for i in range(len(x)):
        for j in range(9):
            alone = apgd(mnist_mlp, x[i:i + 1], y[i:i + 1], eps, target=order[i:i + 1, j],
                         generator=[gen(i, j)], **kwargs)
            if _robust(mnist_mlp, alone, y[i:i + 1]).item() is False:
                broke_at.append(j)
                break
        assert torch.equal(batched[i], alone[0]), i
    assert max(broke_at) > 0 and len(broke_at) < len(x), broke_at  # later targets and robust samples


@pytest.mark.parametrize("norm, eps", [("Linf", 0.08), ("L2", 1.5)])
def test_apgd_t_respects_eps_and_bounds(mnist_mlp, data, norm, eps):
    x, y = data[0][:12], data[1][:12]
    tm = ThreatModel(norm, eps=eps, steps=10, bounds=(0.0, 1.0))
    inner = apgd(mnist_mlp, x, y, eps, norm=norm, steps=10, loss="margin",
                 target=top_targets(mnist_mlp(x), y, 1)[:, 0])
    for x_adv in (inner, get_attack("torch:APGD-T-margin(targets=3)", tm)(mnist_mlp, x, y, seed=0)):
        assert float(perturbation_norm(x, x_adv, norm).max()) <= eps * (1 + 1e-5)
        assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
        assert not _robust(mnist_mlp, x_adv, y).all()


def test_apgd_t_attacks_the_top_other_classes_in_order(mnist_mlp, data):
    x, y = data
    with torch.no_grad():
        logits = mnist_mlp(x)
    order = top_targets(logits, y, 3)
    assert not (order == y[:, None]).any()
    assert (logits.gather(1, order).diff(dim=1) <= 0).all()
    one = get_attack("torch:APGD-T-margin(targets=1)", LINF)(mnist_mlp, x, y, seed=0)
    with torch.no_grad():
        pred = mnist_mlp(one).argmax(1)
    fooled = pred != y
    assert fooled.any() and torch.equal(pred[fooled], order[fooled, 0])
    nine = get_attack("torch:APGD-T-margin", LINF)(mnist_mlp, x, y, seed=0)
    assert _robust(mnist_mlp, nine, y).sum() <= (~fooled).sum()


def test_targeted_threat_model_runs_the_given_targets(mnist_mlp, data):
    x, y = data[0][:24], data[1][:24]
    target = (y + 1) % 10
    x_adv = get_attack("torch:APGD-T", LINF.replace(targeted=True, eps=0.3))(
        mnist_mlp, x, y, target=target, seed=0)
    with torch.no_grad():
        pred = mnist_mlp(x_adv).argmax(1)
    assert (pred == target).float().mean() > 0.8


def test_targets_override_and_class_count_are_checked():
    with pytest.raises(ValueError, match=r"torch:APGD-T: targets must be an int >= 1 .* got targets=0"):
        get_attack("torch:APGD-T(targets=0)", LINF)
    three = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(ValueError, match="at least 4 classes"):
        get_attack("torch:APGD-T-DLR", LINF)(three, torch.rand(4, 1, 4, 4))
    assert get_attack("torch:APGD-T-margin", LINF)(three, torch.rand(4, 1, 4, 4)).shape == (4, 1, 4, 4)


def test_suite_holds_apgd_t_and_the_cascade_runs_it_after_white_box_pgd(capped_mlp, data):
    suite = get_suite("standard", LINF, capped_mlp, data[0][:8], square_queries=10)
    specs = [a.spec for a in suite]
    assert "torch:APGD-T(loss='margin')" in specs and "torch:APGD-T(loss='margin')+bpda(ste)" in specs
    reordered = [suite[4], *suite[:4], *suite[5:]]  # APGD-T given first still runs after PGD
    def order(schedule):
        return [a.spec for a in cascade_order(reordered, lambda a: attack_kind(a.spec, a.family), (), schedule)]

    audit = order("audit")
    assert audit[:3] == ["torch:PGD", "torch:PGD(loss='margin')", "torch:APGD-T(loss='margin')"]
    assert [attack_kind(s) for s in audit[3:]] == ["surrogate"] * 3 + ["transfer", "black-box"]
    assert audit[5] == "torch:APGD-T(loss='margin')+bpda(ste)"
    assert attack_kind(audit[2]) == "white-box"  # the audit counts it as white-box
    cascade = order("cascade")  # the one-run-per-target attacks get what the cheaper kinds leave
    assert cascade[:2] == audit[:2] and cascade[-1] == audit[-1]
    assert [attack_kind(s) for s in cascade[2:5]] == ["surrogate", "surrogate", "transfer"]
    assert cascade[5:7] == ["torch:APGD-T(loss='margin')", "torch:APGD-T(loss='margin')+bpda(ste)"]
    relu_suite = get_suite("standard", LINF, nn.Sequential(nn.Flatten(), nn.Linear(784, 10)), data[0][:8],
                           square_queries=10)
    assert [a.spec for a in relu_suite if a.family.startswith("APGD-T")] == ["torch:APGD-T(loss='margin')"]
