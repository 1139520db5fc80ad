"""Distributed evaluation: 1 vs 2 torchrun ranks (one thread each) on the same workload.

Workload: L-inf PGD-40 (``torch:PGD``, eps 0.1, 0.2 and 0.3, step 2.5 * eps / 40, random
start) on the MNIST MLP 784-256-32-256-10 of ``relucap_plugin.models.mlp``, trained here for 1
Adam epoch on the mnist5k train split (seed 0), attacking the first ``--n-samples`` test digits
of ``load_mnist5k`` in batches of ``--batch-size``, with ``out=`` (JSONL shards, merged file).

Each configuration is a real ``torchrun --standalone --nproc-per-node W`` launch of this file.
After an untimed warm-up (one batch: lazy imports, first kernels), rank 0 times ``evaluate()``
from a barrier to its return (sharding, attacks, shard files, the gather and the merged file;
not process start-up, printed separately as the launch's wall time).
Launches alternate 1, 2, 1, 2, ... so that the load of other jobs on the machine hits both;
printed: the best wall time of each, the throughput ratio (best over best) and the median of the
ratios of back-to-back pairs, and the CPU seconds of the busiest rank (1 rank over 2 ranks: how
well the work splits, whatever other jobs do to the wall time). Target: >= 1.6x throughput on a
2-core machine. The 2-rank table is checked to equal the 1-rank table.

    OMP_NUM_THREADS=1 python benchmarks/bench_distributed.py [--repeats 3] [--n-samples 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

EPS, STEPS = (0.1, 0.2, 0.3), 40


def worker(folder: str, n_samples: int, batch_size: int) -> None:
    """One rank: evaluate, and write its wall and CPU seconds to ``folder``/timing.rankR.json."""
    import torch.distributed as dist

    from relucap_plugin import distributed
    from relucap_plugin.data import load_mnist5k
    from relucap_plugin.evaluation import evaluate
    from relucap_plugin.models import mlp
    from relucap_plugin.threat import EvalConfig, ThreatModel
    from relucap_plugin.training import load_checkpoint

    torch.set_num_threads(1)
    model = load_checkpoint(mlp(), os.path.join(folder, "..", "model.pt")).eval()
    x, y = load_mnist5k()[1].tensors
    tm = ThreatModel("Linf", eps=EPS, steps=STEPS)
    cfg = EvalConfig(batch_size=batch_size, device="cpu", seed=0)
    evaluate(model, (x[:batch_size], y[:batch_size]), "torch:PGD", tm, cfg, progress=False)
    if distributed.setup("cpu") is not None:
        dist.barrier()
    t0, c0 = time.perf_counter(), time.process_time()
    res = evaluate(model, (x[:n_samples], y[:n_samples]), "torch:PGD", tm, cfg,
                   out=os.path.join(folder, "results.jsonl"), progress=False, model_name="mlp")
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    with open(os.path.join(folder, f"timing.rank{distributed.get_rank()}.json"), "w") as f:
        json.dump({"seconds": seconds, "cpu": cpu, "rows": len(res)}, f)


def launch(world: int, folder: str, args: argparse.Namespace) -> tuple[float, float, float, str]:
    """(rank 0's evaluate wall seconds, the largest CPU seconds of a rank, launch wall seconds,
    results file) of one torchrun launch."""
    os.makedirs(folder)
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc-per-node", str(world), os.path.abspath(__file__),
           "--worker", folder, "--n-samples", str(args.n_samples),
           "--batch-size", str(args.batch_size)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                   stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    timings = []
    for rank in range(world):
        with open(os.path.join(folder, f"timing.rank{rank}.json")) as f:
            timings.append(json.load(f))
    cpu = max(t["cpu"] for t in timings)
    return timings[0]["seconds"], cpu, wall, os.path.join(folder, "results.jsonl")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-samples", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--worker", metavar="FOLDER", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.n_samples, args.batch_size)
        return

    from relucap_plugin.data import load_mnist5k
    from relucap_plugin.models import mlp
    from relucap_plugin.results import Results
    from relucap_plugin.training import save_checkpoint, train

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = mlp()
        train(model, load_mnist5k()[0], epochs=1, lr=1e-3, batch_size=64, seed=0,
              device="cpu", progress=False)
        save_checkpoint(model, os.path.join(tmp, "model.pt"))
        times: dict[int, list[float]] = {1: [], 2: []}
        cpus: dict[int, list[float]] = {1: [], 2: []}
        walls: dict[int, list[float]] = {1: [], 2: []}
        tables = {}
        for i in range(args.repeats):
            for world in (1, 2):
                seconds, cpu, wall, path = launch(world, os.path.join(tmp, f"w{world}-{i}"), args)
                times[world].append(seconds)
                cpus[world].append(cpu)
                walls[world].append(wall)
                tables[world] = Results.load(path)
                print(f"repeat {i + 1}: {world} rank(s): evaluate {seconds:.2f} s wall, "
                      f"busiest rank {cpu:.2f} s CPU, launch {wall:.2f} s", flush=True)
        assert tables[1].outcomes() == tables[2].outcomes(), "2 ranks differ from 1 rank"
    n = args.n_samples
    best1, best2 = min(times[1]), min(times[2])
    pairs = statistics.median(a / b for a, b in zip(times[1], times[2]))
    print(f"\nPGD-{STEPS} at eps {EPS} on {n} MNIST digits, MLP 784-256-32-256-10, "
          f"batch {args.batch_size}, 1 thread per rank, best of {args.repeats}:")
    print(f"  1 rank : evaluate {best1:.2f} s ({n / best1:.1f} samples/s), "
          f"launch {min(walls[1]):.2f} s")
    print(f"  2 ranks: evaluate {best2:.2f} s ({n / best2:.1f} samples/s), "
          f"launch {min(walls[2]):.2f} s")
    print(f"  throughput ratio 2 vs 1 rank: {best1 / best2:.2f}x best/best, "
          f"{pairs:.2f}x median of pairs (target >= 1.6x); identical tables: yes")
    print(f"  CPU seconds of the busiest rank, 1 rank / 2 ranks (best of each): "
          f"{min(cpus[1]) / min(cpus[2]):.2f}x: the split of the work alone; wall time far "
          "above CPU time means other jobs held the cores")


if __name__ == "__main__":
    main()
