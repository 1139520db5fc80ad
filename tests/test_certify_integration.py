"""certify in the bracket table, the CLI, certified training and the certified growth table."""

import math

import pytest
import torch
from torch import nn

from relucap_plugin import ThreatModel
from relucap_plugin.certification import UnsupportedOpError, certified_margins, certify
from relucap_plugin.cli import main
from relucap_plugin.data import load_digits_dataset
from relucap_plugin.diagnostics import perturbation_growth
from relucap_plugin.evaluation import evaluate
from relucap_plugin.models import mlp
from relucap_plugin.results import BracketError, Results
from relucap_plugin.threat import EvalConfig
from relucap_plugin.training import accuracy, train


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


@pytest.fixture(scope="module")
def trained(digits):
    torch.manual_seed(0)
    model = mlp((32, 16), "capped_relu(cap=1.0)", in_shape=(1, 8, 8))
    train(model, digits[0], "ibp", epochs=4, eps=0.05, progress=False, device="cpu")
    return model


def test_certify_rows_bracket_real_attacks(trained, digits):
    tm = ThreatModel("Linf", eps=(0.01, 0.05))
    cfg = EvalConfig(batch_size=64, device="cpu", n_samples=80)
    attacks = evaluate(trained, digits[1], ["torch:PGD", "torch:FGSM"], tm, cfg, progress=False)
    cert = certify(trained, digits[1], tm, "best", cfg, progress=False)
    table = attacks.merge(cert)
    assert table.attacks[-1] == "certify:best"
    for eps in tm.eps:
        assert 0 < table.certified(eps) <= table.worst_case(eps)
        # the worst case is over attacks only: certify rows never lower it
        assert table.worst_case(eps) == attacks.worst_case(eps)
    rows = [r for r in table.rows if r["attack"] == "certify:best"]
    assert len(rows) == 160
    for r in rows:
        assert r["adv_correct"] == (r["clean_correct"] and r["margin"] > 0)
    assert "certified" in table.table() and "<= robust accuracy <=" in table.table()


def _row(sample, attack, eps, robust, **kw):
    return {"sample": sample, "attack": attack, "eps": eps, "clean_correct": True,
            "adv_correct": robust, "status": "ok", "label": 1, "adv_pred": 1 if robust else 2,
            "norm": eps, **kw}


def test_certified_but_broken_sample_raises():
    table = Results([_row(0, "certify:crown", 0.1, True, margin=0.3)])
    table.extend([_row(0, "torch:PGD", 0.2, False)])  # beyond the certified radius: fine
    with pytest.raises(BracketError, match="sample 0 is certified at eps 0.1.*torch:PGD"):
        table.extend([_row(0, "torch:PGD", 0.05, False)])
    with pytest.raises(BracketError):
        Results([_row(3, "art:PGD", 0.1, False), _row(3, "certify:ibp", 0.1, True)])


def test_certify_uses_the_models_device_and_restores_its_mode(trained, digits):
    trained.train()
    x, y = digits[1].tensors
    m = certified_margins(trained, x[:8], y[:8], 0.02, method="crown")
    assert trained.training and m.shape == (8,)
    trained.eval()
    if torch.cuda.is_available():
        on_gpu = certified_margins(trained.cuda(), x[:8].cuda(), y[:8].cuda(), 0.02, method="crown")
        trained.cpu()
        assert torch.allclose(on_gpu.cpu(), m, atol=1e-4)


def test_ibp_training_certifies_more_than_standard(digits):
    x, y = digits[1].tensors
    cert = {}
    for method in ("standard", "ibp", "crown_ibp"):
        torch.manual_seed(1)
        model = mlp((32,), "capped_relu(cap=1.0)", in_shape=(1, 8, 8))
        hist = train(model, digits[0], method, epochs=4, eps=0.1, progress=False, device="cpu",
                     schedule={"warmup": 0.0, "ramp": 0.5})
        assert all(math.isfinite(v) for v in hist.loss)
        cert[method] = (certified_margins(model, x, y, 0.1, method="ibp") > 0).float().mean().item()
    assert cert["standard"] < 0.02
    assert cert["ibp"] > cert["standard"] + 0.05
    assert cert["crown_ibp"] > cert["standard"] + 0.05


def test_certified_training_arguments_are_checked(digits):
    model = mlp((8,), in_shape=(1, 8, 8))
    with pytest.raises(ValueError, match=r"unknown schedule key\(s\) \['kappa'\]"):
        train(model, digits[0], "ibp", schedule={"kappa": 0.5}, progress=False)
    with pytest.raises(ValueError, match="bounds=None is not supported"):
        train(model, digits[0], "crown_ibp", bounds=None, progress=False)


def test_certified_growth_is_at_most_the_cap_on_capped_layers():
    torch.manual_seed(0)
    model = mlp((16, 8), "capped_relu(cap=0.3)", in_shape=(1, 4, 4)).eval()
    x = torch.rand(5, 1, 4, 4)
    table = perturbation_growth(model, x, (x + 0.2).clamp(0, 1), certified=True)
    caps = [r for r in table.rows if r["type"] == "CappedReLU"]
    assert len(caps) == 2 and len(table.rows) == 5
    for r in caps:
        assert r["capped"] <= 0.3 + 1e-6 and r["uncapped"] > r["capped"]


