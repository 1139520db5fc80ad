"""The standard suite under the cascade and the full schedule vs torchattacks' standard AutoAttack.

Models (trained here, seed 0, MNIST-5k train split, Adam lr 1e-3, batch 64): the MLP
784-256-32-256-10 with CappedReLU(0.1) on the 32-unit bottleneck only, the same MLP with plain
ReLUs (5 epochs each), and the small CNN of :mod:`relucap_plugin.models` (2 epochs). Each model
is evaluated on the first ``--n`` test samples at L-inf eps 0.1, 0.2 and 0.3 by

* the standard suite, ``schedule="cascade"`` (each attack only on the samples still robust,
  budgets nested), through :func:`relucap_plugin.evaluate`;
* the standard suite, ``schedule="full"`` (every attack on every sample), same harness;
* ``torchattacks.AutoAttack(version="standard")`` run directly on the same samples at each eps
  (APGD-CE, APGD-T, FAB-T, Square with the suite's ``--square-queries``, 5000 as in Croce and
  Hein; ``--aa-steps`` iterations per other member, 100 as in Croce and Hein), robust accuracy
  from the model's predictions on its outputs;

interleaved in one process (``--reps`` rounds of cascade, full, AutoAttack per model), with the
suite's PGD at ``--steps`` steps. Printed: the per-sample check (cascade worst case <= full worst
case on every sample), robust accuracy of each at every eps, and the time ratios over the three
eps together (median over rounds), on this process's CPU time (one thread: the work done, less
inflated by other jobs on a shared machine than wall time, which is printed too). Before that, per model: ``torch:Square`` (the suite's) and
torchattacks' Square side by side on the same samples at eps 0.1: the samples the cascade gives
Square (those its cheaper attacks left robust, from an untimed cascade run), and with
``--square-compare`` all ``--n`` samples at the listed query budgets; printed: robust accuracy,
time, time per query. Then ``torch:Square`` and ``torch:APGD-T`` as of git revision ``--before``
and as now, on the cascade's survivors at eps 0.1, same generators, interleaved: CPU ms per query
(Square; next to the model's forward alone on those rows), seconds (APGD-T), and whether the
outputs are identical. Last, per model, the cascade's floor: the work no schedule avoids, each
part run here on CPU time (the cascade's first attack at the smallest eps on every
clean-correct sample and at each larger eps on the samples robust at the eps before; every
other attack of the suite on the samples robust at each eps, Square counted as its query budget
of bare forwards on them), divided by the full schedule's time (:func:`floor`).
Targets (issue 15): cascade <= 0.25x full, <= 0.5x
AutoAttack, robust accuracy <= AutoAttack's at every eps.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_suite.py [--n 200] [--reps 1] \
        [--models mlp-capped,mlp,cnn] [--square-compare 1000,5000] [--square-only] [--before REV]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

import torch

from relucap_plugin import EvalConfig, ThreatModel, evaluate
from relucap_plugin._console import print_table
from relucap_plugin.activations import CappedReLU
from relucap_plugin._torch import CallContext
from relucap_plugin.adaptive import attack_kind, get_suite
from relucap_plugin.cascade import cascade_order
from relucap_plugin.data import load_mnist5k
from relucap_plugin.models import mlp, small_cnn
from relucap_plugin.training import train

EPS = (0.1, 0.2, 0.3)
MODELS = {"mlp-capped": "MLP, cap 0.1 on the bottleneck", "mlp": "MLP, plain ReLU",
          "cnn": "small CNN, plain ReLU"}


def build(name: str, train_set) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = small_cnn() if name == "cnn" else mlp((256, 32, 256))
    if name == "mlp-capped":
        model[4] = CappedReLU(0.1)
    train(model, train_set, epochs=2 if name == "cnn" else 5, lr=1e-3, batch_size=64, seed=0,
          device="cpu", progress=False)
    return model.eval()


class Clock:
    """Wall time and this process's CPU time of a block (one thread: CPU time is the work done,
    and is less inflated than wall time when other jobs share the machine)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def autoattack(model, x, y, eps: float, steps: int, queries: int) -> tuple[list[bool], Clock]:
    """torchattacks' standard AutoAttack at ``eps`` (members at ``steps`` iterations, Square at
    ``queries`` queries, as the suite's): per-sample robust flags and the clock."""
    import torchattacks

    clock = Clock().__enter__()
    attack = torchattacks.AutoAttack(model, norm="Linf", eps=eps, version="standard",
                                     n_classes=10, seed=0)
    for member in attack._autoattack.attacks:
        if hasattr(member, "n_queries"):
            member.n_queries = queries
        elif hasattr(member, "steps"):
            member.steps = steps
    x_adv = attack(x, y)
    with torch.no_grad():
        robust = (model(x_adv).argmax(1) == y).tolist()
    clock.__exit__()
    return robust, clock


