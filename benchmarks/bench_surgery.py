"""Cost of model surgery: ``find_relus`` + ``cap_relus`` on torchvision models.

Targets (issue 3): resnet50 (module replacement) <= 20 ms; any single fx conversion <= 1 s.

Measured side by side in one run, variants interleaved in every repeat, best of the repeats;
both wall time and the process's CPU time (one torch thread: on a machine shared with other
jobs wall time mostly measures their load). Per model:

- ``find``: ``find_relus(model)`` (one forward pass, plus an fx trace as deep as the ReLUs
  where some ReLU is functional);
- ``surgery``: ``sites = find_relus(model)`` then ``cap_relus(model, 0.5, sites=sites,
  inplace=True)``: the surgery itself; cap_relus reuses the trace behind ``sites``;
- ``find; cap (traces again)``: the same without passing ``sites``: cap_relus finds them again;
- ``default (copy)``: like ``surgery`` without ``inplace``: cap_relus deep-copies the model
  first (memory bound: resnet50 has 100 MB of weights);
- for reference: ``fx trace`` (``torch.fx.Tracer().trace(model)``, the floor of any fx-based
  discovery) and ``deepcopy`` alone.

The targets are checked on ``surgery`` (CPU time). The zoo part builds every classification
model of torchvision on the ``meta`` device (no weights: the surgery does not depend on their
values, and building the largest real models takes minutes) and times ``surgery`` per model.
A pure-Python loop is timed too, so figures from machines of different speed can be compared.

The slowest part (issue 13) times ``cap_relus(model, 0.5)`` (default copy, self-check included),
the same with a small correct ``example_input`` (the smallest of 32, 48, 64, 96, ... that the
model runs, batch of one), the same with ``inplace=True`` and ``find_relus(model)`` on the slowest timm zoo models with
real weights, before and after: "before" is the whole package of git revision ``--before``
(default abcff09), imported next to the current one and timed interleaved with it. The last
row is the median over those models, or over every timm model of the zoo test with
``--timm-zoo``. Target: cap_relus under 0.5 s on each. The ``floor`` column is what no
self-checked conversion can go below: two plain ``no_grad`` forwards at the input the check
synthesises (the original's and the converted model's) plus cloning the weights (the copy).

    OMP_NUM_THREADS=1 python benchmarks/bench_surgery.py [--repeats 7] [--zoo-repeats 3] [--no-zoo]
        [--before REV] [--no-slowest] [--only-slowest] [--timm-zoo]
"""

from __future__ import annotations

import argparse
import copy
import gc
from functools import partial
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's package, first

import relucap_plugin  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import fx  # noqa: E402

from relucap_plugin._console import print_table, progress  # noqa: E402
from relucap_plugin.surgery import cap_relus, find_relus  # noqa: E402

from tests.test_surgery import ZOO, build  # noqa: E402  the tests' zoo builder (meta device too)
from tests.test_surgery_zoo import TIMM as TIMM_ZOO  # noqa: E402

CAP = 0.5
TARGET_MODULES_MS = 20.0
TARGET_FX_MS = 1000.0
TARGET_SLOWEST_MS = 500.0  # issue 13: cap_relus on the slowest zoo models


def timed(fn) -> tuple[float, float]:
    """(wall ms, CPU ms) of one call. The garbage of earlier calls is collected first, outside
    the clock: a converted model that holds reference cycles would otherwise be freed inside
    whichever call comes next (often of the other variant), and charged to it."""
    gc.collect()
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


SLOWEST = ("ghostnetv3_050", "inception_resnet_v2", "mobileone_s0", "nasnetalarge",
           "densenet121", "res2net50_14w_8s")


