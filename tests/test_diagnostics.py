"""Gradient-masking checks, the verdict and perturbation growth (issue 5)."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relucap_plugin import EvalConfig, Results, ThreatModel, get_attack
from relucap_plugin.diagnostics import (
    CHECKS,
    EVIDENCE,
    RISK,
    Flag,
    audit,
    determinism_check,
    probability_check,
    eps_check,
    gradient_check,
    other_attacks_check,
    over_report,
    perturbation_growth,
    saturation_check,
    verdict,
    verdict_level,
    zero_gradient_layers,
)

TM = ThreatModel("Linf", eps=(0.3,))
CFG = EvalConfig(batch_size=200, device="cpu")


@pytest.fixture(scope="module")
def test_batch(mnist5k):
    _, test = mnist5k
    return test.tensors[0][:200], test.tensors[1][:200]


@pytest.fixture(scope="module")
def capped_audit(capped_mlp, test_batch):
    return audit(capped_mlp, test_batch, TM, CFG, model_name="capped")


@pytest.fixture(scope="module")
def relu_audit(mnist_mlp, test_batch):
    return audit(mnist_mlp, test_batch, TM, CFG, model_name="relu")


@pytest.mark.slow
def test_capped_bottleneck_is_flagged_and_the_suite_finds_the_truth(capped_audit):
    a = capped_audit
    assert [f.name for f in a.flags] == list(CHECKS)
    assert a.masking_likely and a.level == "masking measured"
    for name in ("zero_gradients", "saturated_caps", "surrogate_beats_whitebox", "transfer_beats_whitebox",
                 "blackbox_beats_whitebox"):
        assert a.flag(name).fired, a.flag(name)
    assert a.flag("zero_gradients").evidence["zero_fraction"] > 0.3
    assert a.flag("surrogate_beats_whitebox").evidence["p_value"] < 0.05
    sat = a.flag("saturated_caps").evidence
    key = "4:CappedReLU"
    assert set(sat["clean"]) == {key} and sat["adversarial"][key]["blocked"] >= sat["clean"][key]["blocked"]
    assert a.caps == ["4:CappedReLU [0, 0.1]"]
    assert not a.flag("nondeterministic_logits").fired
    over = a.over_report
    assert a.verdict.startswith(f"capped: masking measured: PGD over-reports by {100 * over['over_report']:.1f} "
                                "points [")
    pgd, worst = a.results.robust_accuracy("torch:PGD", 0.3), a.results.worst_case(0.3)
    assert pgd > 0.20 and worst < 0.05, (pgd, worst)
    assert over["interval"][0] <= over["over_report"] <= over["interval"][1]
    assert over["over_report"] == pytest.approx(over["pgd"] - over["worst_case"])
    assert "Headline: PGD " in a.table()


def test_plain_relu_model_raises_no_flag(relu_audit):
    a = relu_audit
    assert not any(f.fired for f in a.flags), [str(f) for f in a.flags if f.fired]
    # no caps: no saturated caps, and the suite leaves out its BPDA and transfer members
    skipped = {f.name for f in a.flags if f.skipped}
    assert skipped == {"saturated_caps", "transfer_beats_whitebox", "surrogate_beats_whitebox"}
    assert a.verdict == "relu: no sign of gradient masking in 8 checks (3 skipped)"
    assert a.level == "no sign" and a.caps == []
    pgd, worst = a.results.robust_accuracy("torch:PGD", 0.3), a.results.worst_case(0.3)
    assert abs(worst - pgd) <= 0.02
    assert a.flag("unbounded_not_chance").evidence["robust_accuracy"] <= 0.1


def test_audit_report_prints_flags_and_verdict(relu_audit, tmp_path):
    text = relu_audit.table()
    assert "Gradient-masking checks" in text and "zero_gradients" in text and "Verdict: relu: no sign" in text
    md = relu_audit.table(markdown=True)
    assert "| zero_gradients | ok |" in md
    d = relu_audit.to_dict()
    assert d["verdict"] == relu_audit.verdict and len(d["flags"]) == len(CHECKS)


def _rows(spec: dict[str, dict[float, list[bool]]], clean: list[bool]) -> Results:
    rows = []
    for attack, per_eps in spec.items():
        for eps, robust in per_eps.items():
            for i, r in enumerate(robust):
                rows.append({"sample": i, "attack": attack, "eps": eps, "clean_correct": clean[i],
                             "adv_correct": r and clean[i], "status": "ok"})
    return Results(rows, {"attacks": list(spec)})


def test_eps_check_fires_on_accuracy_rising_with_eps_or_above_clean():
    clean = [True] * 10
    monotone = _rows({"torch:PGD": {0.1: [True] * 6 + [False] * 4, 0.3: [True] * 2 + [False] * 8}}, clean)
    assert not eps_check(monotone).fired
    rising = _rows({"torch:PGD": {0.1: [True] * 2 + [False] * 8, 0.3: [True] * 6 + [False] * 4}}, clean)
    flag = eps_check(rising)
    assert flag.fired and flag.evidence["rises"][0]["from_eps"] == 0.1
    assert not eps_check(rising, tolerance=0.5).fired


def _pgd_vs_square(pgd: list[bool], square: list[bool]) -> tuple[Results, dict[str, Flag]]:
    results = _rows({"torch:PGD": {0.3: pgd}, "torchattacks:Square": {0.3: square},
                     "torch:FGSM": {0.3: [True] * len(pgd)}}, [True] * len(pgd))
    return results, {f.name: f for f in other_attacks_check(results)}


def test_other_attacks_check_is_per_sample():
    # same accuracy (50%): Square breaks 5 samples PGD did not, PGD 5 Square did not: no evidence
    _, flags = _pgd_vs_square([True] * 5 + [False] * 5, [False] * 5 + [True] * 5)
    assert not flags["blackbox_beats_whitebox"].fired
    assert flags["blackbox_beats_whitebox"].evidence["max_fraction"] == 0.5
    assert flags["blackbox_beats_whitebox"].evidence["per_eps"][0.3]["c"] == 5
    assert flags["blackbox_beats_whitebox"].evidence["p_value"] == 1.0
    assert not flags["single_step_beats_iterative"].fired
    assert flags["transfer_beats_whitebox"].skipped and not flags["transfer_beats_whitebox"].fired
    # 20 samples broken by Square alone against 2 by PGD alone: far beyond noise
    results, flags = _pgd_vs_square([True] * 20 + [False] * 20, [False] * 38 + [True] * 2)
    assert flags["blackbox_beats_whitebox"].fired
    assert flags["blackbox_beats_whitebox"].evidence["per_eps"][0.3]["b"] == 20
    assert verdict_level(list(flags.values())) == "masking measured"
    over = over_report(results)
    assert over["over_report"] == 0.5 and over["pgd"] == 0.5 and over["worst_case"] == 0.0
    lo, hi = over["interval"]
    assert 0.33 < lo < 0.5 < hi < 0.67


def test_exact_tests_against_known_values():
    from relucap_plugin.significance import binomial_tail, clopper_pearson, mcnemar_exact

    assert mcnemar_exact(8, 2) == pytest.approx(56 / 1024)  # P(X >= 8), X ~ Bin(10, 1/2)
    assert mcnemar_exact(0, 5) == 1.0 and binomial_tail(3, 2) == 0.0
    lo, hi = clopper_pearson(5, 200)  # scipy.stats.beta.ppf(0.025, 5, 196), (0.975, 6, 195)
    assert lo == pytest.approx(0.0081662, abs=1e-6) and hi == pytest.approx(0.0573744, abs=1e-6)
    assert clopper_pearson(0, 200) == (0.0, pytest.approx(0.0182753, abs=1e-6))
    with pytest.raises(ValueError, match="0 <= k <= n"):
        clopper_pearson(3, 2)


class _Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x):
        return self.lin(x) + 0.1 * torch.randn(x.shape[0], 3)


def test_probability_outputs_are_flagged_and_warned_about_in_evaluate():
    """A model ending with a softmax: the audit's risk flag fires (not for its logits, nor for
    log-probabilities), and evaluate warns once, naming the fix; not for the logits model."""
    from relucap_plugin import evaluate

    torch.manual_seed(0)
    logits = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.rand(32, 4), torch.randint(0, 3, (32,))
    with torch.no_grad():
        logits[2].weight.mul_(20)  # confident: a softmax saturates
    probs = nn.Sequential(logits, nn.Softmax(dim=1))
    assert probability_check(probs, x).fired
    assert not probability_check(logits, x).fired
    assert not probability_check(nn.Sequential(logits, nn.LogSoftmax(dim=1)), x).fired
    assert probability_check(probs, x).evidence["max_row_sum_error"] < 1e-4
    y = logits(x).argmax(1)
    tm, cfg = ThreatModel("Linf", eps=(0.05,), steps=10), EvalConfig(device="cpu")
    with pytest.warns(UserWarning, match=r"the model returns probabilities .* it ends with a "
                                         r"softmax.*drop the final softmax") as record:
        evaluate(probs, (x, y), ["torch:PGD"], tm, cfg, progress=False)
    assert sum("probabilities" in str(w.message) for w in record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(logits, (x, y), ["torch:PGD"], tm, cfg, progress=False)


def test_a_model_random_in_eval_mode_is_warned_about_in_evaluate():
    """F.dropout without training=self.training keeps a model random in eval mode: evaluate
    printed its one-draw robust accuracy without a word (audit's flag fired, evaluate's did
    not). Now evaluate warns once; a deterministic model gets no warning."""
    from relucap_plugin import evaluate

    class AlwaysDropout(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 32), nn.Linear(32, 3)

        def forward(self, x):
            return self.b(F.dropout(F.relu(self.a(x)), 0.5))

    torch.manual_seed(0)
    model = AlwaysDropout()
    x, y = torch.rand(16, 4), torch.randint(0, 3, (16,))
    tm, cfg = ThreatModel("Linf", eps=(0.05,), steps=2), EvalConfig(device="cpu", batch_size=8)
    assert determinism_check(model, x).fired
    with pytest.warns(UserWarning, match=r"random in eval mode .*training=self.training") as record:
        evaluate(model, (x, y), ["torch:FGSM"], tm, cfg, progress=False)
    assert sum("random in eval mode" in str(w.message) for w in record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(nn.Linear(4, 3), (x, y), ["torch:FGSM"], tm, cfg, progress=False)


def test_a_model_whose_outputs_depend_on_the_batch_is_warned_about_in_evaluate():
    """Batch norm without running statistics normalises with the batch's statistics in eval
    mode too: the same data gave 96.9% clean / 83.6% robust in batches of 128 and 97.7% /
    77.3% in batches of 16, without a word. Now evaluate warns once; batch norm with running
    statistics does not."""
    from relucap_plugin import evaluate

    torch.manual_seed(0)
    x, y = torch.rand(16, 4), torch.randint(0, 3, (16,))
    tm, cfg = ThreatModel("Linf", eps=(0.05,), steps=2), EvalConfig(device="cpu", batch_size=8)
    batch_stats = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8, track_running_stats=False),
                                nn.Linear(8, 3))
    with pytest.warns(UserWarning, match=r"depend on the other samples of the batch: the first 4 "
                                         r"of 8 .*track_running_stats=True") as record:
        evaluate(batch_stats, (x, y), ["torch:FGSM"], tm, cfg, progress=False)
    assert sum("other samples of the batch" in str(w.message) for w in record) == 1
    assert not any("random in eval mode" in str(w.message) for w in record)
    running = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        evaluate(running, (x, y), ["torch:FGSM"], tm, cfg, progress=False)


def test_audit_refuses_results_of_another_model_or_other_data():
    """audit(model_b, ..., results=results_of_model_a) gave model a's attack gaps as model b's
    verdict ("PGD over-reports by 1.6 points" where b's own run says 0.0), without a word."""
    from relucap_plugin import evaluate

    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3))
    b = nn.Sequential(nn.Linear(4, 16), nn.Hardtanh(0.0, 0.01), nn.Linear(16, 3))
    b.load_state_dict(a.state_dict())  # the same weights, another activation
    x = torch.rand(12, 4)
    y = a(x).argmax(1).detach()
    tm, cfg = ThreatModel("Linf", eps=(0.05,), steps=2), EvalConfig(device="cpu")
    of_a = evaluate(a, (x, y), ["torch:FGSM"], tm, cfg, progress=False)
    with pytest.raises(ValueError, match=r"results= describe another evaluation .*what differs: "
                                         r"the model's architecture"):
        audit(b, (x, y), tm, cfg, results=of_a)
    with pytest.raises(ValueError, match=r"what differs: the data \(samples \[0"):
        audit(a, (x, (y + 1) % 3), tm, cfg, results=of_a)


