"""evaluate(): cross-library agreement at the harness level, verification, resume, caller state.

Uses the session's trained MNIST MLP (``mnist_mlp`` in conftest.py) and the real libraries. The
attack-level agreement of the adapters is tested in test_attacks.py; here the same spec runs
through evaluate() and is compared in its Results (per-sample table, agreement, worst case).
"""

import copy
import json
import os
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from relucap_plugin.attacks import make_attack
from relucap_plugin.evaluation import evaluate, norm_tolerance, verify
from relucap_plugin.results import Results, ResultsFileWarning
from relucap_plugin.threat import EvalConfig, ThreatModel

LIBRARY_PGD = ["torchattacks:PGD", "foolbox:LinfPGD", "art:ProjectedGradientDescent"]


def pgd_loop(model, x, y, eps, steps=40):
    """Madry et al.'s L-inf PGD written out: random start, steps of 2.5 * eps / steps."""
    alpha = 2.5 * eps / steps
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), y), x_adv)
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = (x + (x_adv - x).clamp(-eps, eps)).clamp(0, 1)
    return x_adv


def fgsm_loop(model, x, y, eps):
    """One signed-gradient step: deterministic, so any batching gives the same examples."""
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


@pytest.fixture(scope="module")
def test_set(mnist5k):
    return mnist5k[1].tensors


def small(test_set, n):
    x, y = test_set
    return x[:n], y[:n]


# ------------------------------------------------------------------- cross-library agreement
@pytest.mark.slow
def test_same_pgd_through_three_libraries_agrees_with_a_hand_written_loop(mnist_mlp, test_set):
    eps = 0.05  # where this model is about half robust: the hardest place to agree
    tm = ThreatModel("Linf", eps=eps, steps=40)
    mine = make_attack(pgd_loop, name="test_pgd", family="PGD")
    res = evaluate(
        mnist_mlp,
        small(test_set, 500),
        [*LIBRARY_PGD, mine],
        tm,
        EvalConfig(batch_size=250, seed=0),
        progress=False,
    )
    assert len(res) == 500 * 4 and not res.failed() and not res.violations()
    acc = {a: res.robust_accuracy(a, eps) for a in res.attacks}
    assert 0.2 < acc["custom:test_pgd"] < 0.8  # not a trivial 0% or 100% agreement
    assert max(acc.values()) - min(acc.values()) <= 0.01
    (entry,) = res.agreement()
    print("robust accuracy at eps 0.05:", acc, "agreement:", entry)
    assert entry["family"] == "PGD" and set(entry["accuracy"]) == {
        "art",
        "custom",
        "foolbox",
        "torchattacks",
    }
    assert entry["n_common"] == 500 and entry["max_gap"] <= 1.0
    assert entry["disagreements"] <= 10  # samples whose verdict differs between libraries (2%)
    worst = res.worst_case(eps)
    assert worst <= min(acc.values())
    assert worst == sum(res.per_sample_worst_case(eps).values()) / 500
    norms = [r["norm"] for r in res.rows if not r["skipped"]]
    assert max(norms) <= norm_tolerance(eps, tm, test_set[0])


@pytest.mark.parametrize("spec", [*LIBRARY_PGD, "torch:PGD", "custom"])
def test_caller_state_restored_after_each_library(mnist_mlp, test_set, spec):
    model = nn.Sequential(copy.deepcopy(mnist_mlp), nn.Dropout(0.5))
    model.train()
    model[0][1].eval()  # a mixed-mode model must come back mixed
    model[0][1].weight.requires_grad_(False)  # and frozen parameters stay frozen
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    rng = torch.get_rng_state()
    attack = make_attack(pgd_loop, name="pgd") if spec == "custom" else spec
    res = evaluate(
        model,
        small(test_set, 20),
        attack,
        ThreatModel("Linf", eps=0.1, steps=3),
        EvalConfig(batch_size=10),
        progress=False,
    )
    assert len(res) == 20 and not res.failed()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)
    # the harness predicted in eval mode: dropout off, so clean predictions match the plain net
    assert [r["clean_pred"] for r in res.rows] == mnist_mlp(test_set[0][:20]).argmax(1).tolist()


