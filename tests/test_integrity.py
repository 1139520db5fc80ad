"""Issue 12: a resumed run is the same run, files are never destroyed, nothing hangs.

One test per bad case of the issue (numbered as there), then the poor ones, then a property
test: two runs differing in exactly one part (model, data, threat model, attacks, config) never
share a results file, and an identical run resumes to the uninterrupted table. Tiny models and
a cheap deterministic attack keep it fast.
"""

from __future__ import annotations

import copy
import json
import os
import socket
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relucap_plugin.attacks import get_attack, make_attack
from relucap_plugin.data import as_dataset
from relucap_plugin.evaluation import evaluate
from relucap_plugin.models import mlp
from relucap_plugin.results import Results
from relucap_plugin.threat import EvalConfig, ThreatModel
from relucap_plugin.training import save_checkpoint, train

N, SHAPE = 12, (1, 4, 4)
TM = ThreatModel("Linf", eps=(0.05, 0.2), steps=3)
CFG = EvalConfig(batch_size=4, seed=0, device="cpu")


def tiny(seed: int = 0):
    """A 3-class MLP on 4x4 inputs and data it classifies correctly (so every row is attacked)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = mlp((8,), in_shape=SHAPE, num_classes=3).eval()
        x = torch.rand(N, *SHAPE)
    with torch.no_grad():
        y = model(x).argmax(1)
    return model, x, y


def _fgsm(model, x, y, eps):
    x = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(F.cross_entropy(model(x), y), x)
    return (x + eps * grad.sign()).clamp(0, 1).detach()


FGSM = make_attack(_fgsm, name="fgsm")


def run(model, data, out, attack=FGSM, tm=TM, cfg=CFG, **kw):
    return evaluate(model, data, attack, tm, cfg, out=out, progress=False, **kw)


def _python(code: str, tmp_path, env=None, timeout=60):
    """Run ``code`` in a fresh interpreter (what could hang runs there, under a timeout)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # this checkout's package
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": root, **(env or {})}
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=full, cwd=tmp_path)


# ------------------------------------------------------------------------ bad case 1: identity
def test_1_resume_refuses_a_retrained_model(tmp_path):
    model, x, y = tiny()
    run(model, (x, y), tmp_path)
    retrained = copy.deepcopy(model)
    with torch.no_grad():
        retrained[1].weight[0, 0] += 1e-4
    before = (tmp_path / "results.jsonl").read_bytes()
    with pytest.raises(ValueError, match=r"what differs: the model's weights.*resume=False"):
        run(retrained, (x, y), tmp_path)
    assert (tmp_path / "results.jsonl").read_bytes() == before
    fresh = run(retrained, (x, y), tmp_path, resume=False)  # the way out the message names
    assert fresh.outcomes() == run(retrained, (x, y), None).outcomes()


def test_1_resume_refuses_other_images_with_the_same_labels(tmp_path):
    model, x, y = tiny()
    run(model, (x, y), tmp_path)
    other = x.clone()
    other[5, 0, 2, 2] = 1 - other[5, 0, 2, 2]
    with pytest.raises(ValueError, match="what differs: the inputs or labels"):
        run(model, (other, y), tmp_path)


class _Cap(torch.nn.Module):
    """A hand-written cap whose limit is a plain attribute (no parameter, no buffer)."""

    def __init__(self, cap: float):
        super().__init__()
        self.cap = cap

    def forward(self, x):
        return x.clamp(0, self.cap)


