"""One evaluation spread over several processes with torchrun, resumable, printed by rank 0.

Every rank builds the same model (same seed, same training), attacks its share of the test
digits, and streams its rows to ``<out>/results.rankR-of-W.jsonl``; rank 0 gathers them, writes
``<out>/results.jsonl`` and prints the table. Run it again after a crash or with another number
of processes: only the missing rows are computed.

    torchrun --standalone --nproc-per-node 2 examples/distributed.py      # about 10 s on 2 cores
    python examples/distributed.py --tiny                                 # one process works too
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import torch

from relucap_plugin import EvalConfig, ThreatModel, evaluate, load_mnist5k, mlp, train
from relucap_plugin.distributed import get_world_size, is_main_process


def main(argv: Sequence[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="relucap-distributed", help="results folder")
    parser.add_argument("--n-samples", type=int, default=400)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--tiny", action="store_true", help="600 training digits, 30 test "
                        "digits, PGD-5")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // get_world_size()))
    train_set, test_set = load_mnist5k(seed=args.seed)
    x, y = train_set.tensors
    n_train, n_test, steps = (600, 30, 5) if args.tiny else (len(x), args.n_samples, args.steps)

    torch.manual_seed(args.seed)  # the same weights on every rank (evaluate checks it)
    model = mlp((256, 32, 256), activation="capped_relu(cap=1)")
    train(model, (x[:n_train], y[:n_train]), epochs=2, seed=args.seed, progress=False)

    os.makedirs(args.out, exist_ok=True)
    results = evaluate(model, (test_set.tensors[0][:n_test], test_set.tensors[1][:n_test]),
                       ["torch:PGD", "torch:FGSM"],
                       ThreatModel("Linf", eps=(0.05, 0.1), steps=steps),
                       EvalConfig(batch_size=10 if args.tiny else 50, seed=args.seed),
                       out=os.path.join(args.out, "results.jsonl"), progress=not args.tiny,
                       model_name="MLP 256-32-256, capped ReLU (cap 1)")
    if is_main_process():
        results.print()
        print(f"{get_world_size()} process(es); merged table in {args.out}/results.jsonl")
    return results


if __name__ == "__main__":
    main()