def square_side_by_side(model, x, y, eps: float, queries: int, reps: int) -> list[tuple]:
    """``torch:Square`` and ``torchattacks:Square`` at ``queries`` queries on the same samples at
    ``eps``, interleaved (``reps`` rounds, seed 0): robust accuracy, median wall time and that time
    per query (the per-query cost of the Python loop plus the model's forward)."""
    from relucap_plugin import get_attack

    tm = ThreatModel("Linf", eps=eps, steps=queries)
    specs = ("torch:Square", "torchattacks:Square")
    times: dict[str, list[Clock]] = {spec: [] for spec in specs}
    robust: dict[str, float] = {}
    for spec in specs:  # warm-up: imports and first-call costs stay out of the timing
        get_attack(spec, tm.replace(steps=2))(model, x[:2], y[:2], seed=0)
    for _ in range(reps):
        for spec in specs:
            with Clock() as clock:
                x_adv = get_attack(spec, tm)(model, x, y, seed=0)
            times[spec].append(clock)
            with torch.no_grad():
                robust[spec] = float((model(x_adv).argmax(1) == y).float().mean())
    wall = {spec: statistics.median(c.wall for c in v) for spec, v in times.items()}
    cpu = {spec: statistics.median(c.cpu for c in v) for spec, v in times.items()}
    return [(spec, f"{100 * robust[spec]:.1f}%", f"{wall[spec]:.2f}", f"{cpu[spec]:.2f}",
             f"{1000 * cpu[spec] / queries:.3f}", f"{cpu[specs[1]] / cpu[spec]:.2f}") for spec in specs]