def load_before(rev: str):
    """``relucap_plugin.surgery`` as of git revision ``rev``: that revision's whole package,
    extracted with ``git archive`` and imported under another name next to the current one
    (the package uses relative imports only)."""
    import importlib
    import io
    import subprocess
    import tarfile

    root = Path(__file__).resolve().parents[1]
    name = f"relucap_before_{rev}"
    where = Path("/tmp") / name
    if not (where / name).exists():
        tar = subprocess.run(["git", "archive", rev, "relucap_plugin"], cwd=root, check=True,
                             capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
            archive.extractall(where, filter="data")
        (where / "relucap_plugin").rename(where / name)
    sys.path.insert(0, str(where))
    try:
        module = importlib.import_module(f"{name}.surgery")
    finally:
        sys.path.remove(str(where))
    return module


def _timm_model(name: str):
    import timm

    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False).eval()


def _small_input(model) -> torch.Tensor:
    """The smallest square batch of one that the model runs (not timed): a small correct
    ``example_input`` as a user would pass it."""
    for size in (32, 48, 64, 96, 128, 224, 299):
        x = torch.randn(1, 3, size, size)
        try:
            with torch.no_grad():
                model(x)
            return x
        except RuntimeError:
            continue
    raise ValueError(f"{type(model).__name__} runs at none of the sizes tried")


def floor(model, repeats: int) -> float:
    """CPU ms no cap_relus with its self-check can go below: two plain ``no_grad`` forwards
    of the input the check synthesises (the original's and the converted model's) and a
    clone of every parameter and buffer (the default copy), each the best of ``repeats``."""
    from relucap_plugin.surgery import verify

    args, _, why = verify.reference_run(model, None)
    if args is None:
        raise ValueError(f"no synthesised input runs: {why}")

    def forward():
        with torch.no_grad():
            model(*args)

    def clones():
        with torch.no_grad():
            return [t.clone() for t in dict.fromkeys([*model.parameters(), *model.buffers()])]

    fwd = min(timed(forward)[1] for _ in range(repeats))
    return 2 * fwd + min(timed(clones)[1] for _ in range(repeats))


def bench_before_after(rev: str, names, repeats: int) -> list[tuple]:
    """CPU ms of cap_relus (default: copy; with a small example_input; and inplace) and
    find_relus, before and after, interleaved per repeat."""
    before = load_before(rev)
    rows = []
    for name in progress(names, f"timm models, before ({rev}) and after"):
        model = _timm_model(name)
        x = _small_input(model)
        times: dict[str, float] = {}
        failures: dict[str, str] = {}
        for _ in range(repeats):
            for tag, lib in (("before", before), ("after", sys.modules[__name__])):
                work = copy.deepcopy(model)  # not timed: inplace converts it
                runs = {f"cap {tag}": partial(lib.cap_relus, model, CAP),
                        f"input {tag}": partial(lib.cap_relus, model, CAP, example_input=x),
                        f"inplace {tag}": partial(lib.cap_relus, work, CAP, inplace=True),
                        f"find {tag}": partial(lib.find_relus, model)}
                for key, fn in runs.items():
                    try:
                        times[key] = min(times.get(key, float("inf")), timed(fn)[1])
                    except ValueError as exc:  # the code before could not trace some models
                        times[key] = float("nan")
                        failures[key] = type(exc).__name__
                del work, runs
        times["floor"] = floor(model, repeats)
        report = cap_relus(model, CAP)[1]
        rows.append((f"{name} ({x.shape[-1]})", report.count, times, report.check.split(":")[0]
                     + "".join(f"; {k} failed: {v}" for k, v in failures.items())))
    return rows


def _ratio_rows(rows: list[tuple]) -> list[tuple]:
    """Table rows; a variant that failed shows as nan."""
    out = []
    for name, count, t, check in rows:
        out.append((name, count,
                    f"{t['cap before']:.0f}", f"{t['cap after']:.0f}",
                    f"{t['cap after'] / t['cap before']:.2f}",
                    f"{t['input before']:.0f}", f"{t['input after']:.0f}",
                    f"{t['inplace before']:.0f}", f"{t['inplace after']:.0f}",
                    f"{t['find before']:.0f}", f"{t['find after']:.0f}",
                    f"{t['find after'] / t['find before']:.2f}", f"{t['floor']:.0f}",
                    f"{t['cap after'] / t['floor']:.2f}", check))
    return out


