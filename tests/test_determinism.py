"""Determinism and the caller's state.

Same seed -> bit-identical results on CPU (the evaluate() test of tests/test_evaluation.py covers
torchattacks, ART and user attacks on the trained MLP, tests/test_experiment.py the demo path;
here Foolbox, the torch backend and a seeded torchattacks class, down to the JSONL file).
After every public call the caller's model modes, device, dtypes, ``requires_grad`` flags,
``.grad`` tensors and the global RNGs of torch, numpy and ``random`` are what they were. Attack
calls are made with ``seed=``: unseeded calls draw their random starts from the global RNG like
any torch random operation (documented in Attack.__call__).
"""

import json
import random

import numpy as np
import pytest
import torch

from relucap_plugin.activations import CappedReLU
from relucap_plugin.attacks import get_attack
from relucap_plugin.evaluation import evaluate
from relucap_plugin.models import mlp
from relucap_plugin.surgery import calibrate_caps, cap_relus, find_relus
from relucap_plugin.threat import EvalConfig, ThreatModel

TM = ThreatModel("Linf", eps=(0.05, 0.1), steps=3)


def setup(n=24):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = mlp((16, 8), in_shape=(1, 4, 4), num_classes=3).eval()
        x = torch.rand(n, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def test_same_seed_gives_a_bit_identical_table_and_file(tmp_path):
    model, x, y = setup()
    attacks = ["foolbox:LinfPGD", "torch:PGD", "torchattacks:Square"]
    cfg = EvalConfig(batch_size=10, seed=7)
    runs = [evaluate(model, (x, y), attacks, TM, cfg, out=tmp_path / f"{i}.jsonl", progress=False)
            for i in range(2)]
    assert runs[0].outcomes() == runs[1].outcomes()
    no_time = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert no_time(runs[0].summary()) == no_time(runs[1].summary())
    files = [[json.loads(line) for line in (tmp_path / f"{i}.jsonl").read_text().splitlines()[1:]]
             for i in range(2)]
    assert no_time(files[0]) == no_time(files[1]) and len(files[0]) == 24 * 3 * 2


# ---------------------------------------------------------------------------- caller state
def caller_state(model):
    return {
        "modes": [m.training for m in model.modules()],
        "devices": [p.device for p in model.parameters()],
        "dtypes": [t.dtype for t in model.state_dict().values()],
        "requires_grad": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
    }


def global_rng():
    return torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()


def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return np.array_equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(u, v) for u, v in zip(a, b))
    return a == b


ATTACK_TM = ThreatModel("Linf", eps=0.1, steps=3)


def attack_call(spec, tm=ATTACK_TM):
    def call(model, x, y):
        get_attack(spec, tm)(model, x, y, seed=0)
    return call


PUBLIC_CALLS = {
    "evaluate": lambda m, x, y: evaluate(m, (x, y), ["torch:PGD", "torchattacks:PGD"], TM,
                                         EvalConfig(batch_size=8), progress=False),
    "torch:PGD": attack_call("torch:PGD"),
    "torchattacks:PGD": attack_call("torchattacks:PGD"),
    "torchattacks:APGD": attack_call("torchattacks:APGD"),
    "foolbox:LinfPGD": attack_call("foolbox:LinfPGD"),
    "art:ProjectedGradientDescent": attack_call("art:ProjectedGradientDescent"),
    "find_relus": lambda m, x, y: find_relus(m, x[:2]),
    "cap_relus (copy)": lambda m, x, y: cap_relus(m, 0.5, example_input=x[:2]),
    "calibrate_caps": lambda m, x, y: calibrate_caps(m, x),
}


@pytest.fixture
def model_with_state():
    model, x, y = setup()
    model[2].train()  # mixed modes
    model[1].weight.requires_grad_(False)
    model[3].weight.grad = torch.ones_like(model[3].weight)
    return model, x, y


@pytest.mark.parametrize("call", PUBLIC_CALLS.values(), ids=PUBLIC_CALLS.keys())
def test_public_calls_leave_the_callers_model_and_rng_alone(call, model_with_state):
    model, x, y = model_with_state
    torch.manual_seed(123)
    np.random.seed(123)
    random.seed(123)
    before, rng = caller_state(model), global_rng()
    call(model, x, y)
    assert same(caller_state(model), before)
    assert same(global_rng(), rng)


def test_audit_and_train_leave_the_global_rng_alone():
    """train() changes the weights and leaves eval mode (documented); audit() only reads."""
    from relucap_plugin.diagnostics import audit
    from relucap_plugin.training import train

    model, x, y = setup(n=16)
    model[2] = CappedReLU(0.5)
    torch.manual_seed(5)
    rng = global_rng()
    before = caller_state(model)
    audit(model, (x, y), ThreatModel("Linf", eps=0.1, steps=2), EvalConfig(batch_size=16))
    assert same(caller_state(model), before)
    assert same(global_rng(), rng)
    train(model, (x, y), epochs=1, batch_size=8, device="cpu", progress=False)
    assert same(global_rng(), rng)