def load_before(rev: str, module: str):
    """``relucap_plugin.adapters.<module>`` as of git revision ``rev``: its source from ``git
    show``, run as a module of the current package (its relative imports see today's package)."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:relucap_plugin/adapters/{module}.py"], cwd=root,
                            check=True, capture_output=True, text=True).stdout
    name = f"relucap_plugin.adapters._{module}_{rev}"
    old = types.ModuleType(name)
    old.__package__ = "relucap_plugin.adapters"
    sys.modules[name] = old
    exec(compile(source, f"{rev}:{module}.py", "exec"), old.__dict__)
    return old


def before_after(model, x, y, eps: float, queries: int, steps: int, rev: str, reps: int) -> list[tuple]:
    """``torch:Square`` (``queries`` queries) and ``torch:APGD-T-margin`` (``steps`` iterations, 9
    targets) of revision ``rev`` and of today on ``x`` at ``eps``, same per-sample generators,
    interleaved (``reps`` rounds): median CPU times, and whether the outputs are identical."""
    from relucap_plugin.adapters import plain_torch, square

    old_square, old_torch = load_before(rev, "square"), load_before(rev, "plain_torch")
    ids = torch.arange(len(x))

    def gens(todo=ids, j=0):
        return CallContext(torch.device("cpu"), 10, None, seed=0, sample_ids=todo.cpu(), restart=j).generators(len(todo))

    runs = {
        "Square": {tag: (lambda f=f: f(model, x, y, eps, queries=queries, generators=gens()))
                   for tag, f in (("before", old_square.square), ("after", square.square))},
        "APGD-T": {tag: (lambda f=f: f(model, x, y, eps, targets=9, generators=gens, steps=steps, loss="margin"))
                   for tag, f in (("before", old_torch.apgd_targets), ("after", plain_torch.apgd_targets))},
        "forward": {"after": lambda: [model(x) for _ in range(queries)]},
    }
    cpu: dict[tuple, list[float]] = {}
    out: dict[tuple, torch.Tensor] = {}
    for _ in range(reps):
        for attack, fs in runs.items():
            for tag, f in fs.items():
                with torch.no_grad(), Clock() as clock:
                    out[attack, tag] = f()
                cpu.setdefault((attack, tag), []).append(clock.cpu)
    t = {k: statistics.median(v) for k, v in cpu.items()}
    return [
        ("Square", len(x), f"{1000 * t['Square', 'before'] / queries:.3f} ms/query",
         f"{1000 * t['Square', 'after'] / queries:.3f} ms/query",
         f"{1000 * t['forward', 'after'] / queries:.3f} ms/query", f"{t['Square', 'after'] / t['Square', 'before']:.2f}",
         "yes" if torch.equal(out["Square", "before"], out["Square", "after"]) else "NO"),
        ("APGD-T", len(x), f"{t['APGD-T', 'before']:.2f} s", f"{t['APGD-T', 'after']:.2f} s", "",
         f"{t['APGD-T', 'after'] / t['APGD-T', 'before']:.2f}",
         "yes" if torch.equal(out["APGD-T", "before"], out["APGD-T", "after"]) else "NO"),
    ]


def floor(model, x, y, suite, tm, cascade, full_cpu: float, queries: int) -> dict[str, float]:
    """The cascade's floor (see the module docstring) in CPU seconds, each part run here:
    ``"first attack"`` (the cascade's first: at the smallest eps on every clean-correct sample,
    at each larger one on the samples robust at the eps before, which have no example to
    reuse), ``"Square as forwards"`` and ``"other attacks"`` (on the samples robust at each
    eps), their ``"sum"``, and ``"floor / full"`` (over ``full_cpu``)."""
    first = cascade_order(suite, lambda a: attack_kind(a.spec, a.family))[0].spec
    parts = {"first attack": 0.0, "Square as forwards": 0.0, "other attacks": 0.0}
    with torch.no_grad():
        robust = (model(x).argmax(1) == y).nonzero().flatten().tolist()
    for eps in sorted(tm.eps):
        unbroken, robust = robust, sorted(s for s, r in cascade.per_sample_worst_case(eps).items() if r)
        for attack in suite:
            part = ("first attack" if attack.spec == first else
                    "Square as forwards" if attack.family == "Square" else "other attacks")
            rows = unbroken if attack.spec == first else robust
            if not rows:
                continue
            xr, yr = x[rows], y[rows]
            with torch.no_grad(), Clock() as clock:
                if part == "Square as forwards":
                    for _ in range(queries):
                        model(xr)
                else:
                    with torch.enable_grad():
                        attack(model, xr, yr, eps, seed=0)
            parts[part] += clock.cpu
    parts["sum"] = sum(parts.values())
    parts["floor / full"] = parts["sum"] / full_cpu
    return parts


def square_inputs(cascade, eps: float) -> list[int]:
    """The samples the cascade ran Square on at ``eps`` (those no cheaper attack had broken)."""
    return sorted(r["sample"] for r in cascade if r["eps"] == eps and "Square" in r["attack"]
                  and r["status"] != "not_needed")


def per_attack_time(results) -> dict[str, float]:
    return {a: sum(r["time"] for r in results if r["attack"] == a) for a in results.attacks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--steps", type=int, default=40, help="suite PGD steps (default 40)")
    parser.add_argument("--aa-steps", type=int, default=100, help="AutoAttack member iterations")
    parser.add_argument("--square-queries", type=int, default=5000)
    parser.add_argument("--reps", type=int, default=1, help="interleaved rounds per model")
    parser.add_argument("--models", default=",".join(MODELS), help=f"from {', '.join(MODELS)}")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--square-compare", default="",
                        help="query budgets (e.g. 1000,5000) at which to compare torch:Square with "
                             "torchattacks:Square on all --n samples at eps 0.1 (strength and time)")
    parser.add_argument("--square-only", action="store_true",
                        help="only the Square comparisons (no cascade/full/AutoAttack runs)")
    parser.add_argument("--before", default="695f4ed",
                        help="git revision whose torch:Square and torch:APGD-T are timed as 'before'")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_set, test_set = load_mnist5k()
    x, y = test_set.tensors[0][: args.n], test_set.tensors[1][: args.n]
    cfg = EvalConfig(batch_size=args.n, device="cpu", seed=0)
    tm = ThreatModel("Linf", eps=EPS, steps=args.steps)

    acc_rows, time_rows, profile_rows, summary, before_rows, floor_rows = [], [], [], [], [], []
    for name in args.models.split(","):
        label = MODELS[name]
        model = build(name, train_set)
        square_rows = []
        for queries in [int(q) for q in args.square_compare.split(",") if q]:
            square_rows += [(label, f"all {len(x)}", queries, *row)
                            for row in square_side_by_side(model, x, y, 0.1, queries, args.reps)]
        suite = get_suite("standard", tm, model, x[:8], square_queries=args.square_queries)
        if not args.square_only:
            cascade = evaluate(model, (x, y), suite, tm, cfg, progress=False, schedule="cascade")
            survivors = square_inputs(cascade, 0.1)
            if survivors:
                square_rows += [(label, f"{len(survivors)} cascade survivors", args.square_queries, *row)
                                for row in square_side_by_side(model, x[survivors], y[survivors], 0.1,
                                                               args.square_queries, args.reps)]
                before_rows += [(label, *row) for row in before_after(
                    model, x[survivors], y[survivors], 0.1, args.square_queries, 100, args.before, args.reps)]
        print_table(("model", "samples", "queries", "attack", "robust at eps 0.1", "wall (s)", "CPU (s)",
                     "CPU ms per query", "torchattacks CPU / this"), square_rows,
                    title=f"Square side by side (eps 0.1, median of {args.reps} round(s))")
        print_table(("model", "attack", "samples", f"before ({args.before})", "after", "forward alone",
                     "after / before", "identical outputs"), before_rows,
                    title="torch:Square and torch:APGD-T before and after, on the cascade's survivors at eps 0.1 "
                          f"(CPU, median of {args.reps} round(s))")
        if args.square_only:
            continue
        times: dict[str, list[tuple[float, float]]] = {"cascade": [], "full": [], "AutoAttack": []}
        for _ in range(args.reps):
            with Clock() as clock:
                cascade = evaluate(model, (x, y), suite, tm, cfg, progress=False, schedule="cascade")
            times["cascade"].append((clock.wall, clock.cpu))
            with Clock() as clock:
                full = evaluate(model, (x, y), suite, tm, cfg, progress=False, schedule="full")
            times["full"].append((clock.wall, clock.cpu))
            aa, t_aa = {}, [0.0, 0.0]
            for eps in EPS:
                aa[eps], clock = autoattack(model, x, y, eps, args.aa_steps, args.square_queries)
                t_aa = [t_aa[0] + clock.wall, t_aa[1] + clock.cpu]
            times["AutoAttack"].append((t_aa[0], t_aa[1]))
        w = {k: statistics.median(v[0] for v in vs) for k, vs in times.items()}
        t = {k: statistics.median(v[1] for v in vs) for k, vs in times.items()}
        per_sample_ok, acc_ok = True, True
        for eps in EPS:
            c, f = cascade.per_sample_worst_case(eps), full.per_sample_worst_case(eps)
            below = sum(c[s] <= f[s] for s in f)
            per_sample_ok &= below == len(f)
            aa_acc = sum(aa[eps]) / len(aa[eps])
            acc_ok &= cascade.worst_case(eps) <= aa_acc
            acc_rows.append((label, f"{eps:g}", f"{100 * cascade.clean_accuracy():.1f}%",
                             f"{100 * cascade.worst_case(eps):.1f}%", f"{100 * full.worst_case(eps):.1f}%",
                             f"{100 * aa_acc:.1f}%", f"{below}/{len(f)}"))
        for schedule, res in (("cascade", cascade), ("full", full)):
            for attack, seconds in per_attack_time(res).items():
                profile_rows.append((label, schedule, attack, f"{seconds:.1f}"))
        time_rows.append((label, f"{t['cascade']:.1f}", f"{t['full']:.1f}", f"{t['AutoAttack']:.1f}",
                          f"{t['cascade'] / t['full']:.3f}", f"{t['cascade'] / t['AutoAttack']:.3f}",
                          f"{w['cascade'] / w['full']:.3f}", f"{w['cascade'] / w['AutoAttack']:.3f}"))
        parts = floor(model, x, y, suite, tm, cascade, t["full"], args.square_queries)
        floor_rows.append((label, *(f"{v:.1f}" for k, v in parts.items() if k != "floor / full"), f"{t['full']:.1f}",
                           f"{parts['floor / full']:.3f}", f"{t['cascade'] / t['full']:.3f}"))
        summary.append((label, "yes" if per_sample_ok else "NO",
                        "yes" if t["cascade"] <= 0.25 * t["full"] else "NO",
                        "yes" if t["cascade"] <= 0.5 * t["AutoAttack"] else "NO",
                        "yes" if acc_ok else "NO"))
        report(args, acc_rows, profile_rows, time_rows, summary, floor_rows)


def report(args, acc_rows, profile_rows, time_rows, summary, floor_rows) -> None:
    """Print the tables so far (after each model, so a long run shows its figures early)."""
    title = f"{args.n} MNIST-5k test samples, Linf, suite PGD {args.steps} steps, AA {args.aa_steps}"
    print_table(("model", "eps", "clean", "cascade worst case", "full worst case", "AutoAttack",
                 "samples cascade <= full"), acc_rows, title="robust accuracy: " + title)
    print_table(("model", "schedule", "attack", "attack time (s)"), profile_rows,
                title="where the time goes (sum over the three eps)")
    print_table(("model", "cascade CPU (s)", "full CPU (s)", "AutoAttack CPU (s)", "cascade / full",
                 "cascade / AA", "wall: cascade / full", "wall: cascade / AA"), time_rows,
                title=f"CPU time over the three eps together (median of {args.reps} round(s)); the "
                      "targets are judged on CPU time")
    print_table(("model", "first attack (s)", "Square as forwards (s)", "other attacks (s)", "floor CPU (s)",
                 "full CPU (s)", "floor / full", "cascade / full"), floor_rows,
                title="the cascade's floor: first attack on every clean-correct sample, every other attack "
                      "on the robust samples (Square as bare forwards)")
    print_table(("model", "cascade <= full per sample", "<= 0.25x full", "<= 0.5x AA",
                 "robust acc <= AA at every eps"), summary, title="targets (issue 15, on CPU time)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