class _Pair(torch.nn.Module):
    """Returns (logits, logits of a hard-coded cap): the output= selector picks one."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x), self.model(x).clamp(max=0.01)


def _same_weights(change: str):
    """Two models with equal parameters and buffers that compute different logits, and the
    evaluate() keyword arguments of each."""
    model, _, _ = tiny()
    other = copy.deepcopy(model)
    if change == "hardtanh":
        other[2] = torch.nn.Hardtanh(0.0, 0.05)
    elif change == "attribute":
        model[2], other[2] = _Cap(1.0), _Cap(0.05)
    elif change == "plain_tensor":
        model[2], other[2] = _Cap(1.0), _Cap(1.0)
        model[2].cap, other[2].cap = torch.tensor(1.0), torch.tensor(0.05)
    elif change == "quantizable_cap":  # the cap is an attribute of a forward hook's object
        from relucap_plugin.surgery import cap_relus

        model, other = (cap_relus(model, c, quantizable=True)[0] for c in (1.0, 0.05))
    elif change == "hook_closure":  # the cap is a value the hook function closes over
        for net, cap in ((model, 1.0), (other, 0.05)):
            net[2].register_forward_hook(lambda module, args, out, cap=cap: out.clamp(max=cap))
    else:  # output selector
        return _Pair(model), _Pair(model), {"output": 0}, {"output": 1}
    return model, other, {}, {}


@pytest.mark.parametrize("change", ["hardtanh", "attribute", "plain_tensor", "output",
                                    "quantizable_cap", "hook_closure"])
def test_resume_refuses_a_model_that_differs_outside_its_weights(tmp_path, change):
    """Issue: a model with the same weights but another cap, activation or output= resumed the
    first model's file and returned its rows as its own (exit 0)."""
    model, other, kw, other_kw = _same_weights(change)
    _, x, y = tiny()
    run(model, (x, y), tmp_path, **kw)
    alone = run(other, (x, y), None, **other_kw)
    assert alone.outcomes() != run(model, (x, y), None, **kw).outcomes()
    with pytest.raises(ValueError, match="what differs: the model's architecture"):
        run(other, (x, y), tmp_path, **other_kw)
    run(copy.deepcopy(model), (x, y), tmp_path, **kw)  # the same model still resumes


# ------------------------------------------------------------------ bad case 3: audit --out
def test_3_audit_out_keeps_an_evaluate_run(tmp_path):
    from relucap_plugin.cli import main

    model_args = ["mlp:16", "--eps", "0.1", "--n-samples", "4", "--batch-size", "4", "--quiet",
                  "--out", str(tmp_path)]
    assert main(["evaluate", *model_args, "--attack", "torch:FGSM", "--steps", "2"]) == 0
    before = (tmp_path / "results.jsonl").read_bytes()
    assert main(["audit", *model_args, "--steps", "2", "--square-queries", "5"]) == 0
    assert (tmp_path / "results.jsonl").read_bytes() == before
    assert Results.load(tmp_path / "audit-results.jsonl").attacks  # the audit's own file


# ------------------------------------------------------------- bad case 4: foreign files
def test_4_out_naming_a_checkpoint_leaves_it_whole(tmp_path):
    model, x, y = tiny()
    ckpt = tmp_path / "model.pt"
    save_checkpoint(model, ckpt)
    before = ckpt.read_bytes()
    for resume in (True, False):
        with pytest.raises(ValueError, match=f"{ckpt}.*is not a relucap results file"):
            run(model, (x, y), ckpt, resume=resume)
        assert ckpt.read_bytes() == before


def test_4_resume_false_never_overwrites_a_file_that_is_not_ours(tmp_path):
    model, x, y = tiny()
    notes = tmp_path / "notes.txt"
    notes.write_text("my thesis\n")
    with pytest.raises(ValueError, match="notes.txt.*left untouched"):
        run(model, (x, y), notes, resume=False)
    assert notes.read_text() == "my thesis\n"


