"""Cost of model surgery: ``find_relus`` + ``cap_relus`` on torchvision models.

Targets (issue 3): resnet50 (module replacement) <= 20 ms; any single fx conversion <= 1 s.

Measured side by side in one run, variants interleaved in every repeat, best of the repeats;
both wall time and the process's CPU time (one torch thread: on a machine shared with other
jobs wall time mostly measures their load). Per model:

- ``find``: ``find_relus(model)`` (one torch.fx trace of the whole model);
- ``surgery``: ``sites = find_relus(model)`` then ``cap_relus(model, 0.5, sites=sites,
  inplace=True)``: the surgery itself; cap_relus reuses the trace behind ``sites``;
- ``find; cap (traces again)``: the same without passing ``sites``: cap_relus traces again;
- ``default (copy)``: like ``surgery`` without ``inplace``: cap_relus deep-copies the model
  first (memory bound: resnet50 has 100 MB of weights);
- for reference: ``fx trace`` (``torch.fx.Tracer().trace(model)``, the floor of any fx-based
  discovery) and ``deepcopy`` alone.

The targets are checked on ``surgery`` (CPU time). The zoo part builds every classification
model of torchvision on the ``meta`` device (no weights: the surgery does not depend on their
values, and building the largest real models takes minutes) and times ``surgery`` per model.
A pure-Python loop is timed too, so figures from machines of different speed can be compared.

    OMP_NUM_THREADS=1 python benchmarks/bench_surgery.py [--repeats 7] [--zoo-repeats 3] [--no-zoo]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch
import torchvision
from torch import fx

from relucap_plugin._console import print_table, progress
from relucap_plugin.surgery import cap_relus, find_relus

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.test_surgery import ZOO, build  # noqa: E402  the tests' zoo builder (meta device too)

CAP = 0.5
TARGET_MODULES_MS = 20.0
TARGET_FX_MS = 1000.0


def timed(fn) -> tuple[float, float]:
    """(wall ms, CPU ms) of one call."""
    w, c = time.perf_counter(), time.process_time()
    fn()
    return (time.perf_counter() - w) * 1e3, (time.process_time() - c) * 1e3


def surgery(model: torch.nn.Module):
    """find_relus, then cap_relus(inplace=True) on the sites found; returns the report."""
    return cap_relus(model, CAP, sites=find_relus(model), inplace=True)[1]


def bench_model(name: str, repeats: int):
    """Best (wall ms, CPU ms) per variant, and the report of the last surgery."""
    model = build(name)
    holder = {}

    def run_surgery(work):
        holder["report"] = surgery(work)

    variants = {
        "find": lambda work: find_relus(model),
        "surgery": run_surgery,
        "find; cap (traces again)":
            lambda work: (find_relus(work), cap_relus(work, CAP, inplace=True)),
        "default (copy)": lambda work: cap_relus(model, CAP, sites=find_relus(model)),
        "fx trace": lambda work: fx.Tracer().trace(model),
        "deepcopy": lambda work: copy.deepcopy(model),
    }
    best = {k: (float("inf"), float("inf")) for k in variants}
    for _ in range(repeats):
        for key, fn in variants.items():
            work = copy.deepcopy(model) if "cap" in key or key == "surgery" else None  # not timed
            wall, cpu = timed(lambda fn=fn, work=work: fn(work))
            best[key] = (min(best[key][0], wall), min(best[key][1], cpu))
            del work
    return best, holder["report"]


def _verdict(value: float, target: float) -> str:
    return "met" if value <= target else "NOT met"


def python_speed() -> float:
    """ms for a fixed pure-Python loop (machine speed reference)."""
    return min(timed(lambda: sum(i * i for i in range(1_000_000)))[1] for _ in range(3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--zoo-repeats", type=int, default=3)
    parser.add_argument("--no-zoo", action="store_true", help="skip the torchvision zoo")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, 1 thread; "
          f"pure-Python reference loop: {python_speed():.0f} ms CPU")

    rows, verdicts = [], []
    for name, target in (("resnet50", TARGET_MODULES_MS), ("densenet121", TARGET_FX_MS)):
        best, report = bench_model(name, args.repeats)
        for key, (wall, cpu) in best.items():
            rows.append((name, key, f"{wall:.1f}", f"{cpu:.1f}",
                         f"{cpu / best['surgery'][1]:.2f}"))
        cpu = best["surgery"][1]
        verdicts.append((f"{name} ({report.method}, {report.count} sites): find + cap",
                         f"{cpu:.1f} ms", f"<= {target:g} ms", _verdict(cpu, target)))
    print_table(["model", "variant", "best wall ms", "best CPU ms", "x surgery"], rows,
                title=f"find_relus + cap_relus, best of {args.repeats}")

    if not args.no_zoo:
        zoo_rows, worst_fx, worst_any = [], ("", 0.0), ("", 0.0)
        names = ZOO
        for name in progress(names, "zoo (meta device)"):
            model = build(name, meta=True)
            best, holder = float("inf"), {}
            try:
                for _ in range(args.zoo_repeats):
                    work = copy.deepcopy(model)
                    best = min(best, timed(lambda holder=holder, work=work: holder.update(report=surgery(work)))[1])
            except ValueError as exc:
                if "applies no ReLU" not in str(exc):
                    raise
                zoo_rows.append((name, 0, "no ReLU", "", ""))
                continue
            report = holder["report"]
            zoo_rows.append((name, report.count, report.method, len(report.rewritten),
                             f"{best:.1f}"))
            if best > worst_any[1]:
                worst_any = (name, best)
            if report.method == "fx" and best > worst_fx[1]:
                worst_fx = (name, best)
        print_table(["model", "sites", "method", "forwards rewritten", "find + cap CPU ms"],
                    zoo_rows, title=f"torchvision zoo on meta, best of {args.zoo_repeats}")
        print(f"max over the zoo: {worst_any[1]:.1f} ms ({worst_any[0]}); "
              f"max fx conversion: {worst_fx[1]:.1f} ms ({worst_fx[0]})")
        verdicts.append((f"zoo max fx conversion ({worst_fx[0]})", f"{worst_fx[1]:.1f} ms",
                         f"<= {TARGET_FX_MS:g} ms", _verdict(worst_fx[1], TARGET_FX_MS)))
    print_table(["measure", "CPU time", "target", "verdict"], verdicts, title="targets")


if __name__ == "__main__":
    main()
