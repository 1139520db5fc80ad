"""Adversarial examples out (issue 17): ``evaluate(keep_adversarial=)`` keeps verified examples
per attack, per eps and the worst case per sample, in memory and next to ``out=``."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from relucap_plugin import EvalConfig, ThreatModel, evaluate
from relucap_plugin.adversarial import sidecar_path
from relucap_plugin.results import Results

EPS = (0.03, 0.08)
TM = ThreatModel("Linf", eps=EPS, steps=5)
CFG = EvalConfig(batch_size=8, n_samples=24, seed=0)
STOP = {"after": None, "calls": 0, "fail": False}


def fgsm(model, x, y, eps):
    """One signed-gradient step; raises KeyboardInterrupt after STOP["after"] calls (a kill)."""
    STOP["calls"] += 1
    if STOP["after"] is not None and STOP["calls"] > STOP["after"]:
        raise KeyboardInterrupt
    if STOP["fail"]:
        raise RuntimeError("fails on purpose")
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


ATTACKS = [fgsm, "torchattacks:PGD"]


@pytest.fixture(scope="module")
def data(mnist5k):
    x, y = mnist5k[1].tensors
    return x[:24], y[:24]


def run(model, data, **kw):
    STOP["calls"] = 0
    return evaluate(model, data, ATTACKS, TM, CFG, progress=False, **kw)


def tensors(res):
    out = {}
    for eps in EPS:
        out[("worst", eps)] = res.worst_case_examples(eps)
        for attack in res.attacks:
            out[(attack, eps)] = res.adversarial_examples(attack, eps)
    return out


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        for ta, tb in zip(*(v if isinstance(v, tuple) else (v,) for v in (a[k], b[k]))):
            assert ta.dtype == tb.dtype and torch.equal(ta, tb), k


@pytest.fixture(scope="module")
def full(mnist_mlp, data):
    return run(mnist_mlp, data, keep_adversarial="all")


def test_examples_are_verified_and_match_rows(mnist_mlp, data, full):
    x, y = data
    n_broken = 0
    for eps in EPS:
        for attack in full.attacks:
            idx, x_adv = full.adversarial_examples(attack, eps)
            rows = {r["sample"]: r for r in full if r["attack"] == attack and r["eps"] == eps}
            assert set(idx.tolist()) == {s for s, r in rows.items()
                                         if r["status"] == "ok" and not r["adv_correct"]}
            n_broken += len(idx)
            delta = (x_adv - x[idx]).abs().flatten(1).amax(1)
            assert bool((delta <= eps * (1 + 1e-5) + 1e-6).all())
            assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
            with torch.no_grad():
                assert bool((mnist_mlp(x_adv).argmax(1) != y[idx]).all())
    assert n_broken > 0


def test_worst_case_examples_break_exactly_the_broken_samples(mnist_mlp, data, full):
    x, y = data
    for eps in EPS:
        worst = full.worst_case_examples(eps)
        assert worst.shape == x.shape
        verdict = full.per_sample_worst_case(eps)
        assert not full.violations()
        with torch.no_grad():
            broken = (mnist_mlp(worst).argmax(1) != y).tolist()
        assert {s for s, b in enumerate(broken) if b} == {s for s, v in verdict.items() if not v}
        robust = [s for s, v in verdict.items() if v]
        assert robust and torch.equal(worst[robust], x[robust])
        idx, x_adv = full.adversarial_examples(None, eps)
        assert torch.equal(x_adv, worst[idx])


def test_keep_worst_equals_all_and_refuses_per_attack(mnist_mlp, data, full):
    worst_only = run(mnist_mlp, data, keep_adversarial="worst")
    for eps in EPS:
        assert torch.equal(worst_only.worst_case_examples(eps), full.worst_case_examples(eps))
    with pytest.raises(ValueError, match="keep_adversarial='all'"):
        worst_only.adversarial_examples("torchattacks:PGD", EPS[0])
    with pytest.raises(ValueError, match="keep_adversarial='worst' or 'all'"):
        run(mnist_mlp, data).worst_case_examples(EPS[0])
    with pytest.raises(ValueError, match="keep_adversarial must be None"):
        run(mnist_mlp, data, keep_adversarial="best")


def test_save_load_and_resume_are_bit_identical(mnist_mlp, data, full, tmp_path):
    expected = tensors(full)
    out = tmp_path / "results.jsonl"
    first = run(mnist_mlp, data, out=out, keep_adversarial="all")
    assert os.path.exists(sidecar_path(out))
    assert_same(tensors(first), expected)
    assert_same(tensors(Results.load(out)), expected)
    STOP["after"] = 0  # a resumed run with everything on disk attacks nothing
    try:
        resumed = run(mnist_mlp, data, out=out, keep_adversarial="all")
    finally:
        STOP["after"] = None
    assert_same(tensors(resumed), expected)
    full.save(tmp_path / "copy.jsonl")
    assert_same(tensors(Results.load(tmp_path / "copy.jsonl")), expected)


def test_killed_run_resumes_to_the_same_examples(mnist_mlp, data, full, tmp_path):
    out = tmp_path / "results.jsonl"
    STOP["calls"], STOP["after"] = 0, 3  # the fourth fgsm call (second batch, second eps) is "killed"
    try:
        with pytest.raises(KeyboardInterrupt):
            evaluate(mnist_mlp, data, ATTACKS, TM, CFG, progress=False, out=out,
                     keep_adversarial="all")
    finally:
        STOP["after"] = None
    assert 0 < len(Results.load(out)) < 24 * 4
    with pytest.raises(ValueError, match="were not kept"):
        Results.load(out).worst_case_examples(EPS[0])
    assert_same(tensors(run(mnist_mlp, data, out=out, keep_adversarial="all")), tensors(full))


def test_run_without_examples_is_regenerated_on_resume(mnist_mlp, data, full, tmp_path):
    out = tmp_path / "results.jsonl"
    rows = run(mnist_mlp, data, out=out).outcomes()
    with pytest.warns(RuntimeWarning, match="no adversarial examples file"):
        resumed = run(mnist_mlp, data, out=out, keep_adversarial="worst")
    assert resumed.outcomes() == rows
    for eps in EPS:
        assert torch.equal(resumed.worst_case_examples(eps), full.worst_case_examples(eps))
    # a worst-only file resumed with "all" regenerates the per-attack examples
    with pytest.warns(RuntimeWarning, match="kept only the worst-case") as record:
        again = run(mnist_mlp, data, out=out, keep_adversarial="all")
    assert not [w for w in record if "other verdicts" in str(w.message)]
    assert_same(tensors(again), tensors(full))


def test_examples_file_of_another_run_is_refused(mnist_mlp, data, tmp_path):
    import copy

    out = tmp_path / "results.jsonl"
    run(mnist_mlp, data, out=out, keep_adversarial="worst")
    other = tmp_path / "other.jsonl"
    model = copy.deepcopy(mnist_mlp)
    with torch.no_grad():
        model[-1].bias += 1.0
    run(model, data, out=other, keep_adversarial="worst")
    os.replace(sidecar_path(other), sidecar_path(out))
    with pytest.raises(ValueError, match="adversarial examples of a different evaluation"):
        run(mnist_mlp, data, out=out, keep_adversarial="worst")


def test_cli_save_adversarial_writes_and_resumes(tmp_path, capsys):
    from relucap_plugin.cli import main

    argv = ["evaluate", "mlp:16", "--attack", "torch:FGSM", "--eps", "0.1", "--n-samples", "8",
            "--batch-size", "8", "--out", str(tmp_path / "out"), "--quiet", "--json"]
    assert main([*argv, "--save-adversarial", "worst"]) == 0
    assert "results.adversarial.safetensors" in capsys.readouterr().err
    res = Results.load(tmp_path / "out" / "results.jsonl")
    worst = res.worst_case_examples(0.1)
    assert worst.shape[0] == 8
    with pytest.raises(ValueError, match="--save-adversarial all"):
        res.adversarial_examples("torch:FGSM", 0.1)
    assert main([*argv, "--save-adversarial", "worst"]) == 0
    assert torch.equal(Results.load(tmp_path / "out" / "results.jsonl").worst_case_examples(0.1), worst)
    with pytest.raises(SystemExit):
        main([*argv, "--save-adversarial", "best"])


def test_a_foreign_examples_file_is_refused(mnist_mlp, data, tmp_path):
    import safetensors.torch

    out = tmp_path / "results.jsonl"
    run(mnist_mlp, data, out=out)
    safetensors.torch.save_file({"w": torch.zeros(2)}, sidecar_path(out))
    with pytest.raises(ValueError, match="not relucap adversarial examples"):
        run(mnist_mlp, data, out=out, keep_adversarial="worst")
    with open(sidecar_path(out), "wb") as f:
        f.write(b"not a safetensors file at all")
    with pytest.raises(ValueError, match="is not a relucap adversarial file"):
        run(mnist_mlp, data, out=out, keep_adversarial="worst")


def test_a_regenerated_verdict_that_contradicts_its_row_keeps_no_example(mnist_mlp, data, tmp_path):
    import json

    out = tmp_path / "results.jsonl"
    run(mnist_mlp, data, out=out)
    lines = out.read_text().splitlines()
    rows = [json.loads(line) for line in lines[1:]]
    j, row = next((j, r) for j, r in enumerate(rows) if r["status"] == "ok" and not r["skipped"]
                  and not r["adv_correct"] and r["attack"] == "custom:fgsm")
    row.update(adv_correct=True, adv_pred=row["label"])
    out.write_text("\n".join([lines[0], *(json.dumps(r) for r in rows)]) + "\n")
    with pytest.warns(RuntimeWarning, match="other verdicts than the stored rows"):
        res = run(mnist_mlp, data, out=out, keep_adversarial="all")
    idx, _ = res.adversarial_examples("custom:fgsm", row["eps"])
    assert row["sample"] not in idx.tolist()


def test_failed_rows_retried_on_resume_get_their_examples(mnist_mlp, data, full, tmp_path):
    out = tmp_path / "results.jsonl"
    STOP["fail"] = True
    try:
        with pytest.warns(RuntimeWarning, match="fails on purpose"):
            failed = run(mnist_mlp, data, out=out, keep_adversarial="all")
    finally:
        STOP["fail"] = False
    assert failed.failed()
    assert_same(tensors(run(mnist_mlp, data, out=out, keep_adversarial="all")), tensors(full))