def _median_row(rows: list[tuple]) -> tuple:
    """Medians over the models where every variant ran."""
    import math
    import statistics

    ok = [t for _, _, t, _ in rows if not any(math.isnan(v) for v in t.values())]
    med = {k: statistics.median(t[k] for t in ok) for k in rows[0][2]}
    return _ratio_rows([(f"median of {len(ok)}", "", med, "")])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--zoo-repeats", type=int, default=3)
    parser.add_argument("--no-zoo", action="store_true", help="skip the torchvision zoo")
    parser.add_argument("--before", default="abcff09", help="git revision timed as 'before'")
    parser.add_argument("--timm-zoo", action="store_true",
                        help="also time every timm model of the zoo test (the median row)")
    parser.add_argument("--no-slowest", action="store_true", help="skip the slowest timm models")
    parser.add_argument("--only-slowest", action="store_true", help="run only that part")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"relucap_plugin from {Path(relucap_plugin.__file__).parent}; "
          f"torch {torch.__version__}, torchvision {torchvision.__version__}, 1 thread; "
          f"pure-Python reference loop: {python_speed():.0f} ms CPU")

    rows, verdicts = [], []
    for name, target in () if args.only_slowest else (("resnet50", TARGET_MODULES_MS), ("densenet121", TARGET_FX_MS)):
        best, report = bench_model(name, args.repeats)
        for key, (wall, cpu) in best.items():
            rows.append((name, key, f"{wall:.1f}", f"{cpu:.1f}",
                         f"{cpu / best['surgery'][1]:.2f}"))
        cpu = best["surgery"][1]
        verdicts.append((f"{name} ({report.method}, {report.count} sites): find + cap",
                         f"{cpu:.1f} ms", f"<= {target:g} ms", _verdict(cpu, target)))
    if rows:
        print_table(["model", "variant", "best wall ms", "best CPU ms", "x surgery"], rows,
                    title=f"find_relus + cap_relus, best of {args.repeats}")

    if not args.no_zoo and not args.only_slowest:
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
    if not args.no_slowest:
        names = list(dict.fromkeys(SLOWEST + (TIMM_ZOO if args.timm_zoo else ())))
        measured = bench_before_after(args.before, names, max(1, args.zoo_repeats))
        table = _ratio_rows([r for r in measured if r[0].split(" (")[0] in SLOWEST])
        table.append(_median_row(measured))
        print_table(["model (input size)", "sites", "cap before", "cap after", "after/before",
                     "with input before", "after", "inplace before", "inplace after", "find before", "find after",
                     "after/before", "floor", "cap after/floor", "self-check"], table,
                    title=f"CPU ms of cap_relus(model, {CAP}) (default copy; with a small "
                          "example_input, the size in the first column; inplace=True) and "
                          f"find_relus(model) on timm models, real weights, before "
                          f"({args.before}) and after, best of {max(1, args.zoo_repeats)}; "
                          "floor: two plain no_grad forwards at the check's input and a clone "
                          "of the weights")
        for key, what in (("cap after", "cap_relus(model, cap)"),
                          ("input after", "cap_relus(model, cap, example_input=small)")):
            worst = max(measured, key=lambda r: r[2][key])
            verdicts.append((f"slowest {what}: {worst[0]}", f"{worst[2][key]:.0f} ms",
                             f"<= {TARGET_SLOWEST_MS:g} ms",
                             _verdict(worst[2][key], TARGET_SLOWEST_MS)))
    print_table(["measure", "CPU time", "target", "verdict"], verdicts, title="targets")


if __name__ == "__main__":
    main()
