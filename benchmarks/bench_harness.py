"""The evaluation harness vs each library called directly vs a hand-written torch PGD loop.

Workload (issue 4): L-inf PGD-40 at eps 0.3 (step 2.5 * eps / 40, one random start) on the
MNIST MLP 784-256-32-256-10 of ``relucap_plugin.models.mlp``, trained here for 3 Adam epochs on
the mnist5k train split (seed 0), attacking the 1000 test digits of ``load_mnist5k``.

Measured side by side in one run after an untimed warm-up (library imports), interleaved in
every repeat. Ratios use the process's CPU time (one torch thread): on a machine shared with
other jobs, wall time mostly measures their load. Each ratio is given twice: best of the repeats
over best, and the median over repeats of the ratio of two variants that ran back to back (the
steadier figure when the load drifts). Best wall times are printed as well, and the share of the
harness's wall time spent outside the attack calls (from its own rows' timings).

- ``harness <lib>``: ``evaluate(model, data, [spec], tm, EvalConfig(batch_size=B),
  out=<tmp>/results.jsonl)``: clean pass, attack, verification, the harness's own prediction,
  rows streamed to JSONL (fsync per batch). It skips samples misclassified clean (they cannot
  be robust), so it attacks fewer samples than a user who attacks all 1000.
- ``raw <lib>``: the library used as its docs show, with the same parameters, on all 1000
  samples, plus the prediction a user needs for robust accuracy.
- ``raw <lib> (same samples)``: the same, on exactly the samples the harness attacks: the ratio
  harness / this is the harness's overhead alone.
- ``torch loop``: a hand-written PGD loop on all 1000 samples.

Targets: harness <= 1.05x the raw library; ART harness <= 1.3x the hand-written loop (ART runs
with batch size B; raw ART with its default batch size 32 is shown for reference). The harness
runs ART with ``preprocessing=None`` and never calls ART's ``predict``; a user who keeps ART's
defaults pays for an identity standardisation on every step, which is why ``raw art`` can be
slower than the harness.

    OMP_NUM_THREADS=1 python benchmarks/bench_harness.py [--repeats 7] [--batch-size 500]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from relucap_plugin.data import load_mnist5k
from relucap_plugin.evaluation import evaluate
from relucap_plugin.models import mlp
from relucap_plugin.threat import EvalConfig, ThreatModel
from relucap_plugin.training import train

EPS, STEPS = 0.3, 40
ALPHA = 2.5 * EPS / STEPS
SPECS = {
    "torchattacks": "torchattacks:PGD",
    "foolbox": "foolbox:LinfPGD",
    "art": "art:ProjectedGradientDescent",
}


def batches(x, y, size):
    for i in range(0, len(x), size):
        yield x[i : i + size], y[i : i + size]


def robust(model, x_adv, y):
    with torch.no_grad():
        return int((model(x_adv).argmax(1) == y).sum())


def raw_torchattacks(model, x, y, bs):
    import torchattacks

    atk = torchattacks.PGD(model, eps=EPS, alpha=ALPHA, steps=STEPS, random_start=True)
    return sum(robust(model, atk(xb, yb), yb) for xb, yb in batches(x, y, bs))


def raw_foolbox(model, x, y, bs):
    os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
    import foolbox as fb

    fmodel = fb.PyTorchModel(model, bounds=(0, 1), device="cpu")
    attack = fb.attacks.LinfPGD(abs_stepsize=ALPHA, steps=STEPS, random_start=True)
    total = 0
    for xb, yb in batches(x, y, bs):
        _, clipped, success = attack(fmodel, xb, yb, epsilons=EPS)
        total += int((~success).sum())
    return total


def raw_art(model, x, y, bs):
    from art.attacks.evasion import ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    clf = PyTorchClassifier(
        model,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=(1, 28, 28),
        nb_classes=10,
        clip_values=(0.0, 1.0),
    )
    attack = ProjectedGradientDescent(
        clf,
        norm=np.inf,
        eps=EPS,
        eps_step=ALPHA,
        max_iter=STEPS,
        num_random_init=1,
        batch_size=bs,
        verbose=False,
    )
    x_adv = attack.generate(x=x.numpy(), y=y.numpy())
    return int((clf.predict(x_adv, batch_size=bs).argmax(1) == y.numpy()).sum())


def torch_loop(model, x, y, bs):
    total = 0
    for xb, yb in batches(x, y, bs):
        x_adv = (xb + torch.empty_like(xb).uniform_(-EPS, EPS)).clamp(0, 1)
        for _ in range(STEPS):
            x_adv.requires_grad_(True)
            (grad,) = torch.autograd.grad(F.cross_entropy(model(x_adv), yb), x_adv)
            x_adv = x_adv.detach() + ALPHA * grad.sign()
            x_adv = (xb + (x_adv - xb).clamp(-EPS, EPS)).clamp(0, 1)
        total += robust(model, x_adv, yb)
    return total


RAW = {"torchattacks": raw_torchattacks, "foolbox": raw_foolbox, "art": raw_art}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    bs = args.batch_size

    train_set, test_set = load_mnist5k()
    torch.manual_seed(0)
    model = mlp((256, 32, 256))
    train(
        model,
        train_set,
        "standard",
        epochs=3,
        lr=1e-3,
        batch_size=64,
        seed=0,
        device="cpu",
        progress=False,
    )
    model.eval()
    for p in model.parameters():  # as a user attacking a fixed model would do
        p.requires_grad_(False)
    x, y = test_set.tensors
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    xs, ys = x[correct], y[correct]
    tm = ThreatModel("Linf", eps=EPS, steps=STEPS)
    cfg = EvalConfig(batch_size=bs, device="cpu", seed=0)
    print(
        f"MLP 784-256-32-256-10 (3 epochs), clean accuracy {correct.float().mean():.1%} on "
        f"{len(x)} digits; PGD-{STEPS} Linf eps {EPS}; batch size {bs}; {args.threads} thread(s); "
        f"best of {args.repeats}"
    )

    variants = {}
    tmp = tempfile.mkdtemp()
    outside = {lib: [] for lib in SPECS}  # harness wall time outside the attack calls / total
    for lib, spec in SPECS.items():

        def run(spec=spec, lib=lib):
            out = os.path.join(tmp, f"{lib}.jsonl")
            t0 = time.perf_counter()
            res = evaluate(model, (x, y), [spec], tm, cfg, out=out, resume=False, progress=False)
            total = time.perf_counter() - t0
            outside[lib].append((total - sum(r["time"] for r in res.rows)) / total)
            return round(res.robust_accuracy(spec, EPS) * len(x))

        variants[f"harness {lib}"] = run
        variants[f"raw {lib}"] = lambda f=RAW[lib]: f(model, x, y, bs)
        variants[f"raw {lib} (same samples)"] = lambda f=RAW[lib]: f(model, xs, ys, bs)
    variants["raw art (default batch 32)"] = lambda: raw_art(model, x, y, 32)
    variants["torch loop"] = lambda: torch_loop(model, x, y, bs)

    for fn in variants.values():  # warm-up: library imports and first-call costs are not timed
        with torch.random.fork_rng():
            fn()
    for v in outside.values():
        v.clear()
    times = {k: [] for k in variants}
    robust_count = {}
    for rep in range(args.repeats):
        for name, fn in variants.items():
            torch.manual_seed(rep)
            w0, c0 = time.perf_counter(), time.process_time()
            robust_count[name] = fn()
            times[name].append((time.process_time() - c0, time.perf_counter() - w0))
    best = {k: min(c for c, _ in v) for k, v in times.items()}
    wall = {k: min(w for _, w in v) for k, v in times.items()}

    print(f"\n{'variant':32s} {'CPU s':>8s} {'wall s':>8s} {'robust acc':>10s}")
    for name in variants:
        print(f"{name:32s} {best[name]:8.2f} {wall[name]:8.2f} {robust_count[name] / len(x):10.1%}")

    def ratio(a: str, b: str) -> str:
        """Best-of ratio, and the median of per-repeat ratios (a and b ran back to back)."""
        paired = statistics.median(ta[0] / tb[0] for ta, tb in zip(times[a], times[b]))
        return f"{best[a] / best[b]:.3f}x (paired median {paired:.3f}x)"

    print("\nratios of CPU time (target):")
    for lib in SPECS:
        print(
            f"  harness/raw {lib:13s} {ratio(f'harness {lib}', f'raw {lib}')}   same samples "
            f"{ratio(f'harness {lib}', f'raw {lib} (same samples)')}   (<= 1.05)"
        )
    print(f"  harness art / torch loop    {ratio('harness art', 'torch loop')}   (<= 1.3)")
    print(f"  raw art / torch loop        {ratio('raw art', 'torch loop')}   (ART itself)")
    print(
        f"  raw art batch 32 / loop     {ratio('raw art (default batch 32)', 'torch loop')}   "
        "(reference: ART's default batch size)"
    )
    print(
        "\nharness wall time outside the attack calls (clean pass, verification, own prediction, "
        "rows, JSONL), share of its total, median:"
    )
    for lib, v in outside.items():
        print(f"  {lib:13s} {100 * statistics.median(v):.1f}%")


if __name__ == "__main__":
    main()