def test_determinism_and_gradient_checks_on_small_models():
    torch.manual_seed(0)
    x, y = torch.rand(8, 4), torch.randint(0, 3, (8,))
    assert determinism_check(_Noisy(), x).fired
    assert not determinism_check(nn.Linear(4, 3), x).fired
    dead = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 3))
    with torch.no_grad():
        dead[0].bias.fill_(-100.0)
    flag = gradient_check(dead, x, y)
    assert flag.fired and flag.evidence["zero_fraction"] == 1.0
    assert not gradient_check(nn.Linear(4, 3), x, y).fired
    assert saturation_check(nn.Linear(4, 3), x).skipped


def test_verdict_levels_separate_evidence_from_risk_factors():
    ok = Flag("zero_gradients", False, CHECKS["zero_gradients"].meaning, {"zero_fraction": 0.0})
    risk = Flag("saturated_caps", True, CHECKS["saturated_caps"].meaning, {})
    gap = Flag("transfer_beats_whitebox", True, CHECKS["transfer_beats_whitebox"].meaning, {})
    over = {"over_report": 0.125, "interval": (0.08, 0.18), "eps": 0.1}
    assert verdict([ok]) == "no sign of gradient masking in 1 checks"
    assert verdict_level([ok]) == "no sign"
    assert verdict([ok, risk], "m") == ("m: risk factors only (saturated_caps): no attack gap beyond "
                                        "sampling noise")
    assert verdict_level([ok, risk]) == "risk factors only"
    assert verdict([risk, gap], "m", over) == ("m: masking measured: PGD over-reports by 12.5 points "
                                               "[8.0, 18.0] at eps 0.1 (evidence: transfer_beats_whitebox)")
    assert set(EVIDENCE) | set(RISK) == set(CHECKS) and not set(EVIDENCE) & set(RISK)
    assert "FIRED" in str(gap) and "[ok]" in str(ok)


