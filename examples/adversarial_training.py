"""Adversarially train a capped MLP and compare it with standard training, honestly evaluated.

The paper-style MLP (784-256-32-256-10) gets a capped ReLU on its 32-unit bottleneck with
``cap_relus`` *before* training (the paper trains capped networks), then is trained twice from
the same initial weights on the embedded MNIST digits: with clean batches and with FGSM
adversarial training. Each is attacked with PGD and with the standard suite; the table shows
PGD next to the per-sample worst case over all attacks, which is the number to trust when a
cap masks gradients.

Run ``python examples/adversarial_training.py`` (about 30 s on a 2-core CPU) or add ``--tiny``.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence

import torch

from relucap_plugin import EvalConfig, ThreatModel, cap_relus, evaluate_suite, load_mnist5k, mlp, train


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cap", type=float, default=1.0, help="bottleneck cap (default 1)")
    parser.add_argument("--eps", type=float, default=0.1, help="training and attack budget")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--n-samples", type=int, default=200, help="test digits attacked")
    parser.add_argument("--tiny", action="store_true", help="500 training digits, 1 epoch, 20 "
                        "test digits, PGD-5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the model is small; more threads oversubscribe a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_set, test_set = load_mnist5k(seed=args.seed)
    x, y = train_set.tensors
    n_train, epochs, n_test, steps, queries = (
        (500, 1, 20, 5, 20) if args.tiny else (len(x), args.epochs, args.n_samples, 20, 300))

    torch.manual_seed(args.seed)
    relu_net = mlp((256, 32, 256))
    capped, report = cap_relus(relu_net, args.cap, sites="bottleneck", example_input=x[:1])
    report.print()

    tm = ThreatModel("Linf", eps=(args.eps,), steps=steps)
    test = (test_set.tensors[0][:n_test], test_set.tensors[1][:n_test])
    rows = {}
    for method in ("standard", "fgsm"):
        net = copy.deepcopy(capped)
        train(net, (x[:n_train], y[:n_train]), method, epochs=epochs, eps=args.eps, seed=args.seed)
        results = evaluate_suite(net, test, tm, config=EvalConfig(seed=args.seed),
                                 suite_kwargs={"square_queries": queries}, progress=False,
                                 model_name=f"cap {args.cap:g} bottleneck, {method}")
        rows[method] = {"clean": results.clean_accuracy(),
                        "pgd": results.robust_accuracy("torch:PGD", args.eps),
                        "worst_case": results.worst_case(args.eps)}
    print(f"capped MLP (cap {args.cap:g} on the bottleneck): our numbers, {n_test} test digits")
    print(f"{'training':<10} {'clean':>7} {f'PGD-{steps} eps {args.eps:g}':>16} {'worst case (suite)':>19}")
    for method, r in rows.items():
        print(f"{method:<10} " + " ".join(f"{100 * v:>{w}.1f}%" for v, w in zip(r.values(), (6, 15, 18))))
    return rows


if __name__ == "__main__":
    main()