# --------------------------------------------------------------------------- verification
def test_verification_catches_a_broken_attack_and_never_counts_it_robust(mnist_mlp, test_set):
    def over_budget(model, x, y, eps):
        # twice the budget along a random sign: rarely fools the model, so without the harness's
        # check most of these samples would be reported robust.
        return (x + 2 * eps * torch.randint(0, 2, x.shape).mul(2).sub(1)).clamp(0, 1)

    def out_of_bounds(model, x, y, eps):
        return x - eps / 2  # within budget, below 0 where the pixel is 0

    def not_finite(model, x, y, eps):
        x = x.clone()
        x[:, 0, 0, 0] = float("nan")
        return x

    tm = ThreatModel("Linf", eps=0.05)
    attacks = [
        make_attack(f) for f in (over_budget, out_of_bounds, not_finite, lambda m, x, y, e: x)
    ]
    attacks[-1].name = "custom:identity"
    res = evaluate(
        mnist_mlp, small(test_set, 100), attacks, tm, EvalConfig(batch_size=50), progress=False
    )
    clean = res.clean_accuracy()
    for name, reason in [
        ("custom:over_budget", "Linf norm 0.1 > eps 0.05"),
        ("custom:out_of_bounds", "outside bounds [0, 1]"),
        ("custom:not_finite", "non-finite"),
    ]:
        rows = [r for r in res.rows if r["attack"] == name]
        attacked = [r for r in rows if not r["skipped"]]
        assert all(r["status"] == "violation" and reason in r["reason"] for r in attacked)
        assert not any(r["adv_correct"] for r in rows)
        assert res.robust_accuracy(name, 0.05) == 0.0
    fooled_not = [
        r for r in res.rows if r["attack"] == "custom:over_budget" and r["adv_pred"] == r["label"]
    ]
    assert len(fooled_not) > 50  # the model still classified these correctly: verification decided
    assert res.robust_accuracy("custom:identity", 0.05) == pytest.approx(clean)
    assert res.worst_case(0.05) == 0.0
    summary = {(s["attack"]): s for s in res.summary()}
    assert summary["custom:over_budget"]["violations"] == round(100 * clean)
    assert "failed verification" in res.table()


def test_verify_tolerance_accepts_float_rounding_and_rejects_real_excess():
    tm = ThreatModel("Linf", eps=0.1)
    x = torch.rand(64, 1, 28, 28)
    sign = torch.randint(0, 2, x.shape).mul(2).sub(1).float()
    exact = (x + 0.1 * sign).clamp(0, 1)  # float32 rounding may put |delta| a hair above 0.1
    norms, reasons = verify(x, exact, 0.1, tm)
    assert reasons == [None] * 64 and float(norms.max()) == pytest.approx(0.1, abs=1e-6)
    over = (x + 0.1 * (1 + 1e-4) * sign).clamp(0, 1)
    _, reasons = verify(x, over, 0.1, tm)
    assert all(r is not None and "norm" in r for r in reasons)
    tm2 = ThreatModel("L2", eps=1.0)
    delta = torch.randn_like(x)
    delta = delta / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    x_mid = torch.full_like(x, 0.5)
    _, reasons = verify(x_mid, x_mid + delta * 0.2, 0.2, tm2)
    assert reasons == [None] * 64
    _, reasons = verify(x_mid, x_mid + delta * 0.2 * (1 + 1e-4), 0.2, tm2)
    assert all(r is not None for r in reasons)


def test_failing_attack_gives_failed_rows_and_the_others_complete(mnist_mlp, test_set):
    def explodes(model, x, y, eps):
        raise RuntimeError("library exploded")

    tm = ThreatModel("Linf", eps=(0.05, 0.1))
    with pytest.warns(RuntimeWarning, match="custom:explodes failed.*library exploded"):
        res = evaluate(
            mnist_mlp,
            small(test_set, 60),
            [make_attack(explodes), fgsm_loop],
            tm,
            EvalConfig(batch_size=30),
            progress=False,
        )
    failed = res.failed()
    n_correct = round(60 * res.clean_accuracy())
    assert len(failed) == 2 * n_correct
    assert all(
        r["reason"] == "RuntimeError: library exploded" and r["adv_correct"] is None for r in failed
    )
    assert res.robust_accuracy("custom:fgsm_loop", 0.1) is not None
    assert len(res.missing()) == len(failed)
    assert "failed (the attack raised)" in res.table()