def test_vanishing_gradients_without_a_cap_name_the_layer(test_batch):
    """Gradients die at an op that is not a known cap (a hard threshold): the audit says so and
    names the layer."""

    class Step(nn.Module):
        def forward(self, x):
            return (x > 0).float() * x.detach() + 0 * x

    torch.manual_seed(0)
    x, y = test_batch
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 32), Step(), nn.Linear(32, 10)).eval()
    layers = zero_gradient_layers(model, x[:50], y[:50])
    assert layers[0]["layer"] == "2" and layers[0]["type"] == "Step" and layers[0]["fraction"] == 1.0
    a = audit(model, (x[:40], y[:40]), TM.replace(steps=3), CFG, suite_kwargs={"square_queries": 20})
    flag = a.flag("zero_gradients")
    assert flag.fired and flag.evidence["no_cap_reached"] and flag.evidence["zero_at"][0]["layer"] == "2"
    assert any("not a known cap" in n and "2 (Step" in n for n in a.notes)
    assert a.caps == [] and "Note: gradients vanish" in a.table()


def test_perturbation_growth_cap_stops_growth(capped_mlp, test_batch, tmp_path):
    x, y = test_batch
    x, y = x[:100], y[:100]
    x_adv = get_attack("torch:PGD", TM.replace(eps=(0.1,)))(capped_mlp, x, y, 0.1, seed=0)
    growth = perturbation_growth(capped_mlp, x, x_adv)
    rows = {r["layer"]: r for r in growth.rows}
    assert [r["type"] for r in growth.rows] == ["Linear", "ReLU", "Linear", "CappedReLU", "Linear", "ReLU",
                                                "Linear"]
    # identical before the cap, smaller at and after it
    assert rows["1"]["capped"] == pytest.approx(rows["1"]["uncapped"])
    assert rows["4"]["capped"] < rows["4"]["uncapped"]
    assert rows["7"]["capped"] < rows["7"]["uncapped"]
    fig = growth.plot(tmp_path / "growth.png")
    assert (tmp_path / "growth.png").stat().st_size > 1000 and fig.axes
    assert "CappedReLU" in growth.table()
    with pytest.raises(ValueError, match="no perturbation"):
        perturbation_growth(capped_mlp, x, x.clone())


def test_cli_audit(capped_mlp, tmp_path, capsys):
    from relucap_plugin.cli import main
    from relucap_plugin.training import save_checkpoint

    ckpt = save_checkpoint(capped_mlp, tmp_path / "capped.safetensors")
    out = tmp_path / "audit"
    # every hidden layer capped at 0.1 (the CLI's mlp spec), weights of the bottleneck-capped net
    code = main(["audit", "mlp:256,32,256:capped_relu(cap=0.1)", "--checkpoint", str(ckpt),
                 "--eps", "0.3", "--n-samples", "40", "--square-queries", "200", "--out", str(out), "--quiet"])
    text = capsys.readouterr().out
    assert code == 0
    assert "Verdict: " in text and "zero_gradients" in text and "torch:PGD+bpda(ste)" in text
    report = (out / "audit.txt").read_text()
    assert "Gradient-masking checks" in report and (out / "flags.json").exists()
