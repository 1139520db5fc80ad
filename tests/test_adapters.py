"""The ART, Foolbox and torchattacks adapters, run for real on small models.

One test is parametrised over every attack of every adapter table (it grows when an attack is
added); the others pin the cross-library PGD agreement, the parameter mapping, the caller state
and each library's quirks.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from relucap_plugin import ThreatModel, get_attack
from relucap_plugin.adapters import load_adapter
from relucap_plugin.attacks import perturbation_norm

LIBRARIES = ("torchattacks", "foolbox", "art")
BUDGET = {"Linf": 0.1, "L2": 1.0}

#: keep the expensive attacks tiny (queries, binary searches, initial samples)
TINY = {
    "torchattacks:AutoAttack": {"n_queries": 10},
    "foolbox:L2CarliniWagnerAttack": {"binary_search_steps": 2},
    "foolbox:HopSkipJumpAttack": {"initial_gradient_eval_steps": 5, "max_gradient_eval_steps": 20},
    "art:CarliniL2Method": {"binary_search_steps": 2},
    "art:AutoAttack": {"n_queries": 10},
    "art:HopSkipJump": {"max_eval": 20, "init_eval": 5, "init_size": 20},
    "art:BoundaryAttack": {"num_trial": 5, "sample_size": 5, "init_size": 20},
}


GRADIENT_FIXED_BUDGET = {"FGSM", "PGD", "APGD", "APGD-T", "AutoAttack"}


def _cases():
    for library in LIBRARIES:
        for name, cls in load_adapter(library).ATTACKS.items():
            for norm in cls.norms:
                yield pytest.param(library, name, norm, id=f"{library}:{name}-{norm}")


@pytest.fixture(scope="module")
def correct(mnist5k, mnist_mlp):
    """Test digits the trained MLP classifies correctly (first 200 looked at)."""
    x, y = mnist5k[1].tensors
    keep = mnist_mlp(x[:200]).argmax(1) == y[:200]
    return x[:200][keep], y[:200][keep]


def _in_budget(x, x_adv, norm, eps):
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and x_adv.device == x.device
    assert torch.isfinite(x_adv).all()
    assert 0.0 <= float(x_adv.min()) and float(x_adv.max()) <= 1.0
    assert float(perturbation_norm(x, x_adv, norm).max()) <= eps * (1 + 1e-5)


@pytest.mark.parametrize(("library", "name", "norm"), list(_cases()))
def test_every_attack_runs_in_budget_and_leaves_the_model_alone(library, name, norm, mnist_mlp, correct):
    model = copy.deepcopy(mnist_mlp)
    model.train()
    model[1].requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = correct[0][:6], correct[1][:6]
    eps = BUDGET[norm]
    spec = f"{library}:{name}"
    attack = get_attack(spec, ThreatModel(norm, eps, steps=3), **TINY.get(spec, {}))
    assert attack.name == spec
    with torch.no_grad():
        x_adv = attack(model, x, y, seed=0)
    _in_budget(x, x_adv, norm, eps)
    if attack.family in GRADIENT_FIXED_BUDGET:  # PGD-20 leaves ~8% of this model robust at 0.1
        assert (mnist_mlp(x_adv).argmax(1) != y).sum() >= 2
    assert model.training and all(m.training for m in model.modules())
    assert not model[1].weight.requires_grad and model[3].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("eps", [0.05, 0.1])
def test_same_pgd_spec_gives_the_same_robust_accuracy_in_every_library(eps, mnist5k, mnist_mlp):
    """PGD-20, step 0.01, no random start (deterministic): the four backends and a loop written
    here agree to within 1 point of robust accuracy on 500 test digits."""
    x, y = (t[:500] for t in mnist5k[1].tensors)
    tm = ThreatModel("Linf", eps, steps=20, step_size=0.01, random_start=False)
    x_loop = x.clone()
    for _ in range(20):
        x_loop.requires_grad_(True)
        grad, = torch.autograd.grad(nn.functional.cross_entropy(mnist_mlp(x_loop), y), x_loop)
        x_loop = torch.min(torch.max(x_loop.detach() + 0.01 * grad.sign(), x - eps), x + eps).clamp(0, 1)
    robust = {"loop": mnist_mlp(x_loop).argmax(1) == y}
    for spec in ("torch:PGD", "torchattacks:PGD", "foolbox:LinfPGD", "art:ProjectedGradientDescent"):
        x_adv = get_attack(spec, tm, batch_size=256)(mnist_mlp, x, y)
        _in_budget(x, x_adv, "Linf", eps)
        robust[spec] = mnist_mlp(x_adv).argmax(1) == y
    accuracy = {k: 100 * v.float().mean().item() for k, v in robust.items()}
    print(f"PGD-20 eps={eps}: robust accuracy %", accuracy)
    clean = 100 * (mnist_mlp(x).argmax(1) == y).float().mean().item()
    assert 5 < accuracy["loop"] < clean - 20  # the attack does something and something is left
    assert max(accuracy.values()) - min(accuracy.values()) <= 1.0
    disagreements = {k: int((v != robust["loop"]).sum()) for k, v in robust.items()}
    assert max(disagreements.values()) <= 5, disagreements


def test_same_l2_pgd_spec_agrees_across_libraries(mnist5k, mnist_mlp):
    x, y = (t[:300] for t in mnist5k[1].tensors)
    tm = ThreatModel("L2", 1.0, steps=20, step_size=0.1, random_start=False)
    accuracy = {}
    for spec in ("torch:PGD", "torchattacks:PGD", "foolbox:PGD", "art:PGD"):
        x_adv = get_attack(spec, tm)(mnist_mlp, x, y)
        _in_budget(x, x_adv, "L2", 1.0)
        accuracy[spec] = 100 * (mnist_mlp(x_adv).argmax(1) == y).float().mean().item()
    print("L2 PGD-20 eps=1: robust accuracy %", accuracy)
    assert max(accuracy.values()) - min(accuracy.values()) <= 1.0


@pytest.mark.parametrize(
    "spec",
    ["torchattacks:CW(c=10.0, lr=0.1)", "foolbox:L2CarliniWagnerAttack(binary_search_steps=5, initial_const=0.1, stepsize=0.05)",
     "art:CarliniL2Method(binary_search_steps=1, initial_const=10.0)", "foolbox:L2DeepFoolAttack", "art:DeepFool"],
)
def test_minimum_norm_attacks_fool_with_a_large_budget(spec, mnist_mlp, correct):
    """torchattacks:DeepFool is left out: its overshoot is per step, so its points sit on the
    decision boundary (logit margins ~1e-7) and their verdict is float round-off."""
    x, y = correct[0][:8], correct[1][:8]
    x_adv = get_attack(spec, ThreatModel("L2", 5.0, steps=30))(mnist_mlp, x, y, seed=0)
    _in_budget(x, x_adv, "L2", 5.0)
    fooled = mnist_mlp(x_adv).argmax(1) != y
    assert fooled.sum() >= 6
    assert torch.equal(x_adv[~fooled], x[~fooled])  # failures come back as the input


def test_foolbox_cw_failures_are_not_returned_as_black_images(mnist_mlp, correct):
    x, y = correct[0][:8], correct[1][:8]
    tm = ThreatModel("L2", 5.0, steps=5)
    x_adv = get_attack("foolbox:L2CarliniWagnerAttack(binary_search_steps=1)", tm)(mnist_mlp, x, y)
    fooled = mnist_mlp(x_adv).argmax(1) != y
    assert torch.equal(x_adv[~fooled], x[~fooled]) and (~fooled).any()


# --- mapping onto each library's parameters --------------------------------------------------------


def test_torchattacks_pgd_gets_every_parameter_from_the_threat_model(mnist_mlp):
    tm = ThreatModel("Linf", 0.3, steps=7, step_size=0.02, random_start=False)
    native = get_attack("torchattacks:PGD", tm).native(mnist_mlp)
    attack = native.attack
    assert type(attack).__name__ == "PGD"
    assert (attack.eps, attack.alpha, attack.steps, attack.random_start) == (0.3, 0.02, 7, False)
    assert attack.device == torch.device("cpu") and native.model.model is mnist_mlp


def test_foolbox_pgd_gets_every_parameter_from_the_threat_model(mnist_mlp):
    tm = ThreatModel("L2", 1.5, steps=9)
    native = get_attack("foolbox:PGD", tm).native(mnist_mlp)
    assert type(native.attack).__name__ == "L2ProjectedGradientDescentAttack"
    assert native.attack.abs_stepsize == pytest.approx(2.5 * 1.5 / 9)
    assert (native.attack.steps, native.attack.random_start) == (9, True)
    assert type(native.model).__name__ == "PyTorchModel" and native.model.bounds == (0.0, 1.0)
    assert native.model.device == torch.device("cpu") and native.call_kwargs == {"epsilons": 1.5}


def test_art_pgd_and_classifier_get_everything_explicitly(mnist_mlp):
    tm = ThreatModel("Linf", 0.3, steps=11, restarts=3)
    native = get_attack("art:PGD", tm, batch_size=128).native(mnist_mlp, input_shape=(1, 28, 28), num_classes=10)
    clf, attack = native.model, native.attack
    assert type(clf).__name__ == "PyTorchClassifier"
    assert clf.nb_classes == 10 and tuple(clf.clip_values) == (0.0, 1.0) and clf.input_shape == (1, 28, 28)
    assert (attack.max_iter, attack.num_random_init, attack.batch_size) == (11, 3, 128)
    assert attack.eps == pytest.approx(0.3) and attack.eps.dtype == np.float32
    assert attack.eps_step == pytest.approx(2.5 * 0.3 / 11) and attack.targeted is False
    no_start = get_attack("art:PGD", tm.replace(random_start=False)).native(mnist_mlp, input_shape=(1, 28, 28),
                                                                             num_classes=10)
    assert no_start.attack.num_random_init == 0
    with pytest.raises(ValueError, match="needs input_shape="):
        get_attack("art:PGD", tm).native(mnist_mlp)


@pytest.mark.parametrize("norm, eps", [("Linf", 0.1), ("L2", 1.0)])
@pytest.mark.parametrize("random_start", [True, False])
def test_art_pgd_fast_steps_equal_arts_own_pgd_bit_for_bit(norm, eps, random_start, mnist_mlp, correct):
    """The adapter's ART PGD (one-clamp projection, no per-step numpy) returns ART's own values."""
    from art.attacks.evasion import ProjectedGradientDescent as ArtPGD

    x, y = correct
    tm = ThreatModel(norm, eps, steps=7, random_start=random_start)
    ours = get_attack("art:PGD", tm, batch_size=64)
    assert type(ours.native(mnist_mlp, input_shape=(1, 28, 28), num_classes=10).attack).__name__ == \
        "ClampProjectionPGD"
    fast = ours(mnist_mlp, x, y, eps, seed=5)
    ours._attack_class = lambda: ArtPGD
    assert torch.equal(fast, ours(mnist_mlp, x, y, eps, seed=5))


def test_art_boundary_is_untargeted_and_apgd_uses_the_loss(mnist_mlp):
    kw = {"input_shape": (1, 28, 28), "num_classes": 10}
    boundary = get_attack("art:Boundary", ThreatModel("L2", 1.0, steps=5)).native(mnist_mlp, **kw).attack
    assert boundary.targeted is False and boundary.max_iter == 5
    apgd = get_attack("art:APGD-DLR", ThreatModel("Linf", 0.1, steps=5, restarts=2)).native(mnist_mlp, **kw).attack
    assert (apgd.max_iter, apgd.nb_random_init, apgd.eps_step) == (5, 2, pytest.approx(0.2))


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("torchattacks:PGD(alpha=0.5)", r"alpha is set from the threat model; change the ThreatModel field"),
        ("art:ProjectedGradientDescent(max_iter=5)", r"max_iter is set from the threat model"),
        ("foolbox:LinfPGD(rel_stepsize=0.1)", r"rel_stepsize is set from the threat model"),
        ("art:PGD(batch_size=64)", r"batch_size comes from the harness; pass get_attack\(\.\.\., batch_size=N\)"),
        ("foolbox:LinfPGD(momentum=0.9)", r"unknown override\(s\) momentum; it accepts: none"),
        ("art:DeepFool(overshoot=0.1)", r"unknown override\(s\) overshoot; it accepts: .*epsilon"),
        ("torchattacks:FGSM", r"torchattacks:FGSM attacks the Linf norm only, but the threat model says L2"),
        ("torchattacks:APGD(loss='margin')", r"supports loss 'ce', 'dlr' only"),
        ("foolbox:L2CarliniWagnerAttack(targeted=True)", None),
    ],
)
def test_overrides_and_norms_are_checked(spec, match):
    l2 = any(name in spec for name in ("FGSM", "Carlini", "DeepFool"))
    tm = ThreatModel("L2", 1.0) if l2 else ThreatModel("Linf", 0.1)
    if match is None:  # a ThreatModel field in the spec is allowed
        assert get_attack(spec, tm).threat_model.targeted is True
        return
    with pytest.raises(ValueError, match=match):
        get_attack(spec, tm)


def test_library_defaults_can_be_overridden(mnist_mlp):
    fb = get_attack("foolbox:DeepFool(candidates=3)", ThreatModel("L2", 1.0)).native(mnist_mlp)
    assert (fb.attack.candidates, fb.attack.overshoot) == (3, 0.02)
    ta = get_attack("torchattacks:CW(c=5.0)", ThreatModel("L2", 1.0, steps=4)).native(mnist_mlp)
    assert (ta.attack.c, ta.attack.steps) == (5.0, 4)


def test_norm_generic_names_pick_the_variant():
    assert get_attack("torchattacks:PGD", ThreatModel("L2", 1.0)).name == "torchattacks:PGDL2"
    assert get_attack("foolbox:PGD", ThreatModel("Linf", 0.1)).name == "foolbox:LinfPGD"
    assert get_attack("foolbox:DeepFool", ThreatModel("L2", 1.0)).name == "foolbox:L2DeepFoolAttack"
    assert get_attack("torchattacks:APGD-DLR", ThreatModel("Linf", 0.1)).threat_model.loss == "dlr"
    assert {get_attack(s, ThreatModel("Linf", 0.1)).family for s in
            ("torch:PGD", "torchattacks:PGD", "foolbox:PGD", "art:PGD")} == {"PGD"}


# --- quirks --------------------------------------------------------------------------------------------


def test_class_count_reaches_torchattacks_and_dlr_needs_enough_classes():
    torch.manual_seed(0)
    five = nn.Sequential(nn.Flatten(), nn.Linear(16, 5))
    x = torch.rand(4, 1, 4, 4)
    attack = get_attack("torchattacks:AutoAttack(n_queries=5)", ThreatModel("Linf", 0.1, steps=2))
    members = attack.native(five, num_classes=5).attack._autoattack.attacks
    assert [getattr(m, "n_target_classes", None) for m in members] == [None, 4, 4, None]
    assert [getattr(m, "steps", getattr(m, "n_queries", None)) for m in members] == [2, 2, 2, 5]
    _in_budget(x, attack(five, x), "Linf", 0.1)
    three = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(ValueError, match="at least 4 classes"):
        attack(three, x)
    with pytest.raises(ValueError, match="at least 3 classes"):
        get_attack("art:APGD-DLR", ThreatModel("Linf", 0.1))(nn.Sequential(nn.Flatten(), nn.Linear(16, 2)), x)


def test_torchattacks_accepts_a_model_without_parameters(capsys):
    class Fixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("w", torch.randn(16, 3, generator=torch.Generator().manual_seed(0)))

        def forward(self, x):
            return x.flatten(1) @ self.w

    x = torch.rand(5, 1, 4, 4)
    x_adv = get_attack("torchattacks:PGD", ThreatModel("Linf", 0.1, steps=3))(Fixed(), x)
    _in_budget(x, x_adv, "Linf", 0.1)
    assert "Failed to set device" not in capsys.readouterr().out
    assert (x_adv != x).any()


def test_torchattacks_other_bounds_and_flat_inputs_match_the_torch_backend():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.rand(16, 20) * 2 - 1
    for norm, eps, step in (("Linf", 0.2, 0.05), ("L2", 0.5, 0.1)):
        tm = ThreatModel(norm, eps, bounds=(-1, 1), steps=5, step_size=step, random_start=False)
        ours = get_attack("torch:PGD", tm)(model, x)
        theirs = get_attack("torchattacks:PGD", tm)(model, x)
        assert theirs.shape == x.shape and float(theirs.min()) >= -1 and float(theirs.max()) <= 1
        assert torch.allclose(ours, theirs, atol=1e-5), norm
    apgd = get_attack("torchattacks:APGD", ThreatModel("L2", 0.5, bounds=(-1, 1), steps=3))(model, x)
    _in_budget((x + 1) / 2, (apgd + 1) / 2, "L2", 0.25)


def test_seeded_torchattacks_leaves_the_global_rng_one_draw_ahead(correct, mnist_mlp):
    x, y = correct[0][:8], correct[1][:8]
    attack = get_attack("torchattacks:APGD", ThreatModel("Linf", 0.1, steps=3))
    torch.manual_seed(123)
    state = torch.get_rng_state()
    first = attack(mnist_mlp, x, y)
    after = torch.get_rng_state()
    torch.set_rng_state(state)
    torch.randint(2**31 - 1, ())  # the seed drawn for the library, nothing else
    assert torch.equal(torch.get_rng_state(), after)
    torch.manual_seed(123)
    assert torch.equal(attack(mnist_mlp, x, y), first)


def test_inputs_out_of_bounds_raise_a_clear_error_before_foolbox_asserts(mnist_mlp, correct):
    x = correct[0][:4].clone()
    x[0, 0, 0, 0] = 1.5
    with pytest.raises(ValueError, match=r"outside the threat model's bounds"):
        get_attack("foolbox:LinfPGD", ThreatModel("Linf", 0.1, steps=2))(mnist_mlp, x, correct[1][:4])


def test_art_and_foolbox_keep_the_model_in_float64(correct):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 10)).double()
    x, y = correct[0][:4], correct[1][:4]
    for spec in ("art:PGD", "art:HopSkipJump(max_eval=10, init_eval=5, init_size=10)", "foolbox:LinfPGD"):
        x_adv = get_attack(spec, ThreatModel("Linf", 0.1, steps=2))(model, x, y)
        _in_budget(x, x_adv, "Linf", 0.1)
        assert next(model.parameters()).dtype == torch.float64


def test_targeted_mode_reaches_targets_in_every_library(correct, mnist_mlp):
    x, y = correct[0][:32], correct[1][:32]
    target = (y + 1) % 10
    tm = ThreatModel("Linf", 0.25, steps=20, step_size=0.02, targeted=True, random_start=False)
    hits = {}
    for spec in ("torch:PGD", "torchattacks:PGD", "foolbox:LinfPGD", "art:PGD"):
        x_adv = get_attack(spec, tm)(mnist_mlp, x, y, target=target)
        hits[spec] = (mnist_mlp(x_adv).argmax(1) == target).float().mean().item()
    assert min(hits.values()) > 0.5 and max(hits.values()) - min(hits.values()) <= 1 / 32, hits
