"""The bad-input cases of docs/errors.md that no module's own test file covers.

Each case asserts the exception type, that the message names the problem and the fix, and that
the caller's model (weights, modes, ``requires_grad`` flags) is unchanged. The catalogue in
docs/errors.md lists every case with the test that covers it, here or in the module's tests.
"""

import copy
import math
import re

import pytest
import torch
from torch import nn

from relucap_plugin.attacks import get_attack
from relucap_plugin.cli import main
from relucap_plugin.evaluation import evaluate
from relucap_plugin.models import mlp
from relucap_plugin.threat import EvalConfig, ThreatModel
from relucap_plugin.training import load_checkpoint, save_checkpoint

TM = ThreatModel("Linf", eps=0.1, steps=2)


def tiny(seed=0):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return mlp((16,), in_shape=(1, 4, 4), num_classes=3)


def state(model):
    return (
        {k: v.clone() for k, v in model.state_dict().items()},
        [m.training for m in model.modules()],
        [p.requires_grad for p in model.parameters()],
        [p.dtype for p in model.parameters()],
    )


def assert_unchanged(before, model):
    after = state(model)
    assert before[0].keys() == after[0].keys()
    assert all(torch.equal(before[0][k], after[0][k]) for k in before[0])
    assert before[1:] == after[1:]


@pytest.fixture
def model():
    net = tiny()
    net[2].train()  # a mixed mode the error paths must keep
    net[1].weight.requires_grad_(False)
    return net


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.rand(6, 1, 4, 4, generator=g), torch.randint(0, 3, (6,), generator=g)


class NaNLogits(nn.Module):
    """Returns NaN logits for inputs whose first pixel is above ``above`` (all by default)."""

    def __init__(self, above=-1.0):
        super().__init__()
        self.net, self.above = tiny(), above

    def forward(self, x):
        out = self.net(x)
        bad = x.flatten(1)[:, 0] > self.above
        return torch.where(bad[:, None], torch.full_like(out, math.nan), out)


# ------------------------------------------------------------------------- evaluate()
@pytest.mark.parametrize(
    "mutate, error, problem, fix",
    [
        (lambda x, y: (x[:0], y[:0]), ValueError, "empty", "at least one"),
        (lambda x, y: ((x * 255).to(torch.uint8), y), TypeError, "uint8", r"x.float\(\) / 255"),
        (lambda x, y: (x[..., :2], y), ValueError, r"shape \(4, 1, 4, 2\)", "shape the model expects"),
        (lambda x, y: (x.index_fill(0, torch.tensor([2]), math.nan), y), ValueError,
         r"NaN/inf values in 1 sample\(s\) \(positions \[2\]\)", "nan_to_num"),
        (lambda x, y: (x, y - 1), ValueError, r"labels must be in \[0, 2\]", "the model has 3 outputs"),
        (lambda x, y: (x, y.float()), TypeError, "integer class labels", "one-hot|long|int"),
    ],
    ids=["empty", "uint8", "wrong-shape", "nan-data", "negative-label", "float-labels"],
)
def test_evaluate_refuses_bad_data(mutate, error, problem, fix, model, data):
    before = state(model)
    with pytest.raises(error, match=problem) as info:
        evaluate(model, mutate(*data), "torch:FGSM", TM, EvalConfig(batch_size=4), progress=False)
    assert re.search(fix, str(info.value)), str(info.value)
    assert_unchanged(before, model)


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        ({"model": lambda x: x}, TypeError, "model must be a torch.nn.Module"),
        ({"attacks": []}, ValueError, "non-empty list of specs"),
        ({"attacks": [3]}, TypeError, "pass a spec string, an Attack or a function"),
        ({"config": "fast"}, TypeError, "config must be an EvalConfig"),
        ({"config": {"batchsize": 4}}, ValueError, r"unknown EvalConfig field\(s\) \['batchsize'\]"),
        ({"threat_model": {"norm": "Linf", "eps": 0.1, "epsilon": 1}}, ValueError, "unknown ThreatModel field"),
        ({"resume": "yes"}, TypeError, "resume must be True or False"),
        ({"attacks": "torch:NoSuch"}, ValueError, "unknown torch attack 'NoSuch'; valid: APGD, APGD-T, FGSM, PGD"),
        ({"attacks": "cleverhans:PGD"}, ValueError, "unknown attack library 'cleverhans'; valid: torch, "),
    ],
    ids=["not-a-module", "no-attacks", "attack-type", "config-type", "config-field", "tm-field",
         "resume", "unknown-attack", "unknown-library"],
)
def test_evaluate_refuses_bad_arguments(kwargs, error, words, model, data):
    before = state(model)
    args = {"model": model, "data": data, "attacks": "torch:FGSM", "threat_model": TM, **kwargs}
    with pytest.raises(error, match=words):
        evaluate(**args, progress=False)
    assert_unchanged(before, model)