def test_cli_certify_merges_with_an_evaluate_run(tmp_path, capsys):
    out = str(tmp_path)
    spec = ["mlp:16:capped_relu(cap=1.0)", "--data", "mnist5k", "--eps", "0.01", "--n-samples",
            "30", "--out", out, "--quiet", "--device", "cpu"]
    assert main(["evaluate", *spec, "--attack", "torch:FGSM"]) == 0
    assert main(["certify", *spec, "--method", "crown"]) == 0
    text = capsys.readouterr().out
    assert "certify:crown" in text and "eps 0.01: certified" in text
    assert len(Results.load(tmp_path / "certify.jsonl")) == 30


def test_cli_certify_names_an_unsupported_op(tmp_path, capsys):
    code = main(["certify", "mlp:8:psilu", "--eps", "0.1", "--n-samples", "4", "--out",
                 str(tmp_path), "--quiet"])
    assert code == 2
    assert "certify cannot bound module '2' (PSiLU)" in capsys.readouterr().err


def test_unsupported_certify_method_is_refused(trained, digits):
    with pytest.raises(ValueError, match="method must be one of ibp, crown, best, got 'exact'"):
        certify(trained, digits[1], ThreatModel("Linf", eps=0.1), "exact")
    with pytest.raises(ValueError, match="logits"):
        certified_margins(nn.Identity(), torch.rand(2, 1, 2, 2), torch.tensor([0, 1]), 0.1)


def test_certified_rows_of_another_model_or_data_do_not_merge():
    """certify() records evaluate()'s run identity: certified rows of model B merged into attack
    rows of model A would print a bracket of two different models (it used to merge silently)."""
    from relucap_plugin import ThreatModel, evaluate, mlp
    from relucap_plugin.certification import certify

    torch.manual_seed(0)
    a, b = mlp((32,)).eval(), mlp((32,)).eval()
    x, y = torch.rand(16, 1, 28, 28), torch.randint(0, 10, (16,))
    tm = ThreatModel(norm="Linf", eps=(0.05,))
    attacked = evaluate(a, (x, y), ["torch:FGSM"], tm, progress=False)
    merged = attacked.merge(certify(a, (x, y), tm, "ibp", progress=False))
    assert merged.certified(0.05) is not None
    with pytest.raises(ValueError, match="model's weights and buffers"):
        attacked.merge(certify(b, (x, y), tm, "ibp", progress=False))
    with pytest.raises(ValueError, match="inputs or labels"):
        attacked.merge(certify(a, (x.flip(0), y.flip(0)), tm, "ibp", progress=False))


@pytest.mark.parametrize("gap, certified", [(1e-6, False), (1e-3, True)])
def test_a_margin_within_rounding_of_zero_is_no_certificate(gap, certified):
    """Two logits that differ by ``gap`` everywhere: the certified margin is ``gap`` at any eps;
    1e-6 is within the float32 rounding tolerance (not certified), 1e-3 is not."""
    net = nn.Sequential(nn.Flatten(), nn.Linear(3, 2)).eval()
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([[0.5, -1.0, 2.0], [0.5, -1.0, 2.0]]))
        net[1].bias.copy_(torch.tensor([gap, 0.0]))
    data = torch.utils.data.TensorDataset(torch.rand(6, 3), torch.zeros(6, dtype=torch.long))
    table = certify(net, data, ThreatModel("Linf", eps=0.3), "best", progress=False)
    margins = [r["margin"] for r in table.rows if r["attack"] == "certify:best"]
    assert all(m == pytest.approx(gap, rel=1e-2) for m in margins)
    assert table.certified(0.3) == (1.0 if certified else 0.0)


def test_a_one_output_model_is_refused_not_certified_or_evaluated():
    """A binary classifier with one logit predicts class 0 for every input: certify reported
    every sample labelled 0 as certified (100%, exit 0). Both certify and evaluate now refuse it
    and say how to return two logits."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 1))
    x, y = torch.rand(6, 1, 4, 4), torch.zeros(6, dtype=torch.long)
    tm = ThreatModel("Linf", eps=0.1, steps=2)
    for call in (lambda: certify(model, (x, y), tm, progress=False),
                 lambda: certified_margins(model, x, y, 0.1),
                 lambda: evaluate(model, (x, y), "torch:FGSM", tm, progress=False),
                 lambda: accuracy(model, (x, y))):
        with pytest.raises(ValueError, match=r"one output per sample .*torch.cat\(\[torch.zeros_like"):
            call()


class _AlwaysDropout(nn.Module):
    """F.dropout without training=self.training: random in eval mode too."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(16, 32), nn.Linear(32, 3)

    def forward(self, x):
        return self.b(torch.nn.functional.dropout(torch.relu(self.a(x.flatten(1))), 0.5))


def _hooked():
    """Input scaling in a forward pre-hook, which the trace does not see."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))
    model.register_forward_pre_hook(lambda module, args: (args[0] * 50 - 25,))
    return model


@pytest.mark.parametrize("make", [_hooked, _AlwaysDropout], ids=["pre_hook", "functional_dropout"])
def test_a_model_its_bound_graph_does_not_reproduce_is_refused(make):
    """Before: the bounds were computed for the traced function (no hook, dropout as identity)
    and certified samples a plain PGD breaks on the real model."""
    torch.manual_seed(0)
    model = make().eval()
    x = torch.rand(8, 1, 4, 4)
    with torch.no_grad():
        y = model(x).argmax(1)
    tm = ThreatModel("Linf", eps=0.01)
    for call in (lambda: certify(model, (x, y), tm, progress=False),
                 lambda: certified_margins(model, x, y, 0.01)):
        with pytest.raises(UnsupportedOpError, match="does not reproduce the model's logits"):
            call()
