"""The cascade schedule of evaluate (relucap_plugin/cascade.py): worst case, not_needed rows,
nested budgets, conditional labels, determinism, resume, the schedule in the file's identity,
infinite caps and the audit's reuse of a suite run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from relucap_plugin import EvalConfig, ThreatModel, cap_relus, evaluate
from relucap_plugin.adaptive import SurrogateAttack, TransferAttack, get_suite
from relucap_plugin.adaptive.suite import _has_caps
from relucap_plugin.adaptive import attack_kind
from relucap_plugin.cascade import cascade_order
from relucap_plugin.evaluation import norm_tolerance
from relucap_plugin.models import mlp
from relucap_plugin.results import Results

EPS = (0.05, 0.1, 0.2)
TM = ThreatModel("Linf", eps=EPS, steps=10)
CFG = EvalConfig(batch_size=12, device="cpu", seed=0)
N = 24


@pytest.fixture(scope="module")
def data(mnist5k):
    _, test = mnist5k
    return test.tensors[0][:N], test.tensors[1][:N]


@pytest.fixture(scope="module")
def suite(capped_mlp, data):
    return get_suite("standard", TM, capped_mlp, data[0][:8], square_queries=100)


@pytest.fixture(scope="module")
def runs(capped_mlp, data, suite):
    """The full and the cascade schedule of the same suite on the capped MLP."""
    full = evaluate(capped_mlp, data, suite, TM, CFG, progress=False)
    cascade = evaluate(capped_mlp, data, suite, TM, CFG, progress=False, schedule="cascade")
    return full, cascade


def test_cascade_worst_case_is_at_most_full_per_sample(runs):
    full, cascade = runs
    assert cascade.keys() == full.keys()  # one row per (sample, attack, eps) under both
    for eps in EPS:
        f, c = full.per_sample_worst_case(eps), cascade.per_sample_worst_case(eps)
        assert set(c) == set(f) == set(range(N))
        assert all(c[s] <= f[s] for s in f), eps
        assert cascade.worst_case(eps) <= full.worst_case(eps)
    # the cascade did skip work: most later attacks were not needed on most samples
    skipped = [r for r in cascade if r["status"] == "not_needed"]
    assert len(skipped) > len(cascade) // 4
    assert not [r for r in full if r["status"] == "not_needed"]


def test_order_puts_white_box_first_and_black_box_last(suite):
    order = cascade_order(suite, lambda a: attack_kind(a.spec, a.family))
    assert order[0].spec == "torch:PGD"
    assert "Square" in order[-1].spec
    kinds = [type(a) for a in order]
    assert kinds.index(SurrogateAttack) < kinds.index(TransferAttack)


def test_first_attack_runs_on_every_clean_correct_sample(runs):
    _, cascade = runs
    first = cascade.attacks[0]
    assert first == "torch:PGD"
    rows = [r for r in cascade if r["attack"] == first]
    assert all(r["status"] == "ok" for r in rows)
    assert not cascade.conditional(first)
    assert all(cascade.conditional(a) for a in cascade.attacks[1:])


def test_not_needed_rows_never_count_as_robust_or_failed(runs):
    _, cascade = runs
    for r in cascade:
        if r["status"] == "not_needed":
            assert r["adv_correct"] is None and r["reason"].startswith("not needed: broken by")
            # the sample was broken at this eps by an attack that ran before it
            others = [o for o in cascade if o["sample"] == r["sample"] and o["eps"] == r["eps"]
                      and o["status"] == "ok" and o["adv_correct"] is False]
            assert others
    assert cascade.missing() == []
    assert cascade.failed() == []
    conditional = cascade.attacks[1]
    assert cascade.robust_accuracy(conditional, EPS[0]) is None  # never a silently wrong number
    row = next(s for s in cascade.summary() if s["attack"] == conditional and s["eps"] == EPS[0])
    assert row["conditional"] and row["failed"] == 0
    ran = [r for r in cascade if r["attack"] == conditional and r["eps"] == EPS[0]
           and r["clean_correct"] and r["status"] != "not_needed"]
    assert row["n"] == len(ran)
    if ran:
        assert row["robust_accuracy"] == sum(r["adv_correct"] for r in ran) / len(ran)


def test_not_needed_row_is_excluded_from_the_worst_case():
    base = {"library": "x", "label": 0, "clean_pred": 0, "clean_correct": True, "eps": 0.1}
    rows = [
        {**base, "sample": 0, "attack": "x:A", "adv_correct": True, "status": "ok"},
        {**base, "sample": 0, "attack": "x:B", "adv_correct": True, "status": "not_needed"},
        {**base, "sample": 1, "attack": "x:A", "adv_correct": False, "status": "ok"},
        {**base, "sample": 1, "attack": "x:B", "adv_correct": None, "status": "not_needed"},
    ]
    res = Results(rows)
    assert [r["adv_correct"] for r in res if r["status"] == "not_needed"] == [None, None]
    assert res.per_sample_worst_case(0.1) == {0: True, 1: False}
    assert res.per_sample_worst_case(0.1, ["x:B"]) == {}
    assert res.robust_accuracy("x:B", 0.1) is None and res.robust_accuracy("x:A", 0.1) == 0.5


def test_nested_reuse_rows_are_verified_at_the_larger_eps(capped_mlp, data, suite):
    x, y = data
    res = evaluate(capped_mlp, data, suite, TM, CFG, progress=False, schedule="cascade",
                   keep_adversarial="all")
    reused = [r for r in res if (r["reason"] or "").startswith("reused")]
    assert reused, "some sample broken at a small eps must be reused at a larger one"
    for r in reused:
        assert not r["adv_correct"] and r["status"] == "ok"
        eps0 = float(r["reason"].split("eps ")[1].split(",")[0])
        assert eps0 < r["eps"]
        idx, ex = res.adversarial_examples(r["attack"], r["eps"])
        example = ex[idx.tolist().index(r["sample"])]
        idx0, ex0 = res.adversarial_examples(r["attack"], eps0)
        assert torch.equal(example, ex0[idx0.tolist().index(r["sample"])])  # the same example
        delta = (example - x[r["sample"]]).abs().max().item()
        assert delta <= norm_tolerance(r["eps"], TM, x) and math.isclose(delta, r["norm"], rel_tol=1e-5)
        with torch.no_grad():
            assert capped_mlp(example[None]).argmax(1).item() != y[r["sample"]].item()


def test_printed_table_labels_conditional_numbers_and_refuses_agreement(capped_mlp, data):
    tm = TM.replace(eps=(0.1,))
    attacks = ["torch:PGD", "torchattacks:PGD"]
    cascade = evaluate(capped_mlp, data, attacks, tm, CFG, progress=False, schedule="cascade")
    full = evaluate(capped_mlp, data, attacks, tm, CFG, progress=False)
    text = cascade.table()
    assert "torchattacks:PGD (conditional)" in text
    assert "torch:PGD (conditional)" not in text
    assert "cascade schedule" in text and "agreement across libraries is n/a" in text
    assert cascade.agreement() == [] and full.agreement() != []
    assert "(conditional)" not in full.table() and "cascade schedule" not in full.table()


def test_same_seed_same_table(capped_mlp, data, suite, runs):
    _, cascade = runs
    again = evaluate(capped_mlp, data, suite, TM, CFG, progress=False, schedule="cascade")
    assert again.outcomes() == cascade.outcomes()


class _Interrupting:
    """torch:PGD-like FGSM step that raises KeyboardInterrupt after ``limit`` calls."""

    calls, limit = 0, None

    def __call__(self, model, x, y, eps):
        _Interrupting.calls += 1
        if self.limit is not None and _Interrupting.calls > self.limit:
            raise KeyboardInterrupt
        x = x.clone().requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        (grad,) = torch.autograd.grad(loss, x)
        return (x + eps * grad.sign()).clamp(0, 1).detach()


def test_killed_run_resumes_to_the_identical_table(capped_mlp, data, tmp_path):
    from relucap_plugin import make_attack

    tm = TM.replace(eps=(0.05, 0.2))
    step = _Interrupting()
    attacks = ["torch:FGSM", make_attack(step, name="step"), "torch:PGD"]
    ref = evaluate(capped_mlp, data, attacks, tm, CFG, progress=False, schedule="cascade")
    out = tmp_path / "r.jsonl"
    _Interrupting.calls, _Interrupting.limit = 0, 2  # dies in the second batch
    with pytest.raises(KeyboardInterrupt):
        evaluate(capped_mlp, data, attacks, tm, CFG, out=out, progress=False, schedule="cascade")
    partial = Results.load(out)
    assert 0 < len(partial) < len(ref)
    _Interrupting.limit = None
    resumed = evaluate(capped_mlp, data, attacks, tm, CFG, out=out, progress=False, schedule="cascade")
    assert resumed.outcomes() == ref.outcomes()
    assert Results.load(out).outcomes() == ref.outcomes()


@pytest.mark.parametrize("keep", [3, 41])
def test_truncated_file_resumes_to_the_identical_table(capped_mlp, data, suite, runs, tmp_path, keep):
    _, ref = runs
    out = tmp_path / "r.jsonl"
    evaluate(capped_mlp, data, suite, TM, CFG, out=out, progress=False, schedule="cascade")
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:1 + keep]) + lines[1 + keep][:7])  # and a torn line
    with pytest.warns(UserWarning, match="torn"):
        resumed = evaluate(capped_mlp, data, suite, TM, CFG, out=out, progress=False,
                           schedule="cascade")
    assert resumed.outcomes() == ref.outcomes()


def test_schedule_is_part_of_the_run_identity(capped_mlp, data, tmp_path):
    tm = TM.replace(eps=(0.1,))
    out = tmp_path / "r.jsonl"
    evaluate(capped_mlp, data, ["torch:FGSM", "torch:PGD"], tm, CFG, out=out, progress=False,
             schedule="cascade")
    header = json.loads(out.read_text().splitlines()[0])["metadata"]
    assert header["schedule"] == "cascade" and header["fingerprint"]["schedule"] == "cascade"
    with pytest.raises(ValueError, match="schedule"):
        evaluate(capped_mlp, data, ["torch:FGSM", "torch:PGD"], tm, CFG, out=out, progress=False)
    full = tmp_path / "f.jsonl"
    evaluate(capped_mlp, data, ["torch:FGSM"], tm, CFG, out=full, progress=False)
    with pytest.raises(ValueError, match="schedule"):
        evaluate(capped_mlp, data, ["torch:FGSM"], tm, CFG, out=full, progress=False,
                 schedule="cascade")
    with pytest.raises(ValueError, match="schedule='fast'"):
        evaluate(capped_mlp, data, ["torch:FGSM"], tm, CFG, progress=False, schedule="fast")


def test_infinite_caps_count_as_no_cap(data):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = mlp((16, 8, 16))
    inf_capped, _ = cap_relus(model, math.inf)
    finite, _ = cap_relus(model, 1.0)
    x = data[0][:4]
    assert _has_caps(inf_capped, None) is False and _has_caps(inf_capped, x) is False
    assert _has_caps(finite, None) is True
    names = [a.spec for a in get_suite("standard", TM, inf_capped, x, square_queries=10)]
    assert not any("+bpda" in n or "+transfer" in n for n in names)
    assert any("+bpda" in n for n in (a.spec for a in get_suite("standard", TM, finite, x,
                                                                 square_queries=10)))


def test_audit_reuses_the_suite_run(capped_mlp, data, runs, monkeypatch):
    import relucap_plugin.diagnostics as diagnostics

    _, cascade = runs

    def no_second_suite(*args, **kwargs):
        raise AssertionError("audit ran the suite again")

    monkeypatch.setattr(diagnostics, "evaluate_suite", no_second_suite)
    report = diagnostics.audit(capped_mlp, data, TM, CFG, results=cascade)
    assert [o for o in report.results.outcomes() if o[1] != "torch:FGSM"] == cascade.outcomes()
    assert "torch:FGSM" in report.results.attacks  # only the single-step attack was added
    assert not report.flag("single_step_beats_iterative").skipped
    assert report.over_report is not None and report.over_report["pgd_attacks"] == ["torch:PGD"]


def test_audit_schedule_runs_each_evidence_kind_on_the_white_box_survivors(capped_mlp, data, suite):
    tm = TM.replace(eps=(0.1,))
    res = evaluate(capped_mlp, data, suite, tm, CFG, progress=False, schedule="audit")
    white = {a for a in res.attacks if "+" not in a and "Square" not in a}
    for r in res:
        if r["status"] == "not_needed":
            assert r["attack"] in white or any(w in r["reason"] for w in white), r
            assert not any(k in r["reason"] for k in ("+bpda", "+transfer", "Square"))
    survivors = {s for s, robust in res.per_sample_worst_case(0.1, sorted(white)).items() if robust}
    for attack in res.attacks:
        if attack not in white:
            ran = {r["sample"] for r in res if r["attack"] == attack and r["status"] != "not_needed"
                   and r["clean_correct"]}
            assert ran == survivors, attack


def test_unconditional_attacks_keep_exact_per_attack_and_agreement(capped_mlp, data):
    tm = TM.replace(eps=(0.1,))
    attacks = ["torch:PGD", "torchattacks:PGD", "torch:FGSM"]
    full = evaluate(capped_mlp, data, attacks, tm, CFG, progress=False)
    res = evaluate(capped_mlp, data, attacks, tm, CFG, progress=False, schedule="cascade",
                   unconditional=["torchattacks:PGD"])
    assert not res.conditional("torchattacks:PGD") and res.conditional("torch:FGSM")
    for attack in ("torch:PGD", "torchattacks:PGD"):
        assert res.robust_accuracy(attack, 0.1) == full.robust_accuracy(attack, 0.1)
    assert res.agreement() == full.agreement() != []
    assert res.metadata["unconditional"] == ["torchattacks:PGD"]
    with pytest.raises(ValueError, match=r"unconditional=\['art:PGD'\] names no attack"):
        evaluate(capped_mlp, data, attacks, tm, CFG, progress=False, schedule="cascade",
                 unconditional=["art:PGD"])
    with pytest.raises(ValueError, match="only applies to schedule='cascade'"):
        evaluate(capped_mlp, data, attacks, tm, CFG, progress=False, unconditional=["torch:PGD"])


@pytest.mark.slow
def test_cascade_under_torchrun_equals_one_process(tmp_path):
    """Two torchrun ranks, each running the cascade on its own batches, give the rows of one
    process (CLI, with a schedule mismatch refused on resume)."""
    import os
    import subprocess
    import sys

    from relucap_plugin.cli import main
    from relucap_plugin.data import load_mnist5k

    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = mlp((32, 16)).eval()
    x = load_mnist5k()[1].tensors[0][:18]
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::4] = (y[::4] + 1) % 10
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    args = ["evaluate", "mlp:32,16", "--data", str(tmp_path / "data.pt"), "--attack", "torch:FGSM",
            "--attack", "torch:PGD", "--eps", "0.02", "0.05", "--steps", "3", "--batch-size", "4",
            "--device", "cpu", "--schedule", "cascade"]
    assert main([*args, "--out", str(tmp_path / "single"), "--quiet"]) == 0
    single = Results.load(tmp_path / "single" / "results.jsonl")
    assert single.schedule == "cascade" and any(r["status"] == "not_needed" for r in single)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTEST_XDIST_WORKER", None)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m",
                           "relucap_plugin.cli", *args, "--out", "dist", "--quiet"],
                          capture_output=True, text=True, env=env, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = Results.load(tmp_path / "dist" / "results.jsonl")
    assert merged.outcomes() == single.outcomes() and merged.metadata["world_size"] == 2
    full = [a if a != "cascade" else "full" for a in args]
    assert main([*full, "--out", str(tmp_path / "single"), "--quiet"]) == 2  # another schedule


class _Switch:
    """A signed-gradient step of eps while ``strong``, else the clean input (no change)."""

    strong = True

    def __call__(self, model, x, y, eps):
        if not _Switch.strong:
            return x
        x = x.clone().requires_grad_(True)
        (grad,) = torch.autograd.grad(torch.nn.functional.cross_entropy(model(x), y), x)
        return (x + eps * grad.sign()).clamp(0, 1).detach()


def test_resumed_batch_that_disagrees_with_its_rows_warns(capped_mlp, data, tmp_path):
    from relucap_plugin import make_attack

    tm = TM.replace(eps=(0.1, 0.2))
    attacks = [make_attack(_Switch(), name="switch"), "torch:FGSM"]
    out = tmp_path / "r.jsonl"
    _Switch.strong = True
    evaluate(capped_mlp, data, attacks, tm, CFG, out=out, progress=False, schedule="cascade")
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:1 + 12]))  # batch 0 keeps only its first unit's rows
    stored = Results.load(out).outcomes()
    _Switch.strong = False
    try:
        with pytest.warns(RuntimeWarning, match="got other outcomes than the stored rows"):
            resumed = evaluate(capped_mlp, data, attacks, tm, CFG, out=out, progress=False,
                               schedule="cascade")
    finally:
        _Switch.strong = True
    assert [o for o in resumed.outcomes() if o in stored] == stored  # the stored rows are kept


RANDOM_TM = ThreatModel("Linf", eps=(0.03, 0.05, 0.08), steps=2, restarts=2, random_start=True)


def test_randomised_pgd_gives_a_sample_the_same_example_in_any_batch(capped_mlp, mnist5k):
    from relucap_plugin import get_attack

    x, y = mnist5k[1].tensors[0][:48], mnist5k[1].tensors[1][:48]
    for spec in ("torch:PGD", "torch:PGD-margin"):
        attack = get_attack(spec, RANDOM_TM)
        whole = attack(capped_mlp, x, y, 0.05, seed=3)
        sub = torch.tensor([40, 2, 17, 33])  # any subset, in any order
        part = attack(capped_mlp, x[sub], y[sub], 0.05, seed=3, sample_ids=sub)
        assert torch.equal(part, whole[sub]), spec
        assert not torch.equal(attack(capped_mlp, x, y, 0.05, seed=4), whole)  # the seed matters
    with pytest.raises(ValueError, match="sample_ids must be 2 distinct integers"):
        attack(capped_mlp, x[:2], y[:2], 0.05, seed=3, sample_ids=[1, 1])


def test_cascade_of_randomised_own_attacks_is_at_most_full_on_every_sample(capped_mlp, mnist5k):
    """Random start and restarts draw per sample, so an attack that the cascade runs on the
    survivors only gives each of them the example it gets in the full schedule."""
    from relucap_plugin import get_attack

    x, y = mnist5k[1].tensors[0][:48], mnist5k[1].tensors[1][:48]
    pgd = get_attack("torch:PGD", RANDOM_TM)
    attacks = [pgd, get_attack("torch:PGD-margin", RANDOM_TM), SurrogateAttack(pgd, "ste")]
    cfg = EvalConfig(batch_size=48, device="cpu", seed=0)
    full = evaluate(capped_mlp, (x, y), attacks, RANDOM_TM, cfg, progress=False)
    cascade = evaluate(capped_mlp, (x, y), attacks, RANDOM_TM, cfg, progress=False,
                       schedule="cascade")
    assert [r for r in cascade if r["status"] == "not_needed"]
    for eps in RANDOM_TM.eps:
        f, c = full.per_sample_worst_case(eps), cascade.per_sample_worst_case(eps)
        assert set(c) == set(f) == set(range(48))
        assert [s for s in f if c[s] > f[s]] == [], eps


def test_library_style_attack_gets_the_full_schedules_call_seed_on_the_survivors(capped_mlp, data):
    """An attack that draws batch-wide from the global generator (as torchattacks' Square does)
    cannot give each sample the full schedule's draws on fewer samples, but its call is seeded
    as in the full schedule: the first draw of each call is the full schedule's."""
    from relucap_plugin import make_attack

    draws: list[tuple[float, int]] = []

    def square_like(model, x, y, eps):
        draws.append((eps, int(torch.randint(2**31 - 1, ()))))
        return x.clone()

    attacks = ["torch:FGSM", make_attack(square_like, name="draws", family="Square")]
    tm = TM.replace(eps=(0.02, 0.05))
    evaluate(capped_mlp, data, attacks, tm, CFG, progress=False)
    full, draws[:] = list(draws), []
    cascade = evaluate(capped_mlp, data, attacks, tm, CFG, progress=False, schedule="cascade")
    assert [r for r in cascade if r["status"] == "not_needed"]  # it ran on the survivors only
    assert draws and set(draws) <= set(full)
    assert len(set(full)) == len(full)  # one seed per (eps, batch)
