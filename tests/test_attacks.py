"""The attack interface: specs, registry, the shared guards of Attack, make_attack, torch:PGD."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from relucap_plugin import ThreatModel, get_attack, list_attacks, make_attack, parse_attack
from relucap_plugin.adapters import LIBRARIES, load_adapter
from relucap_plugin.adapters.plain_torch import attack_loss, pgd
from relucap_plugin.attacks import Attack, library_status, perturbation_norm, project

LINF = ThreatModel("Linf", 0.1, steps=10, step_size=0.02, random_start=False)


@pytest.fixture(scope="module")
def batch(mnist5k, mnist_mlp):
    """64 test digits the trained MLP classifies correctly."""
    x, y = mnist5k[1].tensors
    keep = mnist_mlp(x[:100]).argmax(1) == y[:100]
    return x[:100][keep][:64], y[:100][keep][:64]


# --- specs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("torchattacks:PGD", ("torchattacks", "PGD", {})),
        ("Foolbox:LinfPGD", ("foolbox", "LinfPGD", {})),
        ("art:ProjectedGradientDescent(norm=2, batch_size=64)", ("art", "ProjectedGradientDescent",
                                                                  {"norm": 2, "batch_size": 64})),
        (" torchattacks:APGD-DLR(steps=10) ", ("torchattacks", "APGD-DLR", {"steps": 10})),
        ("torch:PGD(loss='margin', step_size=inf)", ("torch", "PGD", {"loss": "margin", "step_size": float("inf")})),
    ],
)
def test_parse_attack(spec, expected):
    assert parse_attack(spec) == expected


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ("PGD", "'library:Name'.*libraries: torch, torchattacks, foolbox, art"),
        ("torch:", "is not an attack name"),
        ("torch:PG D", "is not an attack name"),
        ("torch:PGD(10)", "overrides must be given by keyword"),
        ("torch:PGD(steps=__import__('os').getpid())", "is not a literal"),
        ("torch:PGD(steps=", "cannot parse"),
    ],
)
def test_bad_specs_are_rejected_without_evaluating(spec, match):
    with pytest.raises(ValueError, match=match):
        parse_attack(spec)


def test_unknown_library_lists_the_valid_ones():
    with pytest.raises(ValueError, match="unknown attack library 'cleverhans'; valid: torch, torchattacks, foolbox, art"):
        get_attack("cleverhans:PGD", LINF)


@pytest.mark.parametrize("library", list(LIBRARIES))
def test_unknown_attack_lists_the_valid_ones(library):
    names = sorted(load_adapter(library).ATTACKS, key=str.lower)
    with pytest.raises(ValueError, match=f"unknown {library} attack 'NoSuchAttack'; valid: {', '.join(names)}"):
        get_attack(f"{library}:NoSuchAttack", LINF)


def test_threat_model_overrides_change_the_attacks_copy_and_round_trip():
    attack = get_attack("torch:PGD(steps=3)", LINF, loss="margin")
    assert attack.threat_model == LINF.replace(steps=3, loss="margin")
    assert LINF.steps == 10
    assert attack.spec == "torch:PGD(loss='margin', steps=3)"
    again = get_attack(attack.spec, LINF)
    assert again.threat_model == attack.threat_model and again.name == "torch:PGD"
    moved = attack.with_threat_model(ThreatModel("L2", 1.0))
    assert (moved.threat_model.norm, moved.threat_model.steps) == ("L2", 3)


def test_aliases_carry_their_threat_model_changes():
    attack = get_attack("torch:pgd-dlr", LINF)
    assert (attack.name, attack.threat_model.loss, attack.family) == ("torch:PGD", "dlr", "PGD")
    assert get_attack("torch:FGM", ThreatModel("L2", 1.0)).family == "FGSM"


def test_torch_backend_has_no_library_overrides():
    with pytest.raises(ValueError, match=r"unknown override\(s\) alpha; it accepts: none"):
        get_attack("torch:PGD(alpha=0.1)", LINF)


def test_list_attacks_and_status():
    listed = list_attacks()
    assert listed["torch"] == ["APGD", "APGD-T", "FGSM", "PGD", "Square"]
    for library in ("torchattacks", "foolbox", "art"):
        assert listed[library] == sorted(load_adapter(library).ATTACKS, key=str.lower)
    assert {"PGD", "APGD", "AutoAttack", "Square", "CW", "DeepFool", "FGSM"} <= set(listed["torchattacks"])
    assert {"LinfPGD", "L2PGD", "BoundaryAttack", "HopSkipJumpAttack"} <= set(listed["foolbox"])
    assert {"ProjectedGradientDescent", "AutoAttack", "HopSkipJump", "BoundaryAttack"} <= set(listed["art"])
    status = library_status()
    assert status["torch"] == "built in" and status["torchattacks"].startswith("installed ")


# --- imports -----------------------------------------------------------------------------------


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_importing_the_package_and_listing_attacks_imports_no_attack_library():
    out = _run(
        """
        import sys
        import relucap_plugin
        from relucap_plugin import ThreatModel, get_attack, list_attacks
        list_attacks()
        get_attack("torch:PGD", ThreatModel("Linf", 0.1))
        print(sorted(m for m in sys.modules if m.split(".")[0] in ("art", "foolbox", "torchattacks", "git")))
        """
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_missing_libraries_name_the_extra():
    specs = {"torchattacks": "torchattacks:PGD", "foolbox": "foolbox:LinfPGD", "art": "art:ProjectedGradientDescent"}
    out = _run(
        f"""
        import sys
        for module in {list(specs)!r}:
            sys.modules[module] = None  # the import fails as if the library were not installed
        from relucap_plugin import ThreatModel, get_attack, list_attacks
        from relucap_plugin.attacks import library_status
        for library, spec in {specs!r}.items():
            print(library, list_attacks()[library], library_status()[library])
            try:
                get_attack(spec, ThreatModel("Linf", 0.1))
            except ImportError as exc:
                print("ImportError:", exc)
        """
    )
    assert out.returncode == 0, out.stderr
    for library in specs:
        hint = f'pip install "relucap-plugin[{library}]"'
        assert f"{library} [] missing: {hint}" in out.stdout
        assert f"ImportError: attacks from {library!r} need the" in out.stdout
    assert out.stdout.count("ImportError:") == 3 and out.stdout.count("relucap-plugin[") == 6


# --- the shared guards ---------------------------------------------------------------------------


class _Recorder(nn.Module):
    """Logits from a fixed linear map; records the mode and grad mode of every forward."""

    def __init__(self, classes: int = 10):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(16, classes)
        self.bn = nn.BatchNorm1d(16)
        self.seen: list[tuple[bool, bool]] = []

    def forward(self, x):
        self.seen.append((self.training, torch.is_grad_enabled()))
        return self.fc(self.bn(x.flatten(1)))


def test_caller_state_is_restored_and_gradients_flow_under_no_grad():
    model = _Recorder()
    model.train()
    model.bn.eval()  # mixed modes must survive
    model.fc.bias.requires_grad_(False)
    model.fc.weight.grad = torch.full_like(model.fc.weight, 7.0)
    running_mean = model.bn.running_mean.clone()
    x = torch.rand(8, 1, 4, 4)
    with torch.no_grad():
        x_adv = get_attack("torch:PGD", LINF)(model, x)
    assert not any(training for training, _ in model.seen)
    assert sum(grad for _, grad in model.seen) == LINF.steps  # one gradient forward per step
    assert model.training and not model.bn.training and model.fc.training
    assert model.fc.weight.requires_grad and not model.fc.bias.requires_grad
    assert torch.equal(model.fc.weight.grad, torch.full_like(model.fc.weight, 7.0))
    assert model.fc.bias.grad is None
    assert torch.equal(model.bn.running_mean, running_mean)
    assert (x_adv - x).abs().max() > 0


def test_output_matches_input_dtype_and_attack_runs_in_model_dtype():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3)).double()
    x = torch.rand(5, 1, 4, 4)  # float32 input, float64 model
    x_adv = get_attack("torch:PGD", LINF)(model, x)
    assert x_adv.dtype == torch.float32 and x_adv.shape == x.shape and x_adv.device == x.device


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda a, m, x, y: a(m, x * 2, y), ValueError, r"outside the threat model's bounds \(0.0, 1.0\).*normalisation inside the model"),
        (lambda a, m, x, y: a(m, x, y + 10), ValueError, r"labels must be in \[0, 9\]"),
        (lambda a, m, x, y: a(m, x, y.float()), ValueError, "y must be integer class labels"),
        (lambda a, m, x, y: a(m, x.flatten(), y), ValueError, "non-empty floating tensor of shape"),
        (lambda a, m, x, y: a(m, x.numpy(), y), TypeError, "x must be a torch.Tensor"),
        (lambda a, m, x, y: a(m, x, y, eps=-1), ValueError, "eps must be finite and >= 0"),
        (lambda a, m, x, y: a(lambda t: t, x, y), TypeError, "model must be a torch.nn.Module"),
    ],
)
def test_bad_calls(call, error, match, mnist_mlp, batch):
    with pytest.raises(error, match=match):
        call(get_attack("torch:PGD", LINF), mnist_mlp, *batch)


def test_model_returning_a_tuple_gets_a_hint(batch):
    class TwoHeads(nn.Module):
        def forward(self, x):
            return x.flatten(1)[:, :10], x

    with pytest.raises(TypeError, match="must return logits of shape .* got tuple; wrap a model"):
        get_attack("torch:PGD", LINF)(TwoHeads(), batch[0])


def test_eps_must_be_given_when_the_threat_model_has_several(mnist_mlp, batch):
    with pytest.raises(ValueError, match=r"budgets \(0.1, 0.2\); pass eps="):
        get_attack("torch:PGD", LINF.with_eps((0.1, 0.2)))(mnist_mlp, *batch)


def test_zero_budget_returns_the_input(mnist_mlp, batch):
    x, y = batch
    assert torch.equal(get_attack("torch:PGD", LINF)(mnist_mlp, x, y, eps=0.0), x)


def test_dlr_needs_three_classes_and_targeted_dlr_four():
    x = torch.rand(4, 1, 4, 4)
    two = nn.Sequential(nn.Flatten(), nn.Linear(16, 2))
    three = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    with pytest.raises(ValueError, match="at least 3 classes .* this one has 2. Use loss='ce'"):
        get_attack("torch:PGD-DLR", LINF)(two, x)
    with pytest.raises(ValueError, match="at least 4 classes"):
        get_attack("torch:PGD-DLR", LINF.replace(targeted=True))(three, x)
    assert get_attack("torch:PGD-DLR", LINF)(three, x).shape == x.shape


# --- torch:PGD -----------------------------------------------------------------------------------


@pytest.mark.parametrize("norm,eps", [("Linf", 0.1), ("L2", 1.0)])
@pytest.mark.parametrize("loss", ["ce", "margin", "dlr"])
def test_torch_pgd_stays_in_budget_and_fools_the_trained_model(norm, eps, loss, mnist_mlp, batch):
    x, y = batch
    tm = ThreatModel(norm, eps, steps=10, loss=loss)
    x_adv = get_attack("torch:PGD", tm)(mnist_mlp, x, y, seed=0)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    assert 0 <= float(x_adv.min()) and float(x_adv.max()) <= 1
    assert float(perturbation_norm(x, x_adv, norm).max()) <= eps * (1 + 1e-5)
    fooled = (mnist_mlp(x_adv).argmax(1) != y).float().mean()
    assert fooled > 0.5  # every input starts correctly classified


def test_fgsm_is_one_full_step():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    x = torch.full((6, 1, 4, 4), 0.5)
    x_adv = get_attack("torch:FGSM", LINF)(model, x)
    assert torch.allclose((x_adv - x).abs(), torch.full_like(x, 0.1))


def test_seed_makes_random_starts_reproducible_without_touching_global_rng(mnist_mlp, batch):
    attack = get_attack("torch:PGD", LINF.replace(random_start=True, steps=2))
    state = torch.get_rng_state()
    a = attack(mnist_mlp, *batch, seed=1)
    b = attack(mnist_mlp, *batch, seed=1)
    c = attack(mnist_mlp, *batch, seed=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_targeted_pgd_reaches_the_target(mnist_mlp, batch):
    x, y = batch
    target = (y + 1) % 10
    attack = get_attack("torch:PGD", ThreatModel("Linf", 0.2, steps=20, targeted=True, random_start=False))
    hit = (mnist_mlp(attack(mnist_mlp, x, y, target=target)).argmax(1) == target).float().mean()
    assert hit > 0.5
    least_likely = mnist_mlp(x).scatter(1, y[:, None], float("inf")).argmin(1)
    default = attack(mnist_mlp, x, y)
    assert (mnist_mlp(default).argmax(1) == least_likely).float().mean() > 0.3
    with pytest.raises(ValueError, match="target classes must differ from the labels"):
        attack(mnist_mlp, x, y, target=y)


def test_restarts_rerun_only_samples_not_yet_fooled(mnist_mlp, batch):
    x, y = batch
    calls = []

    def never(model, x, y, eps):
        calls.append(len(x))
        return x

    tm = LINF.replace(restarts=3)
    make_attack(never, "never", tm)(mnist_mlp, x, y)
    assert calls == [len(x)] * 3
    strong = get_attack("torch:PGD", ThreatModel("Linf", 0.3, steps=20))
    fooled = []

    def half(model, x, y, eps):
        fooled.append(len(x))
        out = x.clone()
        out[: len(x) // 2] = strong(model, x[: len(x) // 2], y[: len(x) // 2], eps)
        return out

    make_attack(half, "half", tm.replace(eps=(0.3,)))(mnist_mlp, x, y)
    assert fooled == [len(x), len(x) - len(x) // 2, len(x) - len(x) // 2 - (len(x) - len(x) // 2) // 2]


def test_hand_written_loop_and_torch_backend_agree_exactly(mnist_mlp, batch):
    x, y = batch
    x_adv = x.clone()
    for _ in range(10):
        x_adv.requires_grad_(True)
        grad, = torch.autograd.grad(nn.functional.cross_entropy(mnist_mlp(x_adv), y, reduction="sum"), x_adv)
        x_adv = torch.min(torch.max(x_adv.detach() + 0.02 * grad.sign(), x - 0.1), x + 0.1).clamp(0, 1)
    ours = get_attack("torch:PGD", LINF)(mnist_mlp, x, y)
    assert torch.allclose(ours, x_adv, atol=1e-6)


def test_losses_point_the_right_way():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0]])
    y, t = torch.tensor([0]), torch.tensor([2])
    assert attack_loss(logits, y, "margin").item() == pytest.approx(-2.0)
    assert attack_loss(logits, y, "margin", t).item() == pytest.approx(-3.0)
    assert attack_loss(logits, y, "dlr").item() == pytest.approx(-2.0 / 3.0)
    assert attack_loss(logits, y, "dlr", t).item() == pytest.approx(-3.0 / 3.5)
    assert attack_loss(logits, y, "ce").item() > 0 > attack_loss(logits, y, "ce", t).item()


def test_project_onto_balls():
    x = torch.full((2, 1, 2, 2), 0.5)
    far = x + torch.tensor([0.4, -0.3]).view(2, 1, 1, 1)
    assert torch.allclose(perturbation_norm(x, project(x, far, 0.1, "Linf", (0, 1)), "Linf"), torch.tensor([0.1, 0.1]))
    assert torch.allclose(perturbation_norm(x, project(x, far, 0.2, "L2", (0, 1)), "L2"), torch.tensor([0.2, 0.2]))
    near = x + 0.01
    assert torch.equal(project(x, near, 0.2, "L2", (0, 1)), near)


# --- user attacks --------------------------------------------------------------------------------


def test_make_attack_runs_under_the_guards_and_is_not_projected(mnist_mlp, batch):
    x, y = batch
    seen = {}

    def broken(model, x, y, eps):
        seen["training"] = model.training
        seen["grad"] = torch.is_grad_enabled()
        return x + 2 * eps  # out of budget and out of bounds on purpose

    attack = make_attack(broken, "broken", LINF)
    assert isinstance(attack, Attack) and attack.name == "custom:broken" and attack.spec == "custom:broken"
    mnist_mlp.train()
    try:
        with torch.no_grad():
            out = attack(mnist_mlp, x, y)
    finally:
        training = mnist_mlp.training
        mnist_mlp.eval()
    assert seen == {"training": False, "grad": True} and training
    assert torch.allclose(out, x + 0.2)  # returned as is, for the evaluation to catch


def test_make_attack_needs_a_threat_model_before_running(mnist_mlp, batch):
    attack = make_attack(lambda m, x, y, eps: x)
    assert attack.name == "custom:<lambda>"
    with pytest.raises(ValueError, match="has no threat model; use attack.with_threat_model"):
        attack(mnist_mlp, *batch)
    assert torch.equal(attack.with_threat_model(LINF)(mnist_mlp, *batch), batch[0])
    with pytest.raises(TypeError, match="needs a callable"):
        make_attack(3)


def test_make_attack_rejects_non_tensor_results(mnist_mlp, batch):
    with pytest.raises(TypeError, match="returned ndarray, not a tensor"):
        make_attack(lambda m, x, y, eps: x.numpy(), "np", LINF)(mnist_mlp, *batch)


def test_native_torch_attack_is_the_pgd_function(mnist_mlp, batch):
    native = get_attack("torch:PGD", LINF).native(mnist_mlp)
    x, y = batch
    assert native.model is mnist_mlp and native.call_kwargs == {"eps": 0.1}
    assert torch.equal(native.attack(mnist_mlp, x, y, 0.1), pgd(mnist_mlp, x, y, 0.1, steps=10, step_size=0.02,
                                                               random_start=False))
