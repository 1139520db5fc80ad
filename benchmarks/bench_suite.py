"""The "standard" suite vs torchattacks' standard AutoAttack on a capped and a plain-ReLU MLP.

Both models are trained here the same way (MNIST-5k train split, MLP 784-256-32-256-10, Adam
lr 1e-3, batch 64, 5 epochs, seed 0); the capped one has CappedReLU(0.1) on the 32-unit
bottleneck only. Each model is evaluated on the first ``--n`` test samples at L-inf eps 0.3 by
the standard suite (per-sample worst case over its attacks) and by AutoAttack (APGD-CE, APGD-T,
FAB-T, Square 5000 queries; ``--aa-steps`` iterations per member, 100 as in Croce and Hein),
side by side in one run, through the same harness (:func:`relucap_plugin.evaluate`).
Target (issue 5): suite worst case <= AutoAttack's robust accuracy on every model, at <= its time.

    python benchmarks/bench_suite.py [--n 200] [--eps 0.3] [--aa-steps 100] [--threads 1]
"""

from __future__ import annotations

import argparse
import time

import torch

from relucap_plugin import EvalConfig, ThreatModel, evaluate, get_attack
from relucap_plugin._console import print_table
from relucap_plugin.activations import CappedReLU
from relucap_plugin.adaptive import get_suite
from relucap_plugin.data import load_mnist5k
from relucap_plugin.models import mlp
from relucap_plugin.training import train


def build(cap: float | None, train_set) -> torch.nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = mlp((256, 32, 256))
    if cap is not None:
        model[4] = CappedReLU(cap)
    train(model, train_set, epochs=5, lr=1e-3, batch_size=64, seed=0, device="cpu", progress=False)
    return model.eval()


def timed(model, data, attacks, tm, cfg):
    start = time.perf_counter()
    results = evaluate(model, data, attacks, tm, cfg, progress=False)
    return results, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=40, help="suite PGD steps (default 40)")
    parser.add_argument("--aa-steps", type=int, default=100, help="AutoAttack member iterations")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_set, test_set = load_mnist5k()
    x, y = test_set.tensors[0][: args.n], test_set.tensors[1][: args.n]
    cfg = EvalConfig(batch_size=args.n, device="cpu", seed=0)
    tm = ThreatModel("Linf", eps=(args.eps,), steps=args.steps)
    aa_tm = tm.replace(steps=args.aa_steps)

    rows, summary = [], []
    for label, cap in (("capped 0.1 (bottleneck)", 0.1), ("plain ReLU", None)):
        model = build(cap, train_set)
        suite, t_suite = timed(model, (x, y), get_suite("standard", tm, model, x[:8]), tm, cfg)
        aa_attack = get_attack("torchattacks:AutoAttack", aa_tm)
        aa, t_aa = timed(model, (x, y), [aa_attack], aa_tm, cfg)
        for attack in suite.attacks:
            rows.append((label, attack, f"{100 * suite.robust_accuracy(attack, args.eps):.1f}%",
                         f"{sum(r['time'] for r in suite.rows if r['attack'] == attack):.1f}"))
        worst = suite.worst_case(args.eps)
        aa_acc = aa.robust_accuracy(aa_attack.spec, args.eps)
        rows.append((label, "suite worst case", f"{100 * worst:.1f}%", f"{t_suite:.1f}"))
        rows.append((label, f"AutoAttack ({args.aa_steps} steps)", f"{100 * aa_acc:.1f}%", f"{t_aa:.1f}"))
        summary.append((label, f"{100 * suite.clean_accuracy():.1f}%", f"{100 * worst:.1f}%",
                        f"{100 * aa_acc:.1f}%", f"{t_suite / t_aa:.2f}",
                        "yes" if worst <= aa_acc and t_suite <= t_aa else "NO"))
    print_table(("model", "attack", "robust acc", "time (s)"), rows,
                title=f"{args.n} MNIST-5k test samples, Linf eps {args.eps}")
    print_table(("model", "clean", "suite worst case", "AutoAttack", "time suite / AA", "target met"),
                summary, title="standard suite vs AutoAttack")


if __name__ == "__main__":
    main()