# ----------------------------------------------------------- bad case 5: atomic checkpoints
@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_5_a_checkpoint_write_cut_short_leaves_the_previous_one(tmp_path, monkeypatch, suffix):
    """The writer is killed after half the bytes (KeyboardInterrupt stands in for SIGKILL)."""
    import safetensors.torch

    model, _, _ = tiny()
    path = tmp_path / f"ckpt{suffix}"
    save_checkpoint(model, path)
    before = path.read_bytes()
    real = {".pt": torch.save, ".safetensors": safetensors.torch.save_file}[suffix]

    def torn(state, target, *a, **kw):
        real(state, target, *a, **kw)
        data = open(target, "rb").read()
        with open(target, "wb") as f:
            f.write(data[: len(data) // 2])
        raise KeyboardInterrupt

    monkeypatch.setattr(*((torch, "save") if suffix == ".pt" else (safetensors.torch, "save_file")),
                        torn)
    other = mlp((8,), in_shape=SHAPE, num_classes=3)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(other, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == [path.name]  # no temporary file left behind


def test_5_created_files_get_the_users_umask(tmp_path):
    from relucap_plugin._files import atomic_write

    old = os.umask(0o027)
    try:
        save_checkpoint(tiny()[0], tmp_path / "a.pt")
        atomic_write(tmp_path / "b.txt", "x")
    finally:
        os.umask(old)
    for name in ("a.pt", "b.txt"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o640


# ------------------------------------------------------------ bad case 6: training NaN
def test_6_a_nan_pixel_stops_training_and_leaves_the_model(tmp_path):
    model, x, y = tiny()
    x = x.clone()
    x[3, 0, 1, 1] = float("nan")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="training batch 0.*NaN/inf"):
        train(model, (x, y), epochs=1, batch_size=N, progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


class _BlowsUpAtTheThirdStep(torch.nn.Module):
    """Identity for two training steps, then infinite logits (a diverging run, made certain)."""

    def __init__(self):
        super().__init__()
        self.steps = 0

    def forward(self, z):
        self.steps += self.training
        return z * float("inf") if self.steps >= 3 else z


def test_6_a_non_finite_loss_stops_at_that_step_and_restores_it():
    _, x, y = tiny()
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8),
                                torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3),
                                _BlowsUpAtTheThirdStep())
    with pytest.raises(FloatingPointError, match=r"loss became nan at training batch 2 .*"
                                                 r"left as it was before this step"):
        train(model, (x, y), epochs=1, batch_size=4, progress=False)
    # the third step's forward pass ran; its BatchNorm update was undone and no weight changed
    assert int(model[2].num_batches_tracked) == 2
    assert all(torch.isfinite(t).all() for t in model.state_dict().values()
               if t.is_floating_point())


# ----------------------------------------------------- bad case 7: attacks can't corrupt
def test_7_an_attack_editing_x_in_place_is_verified_against_the_clean_x(tmp_path):
    model, x, y = tiny()

    def in_place(model, x, y, eps):
        return x.add_(0.5).clamp_(0, 1)

    res = run(model, (x, y), None, attack=make_attack(in_place, name="in_place"))
    assert {r["status"] for r in res.rows} == {"violation"}
    assert all("norm" in r["reason"] for r in res.rows)


def test_7_an_attack_changing_the_weights_stops_the_run(tmp_path):
    model, x, y = tiny()

    def trains(model, x, y, eps):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.01)
        return x

    with pytest.raises(RuntimeError, match="custom:trains changed the model's parameters"):
        run(model, (x, y), tmp_path, attack=make_attack(trains, name="trains"))