def test_non_finite_clean_logits_are_an_error_not_a_robustness_number(data):
    net = NaNLogits()
    before = state(net)
    with pytest.raises(ValueError, match=r"non-finite logits \(NaN/inf\) on 6 of 6 clean inputs.*check its weights"):
        evaluate(net, data, "torch:FGSM", TM, progress=False)
    with pytest.raises(ValueError, match="non-finite logits"):
        get_attack("torch:PGD", TM)(net, *data)
    assert_unchanged(before, net)


def test_non_finite_logits_on_adversarial_examples_are_flagged_never_robust(data):
    """Clean inputs are fine; the attack moves the first pixel up where the model gives NaN."""
    net = NaNLogits(above=0.95)
    x, y = data
    x = x.clone()
    x[:, 0, 0, 0] = 0.5
    y = net(x).argmax(1)  # every sample classified correctly clean

    def push_first_pixel(model, x, y, eps):
        x_adv = x.clone()
        x_adv[:3, 0, 0, 0] = 1.0  # within eps=0.6 of 0.5, into the NaN region
        return x_adv

    res = evaluate(net, (x, y), push_first_pixel, ThreatModel("Linf", eps=0.6), progress=False)
    rows = sorted(res.rows, key=lambda r: r["sample"])
    flagged = [r for r in rows if r["status"] == "violation"]
    assert [r["sample"] for r in flagged] == [0, 1, 2]
    assert all("NaN/inf logits" in r["reason"] and r["adv_pred"] is None for r in flagged)
    assert all(r["adv_correct"] is False for r in flagged)
    assert res.robust_accuracy("custom:push_first_pixel", 0.6) == 0.5
    assert "failed verification and count as not robust" in res.table()


@pytest.mark.parametrize(
    "spec, tm",
    [("torchattacks:APGD", TM), ("foolbox:BoundaryAttack", ThreatModel("L2", eps=0.5, steps=2)),
     ("art:SquareAttack", TM)],
)
def test_half_precision_model_with_an_attack_needing_float32(spec, tm, data):
    net = tiny().half()
    before = state(net)
    words = rf"{spec} needs a float32/float64 model \(its library fails in float16\).*\.float\(\)"
    with pytest.raises(TypeError, match=words):
        evaluate(net, data, spec, tm, progress=False)
    with pytest.raises(TypeError, match=words):
        get_attack(spec, tm)(net, *data)
    assert_unchanged(before, net)
    # attacks that run in half precision still do
    assert get_attack("torch:PGD", TM)(net, *data).dtype == torch.float32


def test_the_float32_copy_the_message_suggests_runs(data):
    net = tiny().half()
    x_adv = get_attack("torchattacks:APGD", TM)(copy.deepcopy(net).float(), *data, seed=0)
    assert (x_adv - data[0]).abs().max() <= 0.1 + 1e-6


def test_bfloat16_model_with_art():
    net = tiny().to(torch.bfloat16)
    with pytest.raises(TypeError, match=r"art:FastGradientMethod needs a float16/float32/float64 model"):
        get_attack("art:FastGradientMethod", TM)(net, torch.rand(2, 1, 4, 4))


