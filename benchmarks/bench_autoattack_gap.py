"""The standard suite's worst case against torchattacks' standard AutoAttack, sample by sample,
and what the suite's APGD-T members add to the cascade's time.

Models as in ``bench_suite.py`` (trained here, seed 0): the MLP with CappedReLU(0.1) on the
bottleneck, the same MLP with plain ReLUs, the small CNN of :mod:`relucap_plugin.models`. On the
first ``--n`` MNIST-5k test digits at L-inf eps 0.1, 0.2 and 0.3, interleaved in one process
(``--reps`` rounds per model):

* the standard suite under ``schedule="cascade"`` without its APGD-T members (``torch:APGD-T``
  plain and through BPDA: the suite before issue 15 added them) and with them, same seed;
* ``torchattacks.AutoAttack(version="standard")`` run directly (``--aa-steps`` iterations per
  member, Square ``--square-queries`` queries, as the suite's Square).

Printed per eps: the worst case of each suite, AutoAttack's robust accuracy, and the samples
AutoAttack breaks that the suite does not (with ``--members``, each of AutoAttack's members is
then run alone on those samples and the ones that break them are named); and the time of each
(median over rounds) with the cascade time the APGD-T members add.

    PYTHONPATH=. OMP_NUM_THREADS=1 python benchmarks/bench_autoattack_gap.py [--n 200] \\
        [--models mlp-capped,mlp,cnn] [--square-queries 5000] [--members]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from bench_suite import EPS, MODELS, autoattack, build

from relucap_plugin import EvalConfig, ThreatModel, evaluate
from relucap_plugin._console import print_table
from relucap_plugin.adaptive import get_suite
from relucap_plugin.data import load_mnist5k


def aa_members(model, x, y, eps: float, steps: int, queries: int) -> dict[str, list[bool]]:
    """Each member of the standard AutoAttack alone on ``x``: member -> per-sample robust flags."""
    import torchattacks

    members = {
        "APGD-CE": torchattacks.APGD(model, norm="Linf", eps=eps, steps=steps, loss="ce", seed=0),
        "APGD-T": torchattacks.APGDT(model, norm="Linf", eps=eps, steps=steps, n_classes=10, seed=0),
        "FAB-T": torchattacks.FAB(model, norm="Linf", eps=eps, steps=steps, multi_targeted=True,
                                  n_classes=10, seed=0),
        "Square": torchattacks.Square(model, norm="Linf", eps=eps, n_queries=queries, seed=0),
    }
    out = {}
    for name, attack in members.items():
        x_adv = attack(x, y)
        with torch.no_grad():
            out[name] = (model(x_adv).argmax(1) == y).tolist()
    return out


def autoattack_per_eps(model, x, y, steps: int, queries: int) -> dict[float, list[bool]]:
    """:func:`bench_suite.autoattack`'s per-sample robust flags at each eps."""
    return {eps: autoattack(model, x, y, eps, steps, queries)[0] for eps in EPS}


def interleaved(runs: dict[str, Callable[[], Any]], reps: int) -> tuple[dict[str, Any], dict[str, float]]:
    """Each of ``runs`` once per round, ``reps`` rounds: the last round's outputs and the median
    wall time of each."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    out: dict[str, Any] = {}
    for _ in range(reps):
        for name, run in runs.items():
            start = time.perf_counter()
            out[name] = run()
            times[name].append(time.perf_counter() - start)
    return out, {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--steps", type=int, default=40, help="suite PGD/APGD steps (default 40)")
    parser.add_argument("--aa-steps", type=int, default=100, help="AutoAttack member iterations")
    parser.add_argument("--square-queries", type=int, default=5000)
    parser.add_argument("--reps", type=int, default=1, help="interleaved rounds per model")
    parser.add_argument("--models", default=",".join(MODELS), help=f"from {', '.join(MODELS)}")
    parser.add_argument("--members", action="store_true",
                        help="name the AutoAttack members that break the samples the suite misses")
    args = parser.parse_args()
    torch.set_num_threads(1)

    train_set, test_set = load_mnist5k()
    x, y = test_set.tensors[0][: args.n], test_set.tensors[1][: args.n]
    cfg = EvalConfig(batch_size=args.n, device="cpu", seed=0)
    tm = ThreatModel("Linf", eps=EPS, steps=args.steps)
    acc_rows, time_rows = [], []
    for name in args.models.split(","):
        label = MODELS[name]
        model = build(name, train_set)
        suite = get_suite("standard", tm, model, x[:8], square_queries=args.square_queries)
        before = [a for a in suite if not a.family.startswith("APGD-T")]
        cascade = functools.partial(evaluate, model, (x, y), threat_model=tm, config=cfg, progress=False,
                                    schedule="cascade")
        runs = {"before": functools.partial(cascade, attacks=before),
                "suite": functools.partial(cascade, attacks=suite),
                "AutoAttack": functools.partial(autoattack_per_eps, model, x, y, args.aa_steps,
                                                args.square_queries)}
        out, t = interleaved(runs, args.reps)
        old, new, aa = out["before"], out["suite"], out["AutoAttack"]
        apgd_t = sum(r["time"] for r in new if r["family"].startswith("APGD-T"))
        for eps in EPS:
            worst = new.per_sample_worst_case(eps)
            missed = [i for i in range(args.n) if worst.get(i) and not aa[eps][i]]
            by = ""
            if missed and args.members:
                alone = aa_members(model, x[missed], y[missed], eps, args.aa_steps, args.square_queries)
                by = "; ".join(f"{i}: {'/'.join(m for m in alone if not alone[m][j]) or 'none alone'}"
                               for j, i in enumerate(missed))
            acc_rows.append((label, f"{eps:g}", f"{100 * old.worst_case(eps):.1f}%",
                             f"{100 * new.worst_case(eps):.1f}%", f"{100 * sum(aa[eps]) / args.n:.1f}%",
                             ", ".join(map(str, missed)) or "-", by or "-"))
        time_rows.append((label, f"{t['before']:.1f}", f"{t['suite']:.1f}", f"{apgd_t:.1f}",
                          f"{t['suite'] - t['before']:+.1f}", f"{t['AutoAttack']:.1f}",
                          f"{t['suite'] / t['AutoAttack']:.3f}"))
        title = (f"{args.n} MNIST-5k test digits, Linf, suite steps {args.steps}, AutoAttack "
                 f"{args.aa_steps} iterations, Square {args.square_queries} queries")
        print_table(("model", "eps", "cascade without APGD-T", "cascade (suite)", "AutoAttack",
                     "AutoAttack breaks, suite not", "broken by (AA members alone)"), acc_rows,
                    title="robust accuracy: " + title)
        print_table(("model", "cascade without APGD-T (s)", "cascade (s)", "APGD-T rows (s)",
                     "added (s)", "AutoAttack (s)", "cascade / AA"), time_rows,
                    title=f"wall time over the three eps together (median of {args.reps} round(s))")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