def test_7_an_attack_changing_the_buffers_stops_the_run(tmp_path):
    """An attack that runs the model in train mode changes its batch-norm running statistics:
    the later rows were computed on that changed model, which evaluate then handed back."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 8),
                                torch.nn.BatchNorm1d(8), torch.nn.Linear(8, 3)).eval()
    x = torch.rand(N, *SHAPE)
    with torch.no_grad():
        y = model(x).argmax(1)

    def in_train_mode(model, x, y, eps):
        model.train()
        model(x * 5)
        return x

    with pytest.raises(RuntimeError, match="custom:in_train_mode changed the model's parameters "
                                           "or buffers .*running statistics"):
        run(model, (x, y), tmp_path, attack=[make_attack(in_train_mode, name="in_train_mode"), FGSM])


# ------------------------------------------------------- bad case 8: rows of other runs
def _rows(path):
    lines = path.read_text().splitlines()
    return lines[0], [json.loads(line) for line in lines[1:]]


def test_8_conflicting_duplicate_rows_are_refused(tmp_path):
    model, x, y = tiny()
    run(model, (x, y), tmp_path)
    path = tmp_path / "results.jsonl"
    header, rows = _rows(path)
    robust = not rows[0]["adv_correct"]  # a forged row that is consistent in itself
    forged = dict(rows[0], adv_correct=robust, status="ok",
                  adv_pred=rows[0]["label"] if robust else (rows[0]["label"] + 1) % 3)
    with open(path, "a") as f:
        f.write(json.dumps(forged) + "\n")
    with pytest.raises(ValueError, match="two rows for sample 0.*different outcomes"):
        run(model, (x, y), tmp_path)
    with pytest.raises(ValueError, match="different outcomes"):
        Results.load(path)


def test_8_a_row_outside_the_run_is_refused(tmp_path):
    model, x, y = tiny()
    run(model, (x, y), tmp_path)
    path = tmp_path / "results.jsonl"
    header, rows = _rows(path)
    with open(path, "a") as f:
        f.write(json.dumps(dict(rows[0], sample=N + 7)) + "\n")
    with pytest.raises(ValueError, match=rf"sample\(s\) \[{N + 7}\] outside this run's {N}"):
        run(model, (x, y), tmp_path)


# --------------------------------------------------------------- bad case 9: no hangs
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_9_leftover_world_size_and_rank_are_an_error_not_a_hang(tmp_path):
    code = """
        import torch
        from relucap_plugin import evaluate, ThreatModel
        from relucap_plugin.models import mlp
        model = mlp((4,), in_shape=(1, 2, 2), num_classes=2)
        try:
            evaluate(model, (torch.rand(2, 1, 2, 2), torch.tensor([0, 1])), "torch:FGSM",
                     ThreatModel("Linf", eps=0.1), progress=False)
        except ValueError as exc:
            print("REFUSED", exc)
    """
    env = {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_free_port())}
    done = _python(code, tmp_path, env=env, timeout=90)
    assert "REFUSED" in done.stdout, done.stderr[-2000:]
    assert "not started by torchrun" in done.stdout and "Unset WORLD_SIZE and RANK" in done.stdout


def test_a_rank_whose_peer_never_arrives_fails_after_the_rendezvous_timeout(tmp_path):
    """Rank 0 of a world of 2, started alone with real torch.distributed (gloo): it gives up after
    RELUCAP_RENDEZVOUS_TIMEOUT (3 s here) with a message saying what it waited for, the variable
    that sets the wait, and the fix. The 60 s subprocess timeout only keeps a hang from stalling
    the suite."""
    code = """
        import torch
        from relucap_plugin import evaluate, ThreatModel
        from relucap_plugin.models import mlp
        model = mlp((4,), in_shape=(1, 2, 2), num_classes=2)
        try:
            evaluate(model, (torch.rand(2, 1, 2, 2), torch.tensor([0, 1])), "torch:FGSM",
                     ThreatModel("Linf", eps=0.1), {"device": "cpu"}, progress=False)
        except RuntimeError as exc:
            print("GAVE UP", exc)
    """
    port = _free_port()
    env = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port), "RELUCAP_DISTRIBUTED": "1", "RELUCAP_RENDEZVOUS_TIMEOUT": "3"}
    done = _python(code, tmp_path, env=env, timeout=60)
    assert "GAVE UP" in done.stdout, done.stderr[-2000:]
    message = done.stdout
    assert f"rank 0 waited 3 s for the other 1 process(es) at 127.0.0.1:{port}" in message
    assert "RELUCAP_RENDEZVOUS_TIMEOUT (seconds, now 3)" in message
    assert "start every rank (torchrun --nproc-per-node N)" in message


# --------------------------------------------------------- bad case 10: special files
def test_10_out_a_fifo_is_refused_without_reading_it(tmp_path):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    code = f"""
        import torch
        from relucap_plugin import evaluate, ThreatModel
        from relucap_plugin.models import mlp
        model = mlp((4,), in_shape=(1, 2, 2), num_classes=2)
        try:
            evaluate(model, (torch.rand(2, 1, 2, 2), torch.tensor([0, 1])), "torch:FGSM",
                     ThreatModel("Linf", eps=0.1), out={str(fifo)!r}, progress=False)
        except ValueError as exc:
            print("REFUSED", exc)
    """
    done = _python(code, tmp_path, timeout=90)
    assert "REFUSED" in done.stdout and "not a regular file" in done.stdout, done.stderr[-2000:]
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_10_out_a_device_node_is_never_replaced(tmp_path):
    node = tmp_path / "null"
    try:
        os.mknod(node, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    except (PermissionError, OSError):
        pytest.skip("cannot create a device node here (needs root)")
    model, x, y = tiny()
    for resume in (True, False):
        with pytest.raises(ValueError, match=f"{node}.*not a regular file"):
            run(model, (x, y), node, resume=resume)
        assert stat.S_ISCHR(os.stat(node).st_mode)
    with pytest.raises(ValueError, match="not a regular file"):
        save_checkpoint(model, node)
    assert stat.S_ISCHR(os.stat(node).st_mode)


# ---------------------------------------------------------------------- the poor cases
def test_float_labels_are_refused_not_truncated():
    model, x, y = tiny()

    class FloatLabels(torch.utils.data.Dataset):
        def __len__(self):
            return N

        def __getitem__(self, i):
            return x[i], float(y[i]) + 0.7

    with pytest.raises(TypeError, match="labels of .*float.*integer class indices"):
        evaluate(model, FloatLabels(), FGSM, TM, CFG, progress=False)
    with pytest.raises(TypeError, match="integer class indices"):
        train(model, FloatLabels(), epochs=1, progress=False)


def test_labels_out_of_range_in_train_name_the_batch():
    model, x, y = tiny()
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\].*training batch 0"):
        train(model, (x, y + 5), epochs=1, progress=False)


def test_a_loader_that_drops_samples_is_refused():
    model, x, y = tiny()
    loader = torch.utils.data.DataLoader(as_dataset((x, y)), batch_size=5, drop_last=True)
    with pytest.raises(ValueError, match="drop_last=True, batch_size=5, 12 samples"):
        evaluate(model, loader, FGSM, TM, CFG, progress=False)


def test_a_loader_that_reorders_samples_is_refused(tmp_path):
    model, x, y = tiny()
    loader = torch.utils.data.DataLoader(as_dataset((x, y)), batch_size=4, shuffle=True)
    with pytest.raises(ValueError, match="data changed between two passes.*shuffle=False"):
        run(model, loader, tmp_path)


@pytest.mark.parametrize("key, value", [("eps", 0.3), ("bounds", (0, 2)), ("norm", "L2")])
def test_attack_specs_may_not_set_what_the_threat_model_owns(key, value):
    with pytest.raises(ValueError, match=f"{key}=.*refused: the threat model owns {key}"):
        get_attack("torch:PGD", TM, **{key: value})


def test_absurd_budgets_are_refused_unless_allowed(monkeypatch):
    with pytest.raises(ValueError, match="steps=10000000 is above the ceiling 100000.*"
                                         "RELUCAP_ALLOW_LARGE_BUDGET=1"):
        ThreatModel("Linf", eps=0.1, steps=10**7)
    with pytest.raises(ValueError, match="epochs=1000000 is above the ceiling"):
        train(tiny()[0], tiny()[1:], epochs=10**6, progress=False)
    monkeypatch.setenv("RELUCAP_ALLOW_LARGE_BUDGET", "1")
    assert ThreatModel("Linf", eps=0.1, steps=10**7).steps == 10**7


def test_a_cli_option_given_twice_is_an_error(capsys):
    from relucap_plugin.cli import main

    with pytest.raises(SystemExit) as exc:
        main(["evaluate", "mlp:8", "--eps", "0.1", "--eps", "0.3", "--attack", "torch:FGSM"])
    assert exc.value.code == 2
    assert "option given twice: --eps and --eps" in capsys.readouterr().err


def test_cli_model_specs_must_name_a_module_class_or_registered_factory(capsys):
    from relucap_plugin.cli import main

    assert main(["inspect", "os:abort"]) == 2  # before: the process aborted
    assert "os.abort is neither an nn.Module class nor a model factory" in capsys.readouterr().err
    assert main(["inspect", "torch.nn:ReLU"]) == 0  # an nn.Module class
    assert main(["inspect", "relucap_plugin.models:small_cnn"]) == 0  # a registered factory


def test_two_runs_on_one_out_are_refused_by_the_lock(tmp_path):
    from relucap_plugin._files import lock

    model, x, y = tiny()
    path = tmp_path / "results.jsonl"
    run(model, (x, y), path)
    with lock(str(path)):
        with pytest.raises(ValueError, match="being written by another process"):
            run(model, (x, y), path)
    run(model, (x, y), path)  # released: resumes
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".lock")]


def test_a_full_disk_names_the_users_path_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    target = tmp_path / "results.jsonl"
    Results(metadata={"model": "old"}).save(target)
    before = target.read_bytes()

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(OSError, match="No space left") as exc:
        Results(metadata={"model": "new"}).save(target)
    assert str(target) in str(exc.value) and ".tmp" not in str(exc.value)
    assert target.read_bytes() == before and os.listdir(tmp_path) == ["results.jsonl"]


def test_a_meta_device_model_is_a_clear_error():
    with torch.device("meta"):
        model = mlp((8,), in_shape=SHAPE, num_classes=3)
    _, x, y = tiny()
    with pytest.raises(ValueError, match="on the meta device"):
        evaluate(model, (x, y), FGSM, TM, CFG, progress=False)


# ------------------------------------------------------------------- property: one part
def _variant(part: str, k: int):
    """(model, data, attack, threat model, config) with ``part`` changed by variant ``k``
    (k = 0: the base run)."""
    model, x, y = tiny()
    attack, tm, cfg = FGSM, TM, CFG
    if k:
        if part == "model":
            model = copy.deepcopy(model)
            with torch.no_grad():
                model[1].bias[k % 8] += 1e-3 * k
        elif part == "data":
            x = x.clone()
            x[k % N] = x[k % N].flip(-1)
        elif part == "threat_model":
            tm = [TM.replace(steps=3 + k), TM.replace(loss="margin"),
                  TM.replace(random_start=False)][k % 3]
        elif part == "attacks":
            scale = 0.5 + k / 10

            def _fgsm(model, x, y, eps):
                return (x + scale * eps * torch.sign(x - 0.5)).clamp(0, 1)

            attack = make_attack(_fgsm, name="fgsm")
        elif part == "config":
            cfg = [EvalConfig(batch_size=4, seed=k, device="cpu"),
                   EvalConfig(batch_size=3, seed=0, device="cpu")][k % 2]
    return model, (x, y), attack, tm, cfg


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(part=st.sampled_from(["model", "data", "threat_model", "attacks", "config"]),
       k=st.integers(1, 6), keep=st.integers(0, N * 2 - 1))
def test_property_resume_refuses_any_one_change_and_reproduces_an_identical_run(
        tmp_path_factory, part, k, keep):
    out = tmp_path_factory.mktemp("prop") / "results.jsonl"
    base = _variant(part, 0)
    full = run(base[0], base[1], out, base[2], base[3], base[4])
    header, rows = _rows(out)
    out.write_text(header + "\n" + "".join(json.dumps(r) + "\n" for r in rows[:keep]))
    changed = _variant(part, k)
    with pytest.raises(ValueError, match="holds results of a different evaluation"):
        run(changed[0], changed[1], out, changed[2], changed[3], changed[4])
    resumed = run(base[0], base[1], out, base[2], base[3], base[4])
    assert resumed.outcomes() == full.outcomes()


def test_save_checkpoint_never_overwrites_a_file_that_is_not_a_checkpoint(tmp_path):
    model = tiny()[0]
    notes = tmp_path / "notes.pt"
    notes.write_text("not weights\n")
    with pytest.raises(ValueError, match="notes.pt.*exists and is not a relucap checkpoint"):
        save_checkpoint(model, notes)
    assert notes.read_text() == "not weights\n"
    save_checkpoint(model, notes, overwrite=True)
    save_checkpoint(model, notes)  # now one of ours: replaced in place every epoch
    save_checkpoint(model, tmp_path / "m.safetensors")
    save_checkpoint(model, tmp_path / "m.safetensors")


def test_a_file_without_a_fingerprint_cannot_be_resumed(tmp_path):
    model, x, y = tiny()
    run(model, (x, y), tmp_path)
    path = tmp_path / "results.jsonl"
    header, rows = _rows(path)
    old = json.loads(header)
    del old["metadata"]["fingerprint"]
    path.write_text(json.dumps(old) + "\n" + "".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="records no fingerprint.*resume=False"):
        run(model, (x, y), tmp_path)