# ------------------------------------------------------------------------------- the loop
def test_misclassified_samples_are_not_attacked_but_have_rows(mnist_mlp, test_set):
    seen = []

    def spy(model, x, y, eps):
        seen.append(len(x))
        return x

    x, y = small(test_set, 200)
    y = y.clone()
    y[:20] = (y[:20] + 1) % 10  # 20 samples the model now gets wrong
    res = evaluate(
        mnist_mlp,
        (x, y),
        make_attack(spy),
        ThreatModel("Linf", eps=0.1),
        EvalConfig(batch_size=100),
        progress=False,
    )
    skipped = [r for r in res.rows if r["skipped"]]
    n_wrong = 200 - round(200 * res.clean_accuracy())
    assert n_wrong >= 20 and len(skipped) == n_wrong and sum(seen) == 200 - n_wrong
    assert all(not r["adv_correct"] and r["norm"] == 0.0 and r["status"] == "ok" for r in skipped)


def test_data_forms_and_batchings_give_the_same_table(mnist_mlp, test_set):
    x, y = small(test_set, 90)
    tm = ThreatModel("Linf", eps=(0.05, 0.1))
    cfg = EvalConfig(batch_size=32)
    run = lambda data: evaluate(mnist_mlp, data, fgsm_loop, tm, cfg, progress=False).outcomes()  # noqa: E731
    pair = run((x, y))
    assert run(TensorDataset(x, y)) == pair
    assert run(DataLoader(TensorDataset(x, y), batch_size=7)) == pair  # the loader's batching
    assert [o[0] for o in pair[::2]] == list(range(90))
    assert [o[5] for o in pair[::2]] == y.tolist()  # each row carries its sample's label
    limited = evaluate(
        mnist_mlp, (x, y), fgsm_loop, tm, EvalConfig(batch_size=32, n_samples=50), progress=False
    )
    assert limited.samples == list(range(50)) and limited.outcomes() == pair[:100]


def test_output_selector_for_models_returning_tuples_or_dicts(mnist_mlp, test_set):
    class TupleNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = copy.deepcopy(mnist_mlp)

        def forward(self, x):
            logits = self.net(x)
            return {"logits": logits, "features": x.flatten(1)} if self.as_dict else (x, logits)

    data, tm, cfg = small(test_set, 40), ThreatModel("Linf", eps=0.1), EvalConfig(batch_size=20)
    expected = evaluate(mnist_mlp, data, fgsm_loop, tm, cfg, progress=False).outcomes()
    net = TupleNet()
    net.as_dict = False
    assert evaluate(net, data, fgsm_loop, tm, cfg, output=1, progress=False).outcomes() == expected
    with pytest.raises(TypeError, match="output="):
        evaluate(net, data, fgsm_loop, tm, cfg, progress=False)
    net.as_dict = True
    assert (
        evaluate(net, data, fgsm_loop, tm, cfg, output="logits", progress=False).outcomes()
        == expected
    )
    assert (
        evaluate(
            net, data, fgsm_loop, tm, cfg, output=lambda o: o["logits"], progress=False
        ).outcomes()
        == expected
    )
    with pytest.raises(TypeError, match="cannot select the logits"):
        evaluate(net, data, fgsm_loop, tm, cfg, output="nope", progress=False)


def test_same_seed_gives_a_bit_identical_table(mnist_mlp, test_set):
    data, tm = small(test_set, 60), ThreatModel("Linf", eps=(0.05, 0.1), steps=5)
    noise = make_attack(
        lambda m, x, y, e: (x + torch.empty_like(x).uniform_(-e, e)).clamp(0, 1), name="noise"
    )
    attacks = [
        "torchattacks:PGD",
        "art:ProjectedGradientDescent",
        make_attack(pgd_loop, name="pgd"),
        noise,
    ]
    first = evaluate(
        mnist_mlp, data, attacks, tm, EvalConfig(batch_size=30, seed=3), progress=False
    )
    again = evaluate(
        mnist_mlp, data, attacks, tm, EvalConfig(batch_size=30, seed=3), progress=False
    )
    assert first.outcomes() == again.outcomes()
    other = evaluate(
        mnist_mlp, data, attacks, tm, EvalConfig(batch_size=30, seed=4), progress=False
    )
    norms = lambda res: [r["norm"] for r in res.rows if r["attack"] == "custom:noise"]  # noqa: E731
    assert norms(other) != norms(first)  # the seed reaches the attack's random draws


