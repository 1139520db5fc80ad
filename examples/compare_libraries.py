"""One model, the same PGD through torchattacks, Foolbox and ART, side by side.

The three libraries' PGDs have different defaults (steps, step size, random start; see
docs/libraries/). Here one explicit ``ThreatModel`` configures all three, so they run the same
attack; the agreement table shows their robust accuracies on the same samples, the largest gap
and how many samples they judge differently (random starts differ between libraries, so a few
disagreements are expected; a large gap means a configuration is not the same).

Run ``python examples/compare_libraries.py`` (about 20 s on a 2-core CPU) or add ``--tiny``.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from relucap_plugin import EvalConfig, ThreatModel, evaluate, load_mnist5k, mlp, train

ATTACKS = ["torchattacks:PGD", "foolbox:LinfPGD", "art:ProjectedGradientDescent"]


def main(argv: Sequence[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--eps", type=float, nargs="+", default=[0.05, 0.1])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--n-samples", type=int, default=200)
    parser.add_argument("--tiny", action="store_true", help="600 training digits, 30 test "
                        "digits, PGD-5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (default 1: the model is small; more threads oversubscribe a shared machine)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    train_set, test_set = load_mnist5k(seed=args.seed)
    x, y = train_set.tensors
    n_train, n_test, steps = (600, 30, 5) if args.tiny else (len(x), args.n_samples, args.steps)

    torch.manual_seed(args.seed)
    model = mlp((256, 32, 256), activation="capped_relu(cap=1)")
    train(model, (x[:n_train], y[:n_train]), epochs=2, seed=args.seed, progress=not args.tiny)

    tm = ThreatModel("Linf", eps=tuple(args.eps), steps=steps, random_start=True)
    results = evaluate(model, (test_set.tensors[0][:n_test], test_set.tensors[1][:n_test]),
                       ATTACKS, tm, EvalConfig(seed=args.seed), progress=False,
                       model_name="MLP 256-32-256, capped ReLU (cap 1)")
    results.print()
    return results


if __name__ == "__main__":
    main()
