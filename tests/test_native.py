"""Library objects both ways (issue 17): configured torchattacks / ART / Foolbox objects passed to
``evaluate``, native objects handed out by ``Attack.native`` leaving the model as found, and runs
where nothing could be measured refusing to return normally."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

from relucap_plugin import EvalConfig, ThreatModel, evaluate, get_attack, make_attack
from relucap_plugin.evaluation import AttackFailedError

TM = ThreatModel("Linf", 0.1, steps=10)


@pytest.fixture(scope="module")
def data(mnist5k):
    x, y = mnist5k[1].tensors
    return x[:48], y[:48]


def _art_pgd(model):
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    clf = PyTorchClassifier(model, loss=nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
                            clip_values=(0.0, 1.0))
    return ProjectedGradientDescent(clf, norm=np.inf, eps=0.1, eps_step=TM.step_size_for(0.1), max_iter=10,
                                    num_random_init=1, verbose=False)


def _torchattacks_apgd(model):
    import torchattacks

    return torchattacks.APGD(model, norm="Linf", eps=0.1, steps=10, n_restarts=1, loss="ce")


def _foolbox_pgd(model):
    import foolbox

    return foolbox.attacks.LinfPGD(abs_stepsize=TM.step_size_for(0.1), steps=10, random_start=True), [0.1]


@pytest.mark.parametrize(
    ("build", "spec", "read"),
    [
        (_torchattacks_apgd, "torchattacks:APGD", "norm='Linf', eps=0.1, steps=10, restarts=1, loss='ce'"),
        (_art_pgd, "art:PGD", "norm='Linf', eps=0.1, step_size=0.025, steps=10, targeted=False, restarts=1"),
        (_foolbox_pgd, "foolbox:PGD", "step_size=0.025, steps=10, random_start=True, eps=0.1"),
    ],
    ids=["torchattacks-APGD", "art-PGD", "foolbox-PGD"],
)
def test_a_native_object_gives_the_numbers_of_its_spec_string(build, spec, read, mnist_mlp, data, capsys):
    cfg = EvalConfig(batch_size=24, seed=3)
    by_spec = evaluate(mnist_mlp, data, [spec], TM, cfg, progress=False)
    by_object = evaluate(mnist_mlp, data, [build(mnist_mlp)], TM, cfg, progress=True)
    assert by_object.attacks == by_spec.attacks
    assert by_object.robust_accuracy(by_spec.attacks[0], 0.1) == by_spec.robust_accuracy(by_spec.attacks[0], 0.1)
    assert by_object.outcomes() == by_spec.outcomes()
    assert by_spec.robust_accuracy(by_spec.attacks[0], 0.1) < by_spec.clean_accuracy()
    err = capsys.readouterr().err
    assert "read from the" in err and read in err and f"evaluated as {by_spec.attacks[0]}" in err


def test_settings_read_from_an_object_show_in_its_spec(mnist_mlp, data):
    import torchattacks

    pgd = torchattacks.PGD(mnist_mlp, eps=0.1, alpha=0.01, steps=3, random_start=False)
    res = evaluate(mnist_mlp, data, pgd, TM, EvalConfig(batch_size=48), progress=False)
    assert res.attacks == ["torchattacks:PGD(random_start=False, step_size=0.01, steps=3)"]


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda m: __import__("torchattacks").PGD(m, eps=8 / 255), r"has eps 0.0313725, but the threat model's budgets are 0.1"),
        (lambda m: (__import__("foolbox").attacks.LinfPGD(), [0.1, 0.3]), r"has eps 0.1, 0.3, but .* are 0.1"),
        (lambda m: __import__("torchattacks").APGD(m, norm="L2", eps=0.1), r"has norm='L2', but the threat model says norm='Linf'"),
        (lambda m: __import__("torchattacks").AutoAttack(m, eps=0.1), r"cannot be read back faithfully.*'AutoAttack'"),
        (lambda m: __import__("torchattacks").FFGSM(m, eps=0.1), r"FFGSM objects are not supported; supported classes: APGD"),
    ],
    ids=["eps", "foolbox-epsilons", "norm", "autoattack", "unsupported-class"],
)
def test_a_native_object_that_disagrees_with_the_threat_model_is_refused(make, match, mnist_mlp, data):
    with pytest.raises((ValueError, TypeError), match=match):
        evaluate(mnist_mlp, data, make(mnist_mlp), TM, progress=False)


def _bn_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 26 * 26, 10))


def _run_native(library, native, x, y):
    if library == "torchattacks":
        return native.attack(x, y)
    if library == "art":
        return torch.from_numpy(native.attack.generate(x.numpy(), y.numpy()))
    return native.attack(native.model, x, y, **native.call_kwargs)[1]


@pytest.mark.parametrize("library, spec", [("torchattacks", "torchattacks:PGD"), ("art", "art:PGD"),
                                           ("foolbox", "foolbox:PGD")])
@pytest.mark.parametrize("mode", ["eval", "mixed"])
def test_native_objects_leave_the_model_as_they_found_it(library, spec, mode):
    """torchattacks put an eval model (BatchNorm included) in train mode; ART left a train model in
    eval mode; with the modes restored, BatchNorm's running statistics do not move."""
    net = _bn_net()
    if mode == "eval":
        net.eval()
    else:
        net.train()
        net[1].eval()  # a frozen BatchNorm inside a model in training
    modes = [m.training for m in net.modules()]
    stats = copy.deepcopy(net[1].state_dict())
    x, y = torch.rand(4, 1, 28, 28), torch.arange(4)
    native = get_attack(spec, ThreatModel("Linf", 0.1, steps=2)).native(net, input_shape=(1, 28, 28), num_classes=10)
    x_adv = _run_native(library, native, x, y)
    assert x_adv.shape == x.shape and float((x_adv - x).abs().max()) <= 0.1 + 1e-6
    assert [m.training for m in net.modules()] == modes
    assert all(torch.equal(v, net[1].state_dict()[k]) for k, v in stats.items())