def test_bad_input_is_a_clear_error(mnist_mlp, test_set):
    x, y = small(test_set, 10)
    tm = ThreatModel("Linf", eps=0.1)
    with pytest.raises(ValueError, match="outside the threat model's bounds"):
        evaluate(mnist_mlp, (x * 2 - 0.5, y), fgsm_loop, tm, progress=False)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 9\]"):
        evaluate(mnist_mlp, (x, y + 10), fgsm_loop, tm, progress=False)
    with pytest.raises(ValueError, match="given twice"):
        evaluate(mnist_mlp, (x, y), [fgsm_loop, fgsm_loop], tm, progress=False)
    with pytest.raises(TypeError, match="output must be"):
        evaluate(mnist_mlp, (x, y), fgsm_loop, tm, output=1.5, progress=False)
    with pytest.raises(TypeError, match="threat_model must be"):
        evaluate(mnist_mlp, (x, y), fgsm_loop, "Linf", progress=False)


# ---------------------------------------------------------------------------------- resume
class Interrupt:
    """fgsm-like attack that raises KeyboardInterrupt on its ``at``-th call (a killed run)."""

    def __init__(self, at=None):
        self.at, self.calls = at, 0

    def __call__(self, model, x, y, eps):
        self.calls += 1
        if self.calls == self.at:
            raise KeyboardInterrupt
        return pgd_loop(model, x, y, eps, steps=3)


def test_interrupted_run_resumes_to_the_uninterrupted_table(mnist_mlp, test_set, tmp_path):
    data, tm, cfg = (
        small(test_set, 100),
        ThreatModel("Linf", eps=(0.05, 0.1), steps=3),
        EvalConfig(batch_size=25),
    )

    def attacks(at=None):
        return ["torchattacks:PGD", make_attack(Interrupt(at), name="rand_pgd")]

    full = evaluate(mnist_mlp, data, attacks(), tm, cfg, progress=False)
    out = tmp_path / "results.jsonl"
    with pytest.raises(KeyboardInterrupt):
        evaluate(mnist_mlp, data, attacks(at=5), tm, cfg, out=out, progress=False)  # in batch 3
    partial = Results.load(out)
    assert 0 < len(partial) < len(full)
    with open(out, "a") as f:
        f.write('{"sample": 99, "attack": "rand_')  # and the kill tore the last line
    second = attacks()
    with pytest.warns(ResultsFileWarning, match="torn last line"):
        resumed = evaluate(mnist_mlp, data, second, tm, cfg, out=out, progress=False)
    assert second[1].fn.calls == 2 * 4 - 4  # 4 of the 8 (batch, eps) calls were already done
    assert resumed.outcomes() == full.outcomes()
    lines = out.read_text().splitlines()
    keys = [(r["sample"], r["attack"], r["eps"]) for r in map(json.loads, lines[1:])]
    assert len(keys) == len(set(keys)) == 100 * 2 * 2  # nothing duplicated, nothing missing
    assert Results.load(out).outcomes() == full.outcomes()
    again = attacks()
    evaluate(mnist_mlp, data, again, tm, cfg, out=out, progress=False)  # complete: no work
    assert again[1].fn.calls == 0 and len(out.read_text().splitlines()) == len(lines)


@pytest.mark.slow
def test_killed_cli_run_resumes_to_the_uninterrupted_table(mnist_mlp, mnist5k, tmp_path, capsys):
    from relucap_plugin.cli import main
    from relucap_plugin.training import save_checkpoint

    ckpt = tmp_path / "mlp.safetensors"
    save_checkpoint(mnist_mlp, ckpt)
    out = tmp_path / "run"
    args = [
        "evaluate",
        "mlp:256,32,256",
        "--checkpoint",
        str(ckpt),
        "--attack",
        "torchattacks:PGD",
        "--attack",
        "torch:PGD",
        "--eps",
        "0.05",
        "0.1",
        "--steps",
        "10",
        "--n-samples",
        "200",
        "--batch-size",
        "10",
        "--quiet",
        "--out",
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "relucap_plugin.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    jsonl = out / "results.jsonl"
    try:
        while proc.poll() is None:
            if jsonl.exists() and len(jsonl.read_bytes().splitlines()) > 150:
                proc.kill()  # SIGKILL, mid-run
                break
            time.sleep(0.02)
    finally:
        proc.wait()
    assert proc.returncode == -9, "the run finished before it could be killed"
    assert 150 <= len(Results.load(jsonl)) < 200 * 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResultsFileWarning)  # if the kill tore a line, it is cut
        assert main(args) == 0  # resume, in this process
    stdout = capsys.readouterr().out
    assert "robust acc" in stdout and "Agreement across libraries" in stdout
    for name in ("results.txt", "results.md", "robust_accuracy.png"):
        assert (out / name).stat().st_size > 0
    assert "| torchattacks:PGD | 0.05 |" in (out / "results.md").read_text()
    resumed = Results.load(jsonl)
    lines = jsonl.read_text().splitlines()
    assert len(resumed) == len(lines) - 1 == 200 * 4  # no duplicated rows
    uninterrupted = evaluate(
        mnist_mlp,
        mnist5k[1],
        ["torchattacks:PGD", "torch:PGD"],
        ThreatModel("Linf", eps=(0.05, 0.1), steps=10),
        EvalConfig(batch_size=10, n_samples=200),
        progress=False,
    )
    assert resumed.outcomes() == uninterrupted.outcomes()
    assert resumed.metadata["model"] == "mlp:256,32,256"


