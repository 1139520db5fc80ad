"""relucap_plugin.distributed: evaluate() on 2 ranks equals 1 rank, resumes after a rank is
SIGKILLed, and only rank 0 prints.

The multi-rank tests are real launches, ``torchrun --standalone --nproc-per-node 2`` (gloo on
CPU, one thread per rank), of the CLI or of this file run as a script (``_worker`` below). The
reference is a single-process evaluate() of the same model, data and seeds in the test process.
N = 23 samples in batches of 4: 6 batches, not divisible by world size x batch size.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, IterableDataset, TensorDataset

from relucap_plugin.attacks import make_attack
from relucap_plugin.data import as_loader, numbered_batches
from relucap_plugin.distributed import DistContext, merge_shards, shard_files, shard_path
from relucap_plugin.evaluation import evaluate
from relucap_plugin.results import Results
from relucap_plugin.threat import EvalConfig, ThreatModel

N, BS, EPS = 23, 4, (0.05, 0.1)
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
KILL_AFTER = 2  # rank 1 SIGKILLs itself in its 2nd call of the custom attack


def _model():
    from relucap_plugin.models import mlp

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return mlp((32, 16)).eval()


def _data(model):
    """23 MNIST digits labelled with the model's own predictions, except every 5th (wrong label:
    a skipped row), so that most samples are attacked."""
    from relucap_plugin.data import load_mnist5k

    x = load_mnist5k()[1].tensors[0][:N]
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::5] = (y[::5] + 1) % 10
    return x, y


def _noisy_fgsm(model, x, y, eps):
    """A signed-gradient step of eps/4 from a random start in the eps/2-ball: its norm and
    outcome depend on the seed.
    Logs each call (per-sample pixel sums, eps) per rank and, when told, SIGKILLs rank 1."""
    log = os.environ.get("RELUCAP_TEST_CALL_LOG")
    if log:
        with open(f"{log}.rank{os.environ.get('RANK', '0')}", "a") as f:
            f.write(json.dumps([x.flatten(1).sum(1).tolist(), eps]) + "\n")
    _noisy_fgsm.calls = getattr(_noisy_fgsm, "calls", 0) + 1
    if os.environ.get("RELUCAP_TEST_KILL") and os.environ.get("RANK") == "1":
        if _noisy_fgsm.calls == KILL_AFTER:
            os.kill(os.getpid(), signal.SIGKILL)
    x0 = (x + torch.empty_like(x).uniform_(-eps / 2, eps / 2)).clamp(0, 1).requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x0), y), x0)
    return (x0.detach() + eps / 4 * grad.sign()).clamp(0, 1)  # its norm depends on the seed


def _setup():
    model = _model()
    attacks = ["torch:PGD", make_attack(_noisy_fgsm, name="noisy_fgsm")]
    tm = ThreatModel("Linf", eps=EPS, steps=3)
    return model, _data(model), attacks, tm, EvalConfig(batch_size=BS, seed=0, device="cpu")


def _reference():
    model, data, attacks, tm, cfg = _setup()
    return evaluate(model, data, attacks, tm, cfg, progress=False, model_name="tiny")


@pytest.fixture(scope="module")
def reference():
    return _reference()


def _keys(path):
    with open(path) as f:
        rows = [json.loads(line) for line in f.read().splitlines()[1:]]
    return [(r["sample"], r["attack"], r["eps"]) for r in rows]


# ------------------------------------------------------------------------------ in-process
@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize(
    "kind", ["tensors", "dataset", "loader", "distributed_sampler", "iterable"]
)
def test_ranks_take_whole_batches_of_the_single_process_run(kind, world):
    x, y = torch.rand(N, 1, 4, 4), torch.arange(N) % 10
    dataset = TensorDataset(x, y)

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(zip(x, y))

    def make(rank):
        if kind == "tensors":
            return as_loader((x, y), batch_size=BS)
        if kind == "dataset":
            return as_loader(dataset, batch_size=BS)
        if kind == "loader":
            return DataLoader(dataset, batch_size=BS)
        if kind == "iterable":
            return DataLoader(Stream(), batch_size=BS)
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=False)
        return DataLoader(dataset, batch_size=BS, sampler=sampler)

    single = [(s, xb, yb) for s, xb, yb in numbered_batches(DataLoader(dataset, batch_size=BS), N - 2)]
    got = []
    for rank in range(world):
        ctx = DistContext(rank, world, rank, torch.device("cpu"))
        mine = list(ctx.batches(make(rank), N - 2))
        owned = [s for b, (s, _, _) in enumerate(single) if b % world == rank]
        assert [s for s, _, _ in mine] == owned
        assert ctx.samples == {i for s, xb, _ in mine for i in range(s, s + len(xb))}
        got += mine
    assert sorted(s for s, _, _ in got) == [s for s, _, _ in single]  # disjoint, no padding
    for s, xb, yb in got:
        _, x1, y1 = next(b for b in single if b[0] == s)
        assert torch.equal(xb, x1) and torch.equal(yb, y1)
    assert sum(len(xb) for _, xb, _ in got) == N - 2


def test_the_reference_rows_depend_on_the_seed(reference):
    """So that equal tables below mean equal seeds: every attacked noisy_fgsm row changes."""
    model, data, attacks, tm, _ = _setup()
    other = evaluate(model, data, attacks, tm, EvalConfig(batch_size=BS, seed=1, device="cpu"),
                     progress=False, model_name="tiny")
    changed = [a[1] for a, b in zip(reference.outcomes(), other.outcomes()) if a != b]
    attacked = [r for r in reference.rows if r["attack"] == "custom:noisy_fgsm"
                and not r["skipped"]]
    assert changed.count("custom:noisy_fgsm") == len(attacked) == 36


def test_a_shuffling_loader_without_generator_is_refused():
    loader = DataLoader(TensorDataset(torch.rand(8, 2), torch.zeros(8)), batch_size=2, shuffle=True)
    with pytest.raises(ValueError, match="shuffle=False"):
        list(DistContext(0, 2, 0, torch.device("cpu")).batches(loader, None))


def test_shard_names_round_trip(tmp_path):
    path = tmp_path / "results.jsonl"
    for rank, world in [(1, 2), (0, 2), (2, 3)]:
        open(shard_path(path, rank, world), "w").close()
    (tmp_path / "other.rank0-of-2.jsonl").touch()
    assert shard_path(path, 1, 2) == str(tmp_path / "results.rank1-of-2.jsonl")
    assert [(os.path.basename(f), r, w) for f, r, w in shard_files(path)] == [
        ("results.rank0-of-2.jsonl", 0, 2),
        ("results.rank1-of-2.jsonl", 1, 2),
        ("results.rank2-of-3.jsonl", 2, 3),
    ]


def test_single_process_resume_adopts_shards_and_recomputes_only_missing_rows(
    tmp_path, reference, monkeypatch
):
    """Shards of an interrupted 2-rank run (rank 1 lost its last batch) finished by one process."""
    path = tmp_path / "results.jsonl"
    rows = reference.rows
    for rank in (0, 1):
        part = [r for r in rows if (r["sample"] // BS) % 2 == rank]
        part = [r for r in part if not (rank and r["sample"] >= 20)]
        Results(part, reference.metadata).save(shard_path(path, rank, 2))
    log = tmp_path / "calls"
    monkeypatch.setenv("RELUCAP_TEST_CALL_LOG", str(log))
    model, data, attacks, tm, cfg = _setup()
    res = evaluate(model, data, attacks, tm, cfg, out=path, progress=False, model_name="tiny")
    assert res.outcomes() == reference.outcomes()
    keys = _keys(path)
    assert len(keys) == len(set(keys)) == N * 2 * len(EPS)
    calls = [json.loads(line) for line in open(f"{log}.rank0")]
    assert len(calls) == 2 and all(len(c[0]) == 2 for c in calls)  # samples 20-22, 20 skipped
    assert merge_shards(path).outcomes() == reference.outcomes()  # idempotent
    assert len(_keys(path)) == N * 2 * len(EPS)
    evaluate(model, data, attacks, tm, cfg, out=path, resume=False, progress=False,
             model_name="tiny")
    assert shard_files(path) == []  # starting over drops the old shards


# ------------------------------------------------------------------------------ torchrun
def _torchrun(args, tmp_path, env=None, name="logs"):
    """``torchrun --standalone --nproc-per-node 2`` with each rank's stdout/stderr in a file."""
    logs = tmp_path / name
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    full_env.pop("PYTEST_XDIST_WORKER", None)
    proc = subprocess.run(
        [TORCHRUN, "--standalone", "--nproc-per-node", "2", "--redirects", "3",
         "--log-dir", str(logs), *args],
        capture_output=True, text=True, env=full_env, timeout=240, cwd=tmp_path,
    )
    streams = {}
    for rank in (0, 1):
        for stream in ("stdout", "stderr"):
            (found,) = logs.glob(f"*/attempt_0/{rank}/{stream}.log")
            streams[rank, stream] = found.read_text()
    return proc, streams