# ------------------------------------------------------------------------ attack calls
@pytest.mark.parametrize(
    "call, words",
    [
        (lambda a, m, x, y: a(m, x, y, eps=1.5), r"Linf eps 1.5 exceeds the input range 1.0.*Use eps <= 1.0"),
        (lambda a, m, x, y: a(m, x.index_fill(0, torch.tensor([0]), math.inf), y), r"x holds NaN/inf.*nan_to_num"),
        (lambda a, m, x, y: a(m, x[..., :2], y), r"shape \(6, 1, 4, 2\).*shape the model expects"),
    ],
    ids=["eps-over-range", "inf-input", "wrong-shape"],
)
def test_attack_call_refuses_bad_input(call, words, model, data):
    before = state(model)
    with pytest.raises(ValueError, match=words):
        call(get_attack("torch:PGD", TM), model, *data)
    assert_unchanged(before, model)


def test_corrupt_safetensors_checkpoint(tmp_path, model):
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    before = state(model)
    with pytest.raises(ValueError, match="not a valid safetensors file.*save it with save_checkpoint"):
        load_checkpoint(model, path)
    assert_unchanged(before, model)


# ------------------------------------------------------------------------------- CLI
@pytest.mark.parametrize(
    "argv, words",
    [
        (["evaluate", "mlp:16", "--attack", "torch:PGD"], "the following arguments are required: --eps"),
        (["evaluate", "mlp:16", "--attack", "torch:PGD", "--eps", "abc"], "argument --eps: invalid float value: 'abc'"),
        (["evaluate", "mlp:16", "--attack", "torch:PGD", "--eps", "0.1", "--steps", "2.5"],
         "argument --steps: invalid int value: '2.5'"),
        (["inspect", "mlp:16", "--mode", "fx"], "argument --mode: invalid choice: 'fx'"),
        (["evaluate", "mlp:16", "--attack", "torch:PGD", "--eps"], "argument --eps: expected at least one argument"),
    ],
    ids=["missing-eps", "eps-not-float", "steps-not-int", "bad-choice", "eps-no-value"],
)
def test_cli_arguments_that_do_not_parse_exit_2(argv, words, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "usage: relucap" in err


@pytest.mark.parametrize(
    "argv, words",
    [
        (["mlp:a,b"], "widths must be integers like mlp:256,32,256"),
        (["no_such_net"], "unknown model 'no_such_net'.*torchvision.models.list_models"),
        (["mlp:16", "--attack", "torch:Nope"], "unknown torch attack 'Nope'; valid: APGD, APGD-T, FGSM, PGD"),
        (["mlp:16", "--eps", "2"], "exceeds the input range 1.0.*Use eps <= 1.0"),
        (["mlp:16", "--data", "missing.npz"], "no such file or folder; use mnist5k"),
        (["mlp:16", "--norm", "L1"], "norm must be one of Linf, L2"),
        (["mlp:16", "--batch-size", "0"], "batch_size must be an int >= 1"),
    ],
    ids=["mlp-widths", "unknown-model", "unknown-attack", "eps-range", "missing-data", "norm", "batch-size"],
)
def test_cli_bad_values_are_errors_with_exit_2_and_no_traceback(argv, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, *rest = argv
    attack = [] if "--attack" in rest else ["--attack", "torch:FGSM"]
    eps = [] if "--eps" in rest else ["--eps", "0.1"]
    assert main(["evaluate", model, *attack, *eps, *rest, "--n-samples", "4", "--quiet",
                 "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "relucap evaluate: error: " in err and "Traceback" not in err
    assert re.search(words, err), err


def test_cli_evaluate_without_attacks_names_both_ways(tmp_path, capsys):
    assert main(["evaluate", "mlp:16", "--eps", "0.1", "--quiet", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "relucap evaluate: error: name the attacks: --attack SPEC (repeatable) and/or --suite standard" in err
    assert not (tmp_path / "out").exists()


def test_cli_checkpoint_of_another_architecture(tmp_path, capsys):
    ckpt = tmp_path / "w.safetensors"
    save_checkpoint(mlp((32,)), ckpt)
    before = ckpt.read_bytes()
    assert main(["evaluate", "mlp:16", "--checkpoint", str(ckpt), "--attack", "torch:FGSM", "--eps", "0.1",
                 "--quiet", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "does not fit this model" in err and "shape mismatches: 1.bias: checkpoint (32,) vs model (16,)" in err
    assert "same architecture" in err
    assert ckpt.read_bytes() == before and not (tmp_path / "out").exists()