def test_resume_refuses_other_data(mnist_mlp, test_set, tmp_path):
    x, y = small(test_set, 40)
    tm, cfg = ThreatModel("Linf", eps=0.1), EvalConfig(batch_size=20)
    evaluate(mnist_mlp, (x, y), fgsm_loop, tm, cfg, out=tmp_path, progress=False)
    assert (tmp_path / "results.jsonl").exists()
    with pytest.raises(ValueError, match="what differs: the inputs or labels"):
        evaluate(
            mnist_mlp, (x.flip(0), y.flip(0)), fgsm_loop, tm, cfg, out=tmp_path, progress=False
        )
    with pytest.raises(ValueError, match="different evaluation.*batch_size"):
        evaluate(
            mnist_mlp,
            (x, y),
            fgsm_loop,
            tm,
            EvalConfig(batch_size=10),
            out=tmp_path,
            progress=False,
        )
    fresh = evaluate(
        mnist_mlp,
        (x.flip(0), y.flip(0)),
        fgsm_loop,
        tm,
        cfg,
        out=tmp_path,
        resume=False,
        progress=False,
    )
    assert Results.load(tmp_path / "results.jsonl").outcomes() == fresh.outcomes()


def test_the_harness_runs_two_forward_passes_per_batch_and_attack_besides_the_attack():
    """One clean pass per batch (its logits reach the attack) and one on the returned examples,
    plus one pass of the first batch's first half per run (the check that a sample's logits
    depend on that sample alone)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append(len(i[0])))
    x, y = torch.rand(10, 1, 2, 2), torch.zeros(10, dtype=torch.long)
    with torch.no_grad():
        y = net(x).argmax(1)  # every sample correct, so every one is attacked
    calls.clear()
    identity = make_attack(lambda model, xb, yb, eps: xb.clone(), name="identity")
    res = evaluate(net, (x, y), [identity], ThreatModel("Linf", eps=(0.1, 0.2)),
                   EvalConfig(batch_size=4), progress=False)
    assert res.robust_accuracy("custom:identity", 0.2) == 1.0
    # per batch (4, 4, 2 samples): one clean pass, then one pass on the examples per eps
    assert calls == [4, 2, 4, 4] + [4, 4, 4] + [2, 2, 2]


def test_a_model_returning_another_number_of_rows_than_inputs_is_refused():
    """x.view(-1, 16) on inputs of shape (N, 3, 4, 4) gives 3N rows of logits: evaluate took the
    first N as the samples' predictions and printed their accuracy (exit 0)."""
    from relucap_plugin.attacks import get_attack
    from relucap_plugin.training import accuracy

    class ViewNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(16, 3)

        def forward(self, x):
            return self.linear(x.view(-1, 16))

    model, tm = ViewNet(), ThreatModel("Linf", eps=0.1, steps=2)
    x, y = torch.rand(6, 3, 4, 4), torch.randint(0, 3, (6,))
    for call in (lambda: evaluate(model, (x, y), ["torch:FGSM"], tm, progress=False),
                 lambda: get_attack("torch:PGD", tm)(model, x, y),
                 lambda: accuracy(model, (x, y))):
        with pytest.raises(ValueError, match=r"returns 18 rows of logits for 6 inputs of shape "
                                             r"\(6, 3, 4, 4\).*x.flatten\(1\)"):
            call()
