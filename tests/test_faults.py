"""Faults in a single-process evaluation: an attack raising inside its library, ``kill -9`` at a
random point then resume, and running out of memory on a batch (retried in halves).

The distributed kill test lives with the distributed evaluation's tests; the interrupted-run and
killed-CLI resume tests of tests/test_evaluation.py cover one fixed kill point each.
"""

import importlib.util
import json
import os
import random
import subprocess
import sys
import time
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from relucap_plugin.attacks import make_attack
from relucap_plugin.evaluation import AttackFailedError, evaluate
from relucap_plugin.models import mlp
from relucap_plugin.results import Results, ResultsFileWarning
from relucap_plugin.threat import EvalConfig, ThreatModel


def tiny_setup(n=60, classes=4):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = mlp((32,), in_shape=(1, 6, 6), num_classes=classes).eval()
        x = torch.rand(n, 1, 6, 6)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::5] = (y[::5] + 1) % classes  # some samples wrong clean: skipped rows
    return model, (x, y)


# ------------------------------------------------------------- an attack raising in its library
class NoInputGradients(nn.Module):
    """Refuses inputs that require grad: gradient attacks raise inside their library's code,
    decision-based ones (Square) never ask for gradients."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        if x.requires_grad:
            raise RuntimeError("input gradients are disabled in this model")
        return self.net(x)


def test_attack_raising_inside_a_library_is_failed_rows_and_the_others_complete():
    model, data = tiny_setup()
    net = NoInputGradients(model)
    tm = ThreatModel("Linf", eps=(0.1, 0.2), steps=20)
    with pytest.warns(RuntimeWarning, match="torchattacks:PGD failed at eps=0.1.*input gradients are disabled"):
        res = evaluate(net, data, ["torchattacks:PGD", "torchattacks:Square"], tm,
                       EvalConfig(batch_size=16, seed=0), progress=False)
    n_correct = round(60 * res.clean_accuracy())
    failed = res.failed()
    assert {r["attack"] for r in failed} == {"torchattacks:PGD"} and len(failed) == 2 * n_correct
    assert all(r["reason"] == "RuntimeError: input gradients are disabled in this model" for r in failed)
    square = [r for r in res.rows if r["attack"] == "torchattacks:Square"]
    assert len(square) == 2 * 60 and all(r["status"] == "ok" for r in square)
    pgd = next(s for s in res.summary() if s["attack"] == "torchattacks:PGD" and s["eps"] == 0.1)
    assert pgd["failed"] == n_correct and pgd["n"] == 60 - n_correct  # only the skipped rows count
    # a figure over the skipped rows alone would read 0%: incomplete attacks have no accuracy
    assert pgd["robust_accuracy"] is None and res.robust_accuracy("torchattacks:PGD", 0.1) is None
    assert res.robust_accuracy("torchattacks:Square", 0.1) is not None
    square = next(s for s in res.summary() if s["attack"] == "torchattacks:Square" and s["eps"] == 0.2)
    assert square["failed"] == 0 and square["n"] == 60
    assert sorted(res.missing()) == sorted((r["sample"], r["attack"], r["eps"]) for r in failed)
    table = res.table()
    assert f"{len(failed)} row(s) failed (the attack raised)" in table
    assert f"{len(failed)} (sample, attack, eps) row(s) have no outcome" in table


# --------------------------------------------------------------------- kill -9, then resume
SCRIPT = '''
import sys, time
import torch
from relucap_plugin.attacks import make_attack
from relucap_plugin.evaluation import evaluate
from relucap_plugin.models import mlp
from relucap_plugin.threat import EvalConfig, ThreatModel


def noise(model, x, y, eps):
    time.sleep(0.01)  # widens the window in which the kill lands
    return (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)


def run(out=None):
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = mlp((32,), in_shape=(1, 6, 6), num_classes=4).eval()
        x = torch.rand(96, 1, 6, 6)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::7] = (y[::7] + 1) % 4
    return evaluate(model, (x, y), ["torch:PGD", make_attack(noise, name="noise")],
                    ThreatModel("Linf", eps=(0.05, 0.1), steps=3), EvalConfig(batch_size=8, seed=1),
                    out=out, progress=False)


if __name__ == "__main__":
    run(sys.argv[1])
'''
TOTAL_ROWS = 96 * 2 * 2


@pytest.fixture(scope="module")
def script(tmp_path_factory):
    path = tmp_path_factory.mktemp("killed") / "run_eval.py"
    path.write_text(SCRIPT)
    spec = importlib.util.spec_from_file_location("run_eval", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return path, module


@pytest.fixture(scope="module")
def uninterrupted(script):
    return script[1].run().outcomes()


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_kill_9_at_a_random_point_then_resume_gives_the_uninterrupted_table(seed, script, uninterrupted, tmp_path):
    path, module = script
    rng = random.Random(seed)
    kill_after_rows, extra_delay = rng.randrange(1, TOTAL_ROWS - 40), rng.uniform(0, 0.03)
    out = tmp_path / "results.jsonl"
    proc = subprocess.Popen([sys.executable, str(path), str(out)], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while proc.poll() is None:
            if out.exists() and out.read_bytes().count(b"\n") - 1 >= kill_after_rows:
                time.sleep(extra_delay)
                proc.kill()  # SIGKILL: no cleanup, possibly mid-write
                break
            time.sleep(0.002)
    finally:
        proc.wait()
    assert proc.returncode == -9, "the run finished before it could be killed"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResultsFileWarning)  # a torn last line is dropped
        partial = Results.load(out)
        assert kill_after_rows <= len(partial) < TOTAL_ROWS
        resumed = module.run(out)
    assert resumed.outcomes() == uninterrupted
    lines = out.read_text().splitlines()
    keys = [(r["sample"], r["attack"], r["eps"]) for r in map(json.loads, lines[1:])]
    assert len(keys) == len(set(keys)) == TOTAL_ROWS  # nothing torn, duplicated or missing
    assert Results.load(out).outcomes() == uninterrupted


# ----------------------------------------------------------------------------- out of memory
def fgsm(model, x, y, eps):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


def random_noise(model, x, y, eps):
    return (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)


class MemoryLimit:
    """Runs ``attack`` but raises an out-of-memory error on batches larger than ``limit``."""

    def __init__(self, attack, limit, error):
        self.attack, self.limit, self.error, self.sizes = attack, limit, error, []

    def __call__(self, model, x, y, eps):
        self.sizes.append(len(x))
        if len(x) > self.limit:
            raise self.error
        return self.attack(model, x, y, eps)


OOM_ERRORS = {
    "cuda-oom": torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "runtime-oom": RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate "
                                "memory: you tried to allocate 1 GB. out of memory"),
}


@pytest.mark.parametrize("error", OOM_ERRORS.values(), ids=OOM_ERRORS.keys())
def test_out_of_memory_retries_in_halves_and_says_so(error):
    model, data = tiny_setup()
    tm, cfg = ThreatModel("Linf", eps=(0.05, 0.1)), EvalConfig(batch_size=20)
    normal = evaluate(model, data, make_attack(fgsm, name="a"), tm, cfg, progress=False)
    limited = MemoryLimit(fgsm, 6, error)
    with pytest.warns(RuntimeWarning, match=r"custom:a ran out of memory at eps=0.05 on \d+ samples from "
                      r"sample 0; retrying in batches of \d+ and \d+"):
        split = evaluate(model, data, make_attack(limited, name="a"), tm, cfg, progress=False)
    assert max(limited.sizes) > 6 and min(limited.sizes) <= 6
    assert not split.failed() and split.outcomes() == normal.outcomes()  # deterministic: equal tables


def test_split_random_attack_is_complete_and_reproducible():
    """Halves are seeded by their offset, so a random attack that had to split gives a table
    of its own, the same on every run that splits alike (and never a failed row)."""
    model, data = tiny_setup()
    tm, cfg = ThreatModel("Linf", eps=0.1), EvalConfig(batch_size=20, seed=5)
    runs = []
    for _ in range(2):
        with pytest.warns(RuntimeWarning, match="ran out of memory"):
            limited = MemoryLimit(random_noise, 5, OOM_ERRORS["cuda-oom"])
            runs.append(evaluate(model, data, make_attack(limited, name="noise"), tm, cfg, progress=False))
    assert runs[0].outcomes() == runs[1].outcomes() and not runs[0].missing()
    assert all(r["status"] == "ok" and r["norm"] <= 0.1 for r in runs[0].rows)


def test_out_of_memory_on_a_single_sample_is_a_failed_row():
    model, data = tiny_setup(n=10)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(AttackFailedError, match="every attack failed") as info:  # nothing measured
            evaluate(model, data, make_attack(MemoryLimit(fgsm, 0, OOM_ERRORS["cuda-oom"]), name="a"),
                     ThreatModel("Linf", eps=0.1), EvalConfig(batch_size=10), progress=False)
    res = info.value.results
    n_correct = round(10 * res.clean_accuracy())
    assert len(res.failed()) == n_correct
    assert all(r["reason"].startswith("OutOfMemoryError: CUDA out of memory") for r in res.failed())
    messages = [str(w.message) for w in caught]
    assert any("ran out of memory" in m for m in messages)
    assert any("custom:a failed at eps=0.1" in m for m in messages)


def test_other_runtime_errors_are_not_retried():
    model, data = tiny_setup(n=10)
    limited = MemoryLimit(fgsm, 0, RuntimeError("shape mismatch"))
    with pytest.warns(RuntimeWarning, match="custom:a failed"), pytest.raises(AttackFailedError) as info:
        evaluate(model, data, make_attack(limited, name="a"), ThreatModel("Linf", eps=0.1),
                 EvalConfig(batch_size=10), progress=False)
    assert len(limited.sizes) == 1 and info.value.results.failed()