def test_a_run_where_every_attack_fails_raises_with_its_rows(mnist_mlp, data, tmp_path):
    def wrong_signature(model, x):
        return x

    out = tmp_path / "r.jsonl"
    with pytest.warns(RuntimeWarning), pytest.raises(AttackFailedError, match="every attack failed on all") as info:
        evaluate(mnist_mlp, data, make_attack(wrong_signature), TM, out=out, progress=False)
    assert info.value.results.failed() and str(out) in str(info.value)
    assert len(out.read_text().splitlines()) > 1


def test_evaluate_with_x_and_y_apart_shows_the_pair_form(mnist_mlp, data):
    with pytest.raises(TypeError, match=r"evaluate\(model, \(x, y\), attacks, threat_model"):
        evaluate(mnist_mlp, data[0], data[1], ["torch:PGD"], TM)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_a_checkpoint_carries_its_caps(capped_mlp, mnist5k, tmp_path, suffix):
    """A capped model's checkpoint loaded into the plain architecture was evaluated silently as the
    ReLU model; now it is refused, or restored with restore_caps=True to the same logits."""
    from relucap_plugin import load_checkpoint, mlp, save_checkpoint

    path = save_checkpoint(capped_mlp, tmp_path / f"capped{suffix}")
    plain = mlp((256, 32, 256))
    before = copy.deepcopy(plain.state_dict())
    with pytest.raises(ValueError, match=r"saved from a model with caps this model lacks \(4: cap 0.1 "
                                         r"\(model: ReLU\)\).*restore_caps=True"):
        load_checkpoint(plain, path)
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in before.items())
    assert type(plain[4]).__name__ == "ReLU"
    load_checkpoint(plain, path, restore_caps=True)
    x = mnist5k[1].tensors[0][:64]
    assert torch.equal(plain.eval()(x), capped_mlp(x))
    everywhere = mlp((256, 32, 256), "capped_relu(cap=0.1)")  # extra caps are the model's own choice
    load_checkpoint(everywhere, path)


def test_a_checkpoint_carries_caps_kept_outside_the_state_dict(tmp_path):
    """cap_relus(..., quantizable=True) caps with forward hooks, which a state dict does not
    hold: loaded into the plain architecture, the checkpoint gave the uncapped model without a
    word. Now it is refused, restored to the same logits, or loaded into a model capped alike."""
    from relucap_plugin import cap_relus, load_checkpoint, mlp, save_checkpoint

    torch.manual_seed(0)
    capped = cap_relus(mlp((8,), in_shape=(1, 4, 4), num_classes=3), 0.01, quantizable=True)[0]
    path = save_checkpoint(capped, tmp_path / "quantizable.safetensors")
    plain = mlp((8,), in_shape=(1, 4, 4), num_classes=3)
    with pytest.raises(ValueError, match=r"caps this model lacks \(2: cap 0.01 \(model: ReLU\)\)"):
        load_checkpoint(plain, path)
    x = torch.rand(8, 1, 4, 4)
    assert torch.equal(load_checkpoint(plain, path, restore_caps=True)(x), capped(x))
    alike = cap_relus(mlp((8,), in_shape=(1, 4, 4), num_classes=3), 0.01, quantizable=True)[0]
    assert torch.equal(load_checkpoint(alike, path)(x), capped(x))