@pytest.mark.slow
def test_cli_under_torchrun_equals_one_process_and_only_rank_0_prints(tmp_path, capsys):
    from relucap_plugin.cli import main

    model = _model()
    x, y = _data(model)
    torch.save({"x": x, "y": y}, tmp_path / "data.pt")
    args = ["evaluate", "mlp:32,16", "--data", str(tmp_path / "data.pt"), "--attack",
            "torch:PGD", "--eps", *map(str, EPS), "--steps", "3", "--batch-size", str(BS),
            "--device", "cpu"]
    assert main([*args, "--out", str(tmp_path / "single"), "--quiet"]) == 0
    single = Results.load(tmp_path / "single" / "results.jsonl")
    proc, logs = _torchrun(["-m", "relucap_plugin.cli", *args, "--out", "dist"], tmp_path,
                           env={"FORCE_COLOR": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = Results.load(tmp_path / "dist" / "results.jsonl")
    assert merged.outcomes() == single.outcomes() and len(merged) == N * len(EPS)
    assert merged.metadata["world_size"] == 2
    keys = _keys(tmp_path / "dist" / "results.jsonl")
    assert len(keys) == len(set(keys))
    files = shard_files(tmp_path / "dist" / "results.jsonl")
    shards = {r: Results.load(f).samples for f, r, w in files}
    assert shards == {0: [0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19],
                      1: [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22]}
    assert "robust acc" in logs[0, "stdout"] and "results written to dist/" in logs[0, "stderr"]
    assert "attack(s) x 2 eps, rank 0 of 2" in logs[0, "stderr"]  # the progress bar
    assert logs[1, "stdout"] == ""
    assert "attack(s)" not in logs[1, "stderr"] and "robust acc" not in logs[1, "stderr"]
    assert sorted(os.listdir(tmp_path / "dist")) == sorted(
        ["results.jsonl", "results.rank0-of-2.jsonl", "results.rank1-of-2.jsonl", "results.md",
         "results.txt", "robust_accuracy.png"])


@pytest.mark.slow
def test_killed_rank_resumes_to_the_uninterrupted_table(tmp_path, reference):
    out = tmp_path / "run" / "results.jsonl"
    out.parent.mkdir()
    script = [os.path.abspath(__file__), str(out)]
    proc, _ = _torchrun(script, tmp_path, env={"RELUCAP_TEST_KILL": "1"}, name="killed")
    assert proc.returncode != 0  # rank 1 died, torchrun stopped rank 0
    assert not out.exists()  # nothing merged
    before = {0: Counter(), **{r: Counter(_keys(f)) for f, r, w in shard_files(out)}}
    # rank 1 wrote batch 4-7 with torch:PGD at both eps and noisy_fgsm at 0.05, then died
    assert sum(before[1].values()) == 4 * 3 and max(before[1].values()) == 1

    log = tmp_path / "calls"
    proc, logs = _torchrun(script, tmp_path, env={"RELUCAP_TEST_CALL_LOG": str(log)},
                           name="resumed")
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = Results.load(out)
    assert merged.outcomes() == reference.outcomes()
    keys = _keys(out)
    assert len(keys) == len(set(keys)) == N * 2 * len(EPS)
    expected = set(reference.keys())
    for f, _rank, _ in shard_files(out):
        after = Counter(_keys(f))
        assert max(after.values()) == 1  # no duplicated rows
        assert set(after) <= expected
    missing = expected - set(before[0]) - set(before[1])
    added = set().union(*(set(_keys(f)) for f, _, _ in shard_files(out)))
    added -= set(before[0]) | set(before[1])
    assert added == missing  # exactly the missing rows were computed
    fgsm_missing = {(s // BS, e) for s, a, e in missing if a == "custom:noisy_fgsm"}
    logged = [f"{log}.rank{r}" for r in (0, 1) if os.path.exists(f"{log}.rank{r}")]
    calls = sum(len(open(f).read().splitlines()) for f in logged)
    assert calls == len(fgsm_missing)  # one attack call per (batch, eps) with a missing row

    # merging is idempotent: the merged file and every shard again give the same table
    again = Results.load(out).merge(*(Results.load(f) for f, _, _ in shard_files(out)))
    assert again.outcomes() == reference.outcomes() and len(again) == len(reference)
    assert merge_shards(out, save=False).outcomes() == reference.outcomes()

    # what the worker's ranks returned and printed
    part1 = Results.load(tmp_path / "returned.rank1.jsonl")
    assert part1.samples == [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22]
    assert Results.load(tmp_path / "returned.rank0.jsonl").outcomes() == reference.outcomes()
    assert "robust acc" in logs[0, "stdout"] and logs[1, "stdout"] == ""
    loader_rows = Results.load(tmp_path / "loader.rank0.jsonl")
    assert loader_rows.outcomes() == reference.outcomes()  # DataLoader + DistributedSampler
    assert "differ in the model's weights" in (tmp_path / "mismatch.rank0.txt").read_text()
    assert "differ in the model's weights" in (tmp_path / "mismatch.rank1.txt").read_text()
    # (issue 12) ranks holding different data are refused, on every rank, before any attack
    for rank in (0, 1):
        text = (tmp_path / f"datamismatch.rank{rank}.txt").read_text()
        assert "differ in the inputs or labels" in text and "weights" not in text


# ------------------------------------------------------------------------------ worker
def _worker(out: str) -> None:
    """One rank of the torchrun launches above (cwd: the test's tmp_path)."""
    from relucap_plugin.distributed import get_rank, is_main_process

    torch.set_num_threads(1)
    model, (x, y), attacks, tm, cfg = _setup()
    res = evaluate(model, (x, y), attacks, tm, cfg, out=out, model_name="tiny")
    os.environ.pop("RELUCAP_TEST_CALL_LOG", None)  # log the calls of that evaluation only
    rank = get_rank()
    res.save(f"returned.rank{rank}.jsonl")
    if is_main_process():
        res.print()
    dataset = TensorDataset(x, y)
    loader = DataLoader(dataset, batch_size=BS, sampler=DistributedSampler(dataset, shuffle=False))
    evaluate(model, loader, attacks, tm, cfg, progress=False, model_name="tiny").save(
        f"loader.rank{rank}.jsonl"
    )
    bias = model[1].bias.detach().clone()
    if rank == 1:
        with torch.no_grad():
            model[1].bias.add_(1e-3)
    try:
        evaluate(model, (x, y), attacks, tm, cfg, progress=False, model_name="tiny")
    except ValueError as exc:
        with open(f"mismatch.rank{rank}.txt", "w") as f:
            f.write(str(exc))
    if rank == 1:
        with torch.no_grad():
            model[1].bias.copy_(bias)
        x = x.clone()
        x[-1] = 1 - x[-1]  # the last sample differs on rank 1 only (rank 0 never attacks it)
    try:
        evaluate(model, (x, y), attacks, tm, cfg, progress=False, model_name="tiny")
    except ValueError as exc:
        with open(f"datamismatch.rank{rank}.txt", "w") as f:
            f.write(str(exc))


if __name__ == "__main__":
    _worker(sys.argv[1])
