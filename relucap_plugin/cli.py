"""The ``relucap`` command line. Each subcommand is one ``_cmd_*`` function registered below.

Built for scripts and CI as well as for people: ``--format json|md|table`` (``--json``) on the
commands that report, only the report on stdout (progress and notes go to stderr), exit code 2
for a rejected run, 1 for a run that measured nothing or (``audit --fail-on masking``) found
signs of gradient masking. torch and the package's modules are imported inside the commands,
so ``relucap --help`` starts without them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
from collections.abc import Sequence
from fractions import Fraction

from ._cli_inputs import load_eval_data as _load_eval_data
from ._cli_inputs import load_model as _load_model
from ._cli_inputs import repeated_options as _repeated_options
from ._cli_inputs import shape_arg as _shape_arg
from ._console import print_table
from ._version import __version__

#: API argument names in library messages -> the flag that sets them (our own wording table)
_FLAGS = {
    r"\bresume=False\b": "--no-resume",
    r"\banother out= path\b": "another --out folder",
    r"\bout=": "--out ",
    r"\bstep_size=": "--step-size ",
    r"\bpass restore_caps=True\b": "pass --restore-caps",
    r"^(attack spec\b|unknown \w+ attack\b)": r"--attack: \1",
    r"^unknown attack suite\b": "--suite: unknown attack suite",
}
_PREFIX_FLAGS = {"step_size": "--step-size", "batch_size": "--batch-size", "n_samples": "--n-samples",
                 "restarts": "--restarts", "steps": "--steps", "norm": "--norm",
                 "eps": "--eps", "device": "--device", "seed": "--seed", "caps": "--caps", "n_train": "--n-train",
                 "epochs": "--epochs", "square_queries": "--square-queries", "input_shape": "--input-shape"}


def _cli_message(exc: BaseException) -> str:
    """``exc``'s message in the CLI's words: API arguments replaced by (or prefixed with) flags."""
    text = str(exc)
    for pattern, flag in _FLAGS.items():
        text = re.sub(pattern, flag, text)
    named = [flag for name, flag in _PREFIX_FLAGS.items() if re.match(rf"{name} must\b", text)]
    return f"{named[0]}: {text}" if named else text


def _error(command: str, exc: BaseException, code: int, cleanup=None) -> int:
    """Report a rejected or failed run: ``relucap COMMAND: error: ...`` in the CLI's words on
    stderr; ``cleanup`` removes an --out folder the run created. Returns the exit code."""
    if cleanup is not None:
        cleanup()
    print(f"relucap {command}: error: {_cli_message(exc)}", file=sys.stderr)
    return code


def _eps_value(text: str) -> float:
    """An ``--eps`` value: a number (0.3) or a fraction (8/255)."""
    try:
        return float(Fraction(text.strip())) if "/" in text else float(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(
            f"invalid float value: {text!r} (write a number like 0.3 or a fraction like 8/255)") from None


def _add_format_arguments(p: argparse.ArgumentParser) -> None:
    """``--format`` and its ``--json`` alias, for every command that reports."""
    p.add_argument("--format", choices=("table", "md", "json"), default="table",
                   help="stdout: table (default), md (Markdown) or json (one JSON document)")
    p.add_argument("--json", dest="format", action="store_const", const="json", help="same as --format json")


def _emit(args: argparse.Namespace, payload: dict, table, print_it) -> None:
    """The report on stdout in ``args.format``: ``payload`` as JSON, ``table(markdown=True)``, or
    ``print_it()`` (aligned tables)."""
    if args.format == "json":
        import json

        print(json.dumps(payload, indent=1, default=str))
    elif args.format == "md":
        print(table(markdown=True))
    else:
        print_it()


def _results_payload(command: str, args: argparse.Namespace, results) -> dict:
    """What a script needs from a run: settings, clean accuracy, every aggregate, the worst case."""
    return {
        "command": command, "model": args.model, "out": args.out,
        "threat_model": results.metadata.get("threat_model"),
        "clean_accuracy": results.clean_accuracy(),
        "summary": results.summary(),
        "worst_case": [{"eps": e, "robust_accuracy": results.worst_case(e)} for e in results.eps],
    }


def _out_guard(out: str):
    """Remove ``--out`` again if this run created it and the run was rejected before writing."""
    existed = os.path.exists(out)

    def cleanup() -> None:
        if not existed and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)
    return cleanup


def _cmd_info(args: argparse.Namespace) -> int:
    """Versions of the package, torch and the optional attack libraries; the activations."""
    import importlib.metadata as md

    import torch

    from .registry import create_activation, list_activations

    rows = [("relucap-plugin", __version__), ("torch", torch.__version__)]
    for dist in ("adversarial-robustness-toolbox", "foolbox", "torchattacks"):
        try:
            rows.append((dist, md.version(dist)))
        except md.PackageNotFoundError:
            rows.append((dist, "not installed"))
    rows.append(("device", "cuda" if torch.cuda.is_available() else "cpu"))
    print_table(["component", "version"], rows, title="relucap-plugin")
    x = torch.linspace(-1, 2, 7)
    act_rows = []
    for name in list_activations():
        module = create_activation(name)
        act_rows.append((name, getattr(module, "spec", name), type(module).__name__))
    print_table(["name", "default spec", "class"], act_rows, title="activations")
    capped = create_activation("capped_relu(cap=1)")(x)
    print("capped_relu(cap=1) on", [round(v, 2) for v in x.tolist()], "->",
          [round(v, 2) for v in capped.tolist()])
    return 0


def _prepare_run(args: argparse.Namespace) -> tuple:
    """Model (with --checkpoint), data and EvalConfig of `evaluate` and `audit`; --out created."""
    import torch

    from .distributed import is_main_process
    from .threat import EvalConfig
    from .training import load_checkpoint

    torch.manual_seed(args.seed)  # the same random weights on every torchrun rank
    model = _load_model(args.model)
    if args.checkpoint:
        load_checkpoint(model, args.checkpoint, restore_caps=args.restore_caps)
    elif is_main_process():
        print(f"relucap {args.command}: no --checkpoint given: the model has random weights",
              file=sys.stderr)
    cfg = EvalConfig(batch_size=args.batch_size, device=args.device, seed=args.seed,
                     n_samples=args.n_samples, input_shape=_shape_arg(args.input_shape, "1,28,28"))
    dataset = _load_eval_data(args.data)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise ValueError(f"--out {args.out!r} is a file; --out names a folder for the run's files")
    os.makedirs(args.out, exist_ok=True)
    return model, dataset, cfg


def _write_tables(out: str, stem: str, table, files: dict[str, object] | None = None) -> None:
    """``stem``.txt and ``stem``.md from ``table(markdown=...)``, plus extra text files (each
    written atomically; a folder or special file in their place is refused)."""
    from ._files import atomic_write, check_target

    texts = {f"{stem}.txt": table(), f"{stem}.md": table(markdown=True), **(files or {})}
    for name, text in texts.items():
        path = check_target(os.path.join(out, name), None, what="--out file")
        atomic_write(path, str(text))


def _cmd_evaluate(args: argparse.Namespace) -> int:
    """Attack a model with one or more attacks; write results.jsonl, tables and a plot to --out."""
    from .distributed import is_main_process
    from .evaluation import AttackFailedError, evaluate
    from .threat import ThreatModel

    cleanup = _out_guard(args.out)
    try:
        if not args.attack and not args.suite:
            raise ValueError("name the attacks: --attack SPEC (repeatable) and/or --suite standard")
        model, dataset, cfg = _prepare_run(args)
        tm = ThreatModel(norm=args.norm, eps=tuple(args.eps), steps=args.steps, step_size=args.step_size,
                         restarts=args.restarts)
        attacks = list(args.attack or [])
        notes: list[str] = []
        if args.suite:
            from .adaptive import first_inputs, get_suite, suite_notes

            example = first_inputs(dataset)
            attacks += get_suite(args.suite, tm, model, example, square_queries=args.square_queries)
            notes = [] if example is None else suite_notes(model, example)
        output = int(args.output) if args.output and args.output.lstrip("-").isdigit() else args.output
        results = evaluate(model, dataset, attacks, tm, cfg, out=os.path.join(args.out, "results.jsonl"),
                           resume=not args.no_resume, output=output, progress=not args.quiet,
                           model_name=args.model, notes=notes, keep_adversarial=args.save_adversarial,
                           schedule=args.schedule or ("cascade" if args.suite else "full"))
    except AttackFailedError as exc:
        return _error("evaluate", exc, 1)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        return _error("evaluate", exc, 2, cleanup)
    if not is_main_process():  # under torchrun rank 0 writes and prints the merged table
        return 0
    _write_tables(args.out, "results", results.table)
    written = ["results.jsonl", "results.txt", "results.md"]
    if args.save_adversarial:
        written.append("results.adversarial.safetensors")
    try:
        results.plot(os.path.join(args.out, "robust_accuracy.png"))
        written.append("robust_accuracy.png")
    except ImportError:
        print('relucap evaluate: no plot: matplotlib is not installed (pip install "relucap-plugin[demo]")',
              file=sys.stderr)
    _emit(args, _results_payload("evaluate", args, results), results.table, results.print)
    print(f"results written to {args.out}/ ({', '.join(written)})", file=sys.stderr)
    return 0


def _add_run_arguments(p: argparse.ArgumentParser, out: str, steps: str, n_samples: int | None) -> None:
    """The arguments `evaluate` and `audit` share: model, weights, data, threat model, run."""
    p.add_argument("model", metavar="MODEL",
                   help="mlp:256,32,256[:activation], package.module:factory, or a torchvision name")
    p.add_argument("--checkpoint", help="weights: safetensors or a weights-only torch state dict")
    p.add_argument("--restore-caps", action="store_true",
                   help="put back the caps saved with --checkpoint where MODEL has plain ReLU modules")
    p.add_argument("--data", default="mnist5k",
                   help="mnist5k (default), a folder of MNIST/CIFAR-10 files, a .npz or a .pt")
    p.add_argument("--eps", type=_eps_value, nargs="+", required=True,
                   help="budgets, e.g. 0.1 0.3 or 8/255")
    p.add_argument("--norm", default="Linf", help="Linf (default) or L2")
    p.add_argument("--steps", type=int, default=40, help=f"{steps} (default 40)")
    p.add_argument("--n-samples", type=int, default=n_samples,
                   help="the first N samples (default: " + (str(n_samples) if n_samples else "all") + ")")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (default), cpu or cuda")
    p.add_argument("--out", default=out, metavar="DIR", help=f"output folder (default {out})")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--square-queries", type=int, default=5000,
                   help="query budget of the suite's Square attack (default 5000)")
    p.add_argument("--schedule", choices=("cascade", "full", "audit"), default=None,
                   help="cascade: each attack only on the samples still robust (default with "
                        "--suite); full: every attack on every sample (default with --attack "
                        "only; exact per-attack and agreement tables); audit: BPDA, transfer and "
                        "black-box each on the white-box survivors (default for audit)")
    _add_format_arguments(p)
    p.add_argument("--input-shape", metavar="C,H,W", default=None,
                   help="layout of one sample when the data are flat vectors, e.g. 1,28,28: "
                        "black-box attacks search on it")


def _add_evaluate_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="attack a model through ART/Foolbox/torchattacks and verify",
                       description="Attack MODEL with every --attack at every --eps, verify each "
                       "adversarial example, and write the per-sample results to --out (an existing "
                       "run there is resumed). Runs unchanged under torchrun --nproc-per-node N: "
                       "each rank takes every N-th batch, rank 0 prints and writes the merged results.")
    _add_run_arguments(p, "relucap-results", "attack iterations", None)
    p.add_argument("--attack", action="append", metavar="SPEC",
                   help="attack spec, e.g. torchattacks:PGD or art:ProjectedGradientDescent; repeatable")
    p.add_argument("--suite", default=None,
                   help="add an attack suite, e.g. standard (PGD CE/margin, their BPDA versions, "
                        "Square, transfer); the worst case over all attacks is the headline")
    p.add_argument("--step-size", type=float, default=None, help="default: 2.5 * eps / steps")
    p.add_argument("--restarts", type=int, default=1, help="runs per attack (default 1)")
    p.add_argument("--output", default=None,
                   help="index or key of the logits when the model returns a tuple or dict")
    p.add_argument("--no-resume", action="store_true", help="start results.jsonl over")
    p.add_argument("--save-adversarial", choices=("worst", "all"), default=None,
                   help="keep the verified adversarial examples in --out/results.adversarial.safetensors: "
                        "worst (the worst-case example per sample and eps) or all (also every attack's)")
    p.set_defaults(func=_cmd_evaluate)


#: The audit's own results file: an --out folder shared with `relucap evaluate` keeps that
#: run's results.jsonl untouched.
AUDIT_RESULTS = "audit-results.jsonl"


def _cmd_audit(args: argparse.Namespace) -> int:
    """Run the standard suite and every gradient-masking check; print flags and the verdict."""
    import json

    from .adaptive import evaluate_suite
    from .data import as_tensors
    from .diagnostics import audit
    from .evaluation import AttackFailedError
    from .threat import ThreatModel

    cleanup = _out_guard(args.out)
    try:
        model, dataset, cfg = _prepare_run(args)
        tm = ThreatModel(norm=args.norm, eps=tuple(args.eps), steps=args.steps)
        data = as_tensors(dataset, limit=args.n_samples)
        results = evaluate_suite(model, data, tm, args.suite, cfg, extra_attacks=["torch:FGSM"],
                                 suite_kwargs={"square_queries": args.square_queries},
                                 out=os.path.join(args.out, AUDIT_RESULTS), resume=False,
                                 progress=not args.quiet, model_name=args.model,
                                 schedule=args.schedule or "audit")
        report = audit(model, data, tm, cfg, results=results, model_name=args.model)
        certified = _audit_certified(model, data, tm, cfg, results, args)
    except AttackFailedError as exc:
        return _error("audit", exc, 1)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        return _error("audit", exc, 2, cleanup)
    _write_tables(args.out, "audit", report.table,
                  {"flags.json": json.dumps(report.to_dict(), indent=1, default=str)})
    payload = {**_results_payload("audit", args, results), "verdict": report.verdict,
               "level": report.level, "masking_likely": report.masking_likely,
               "flags": report.to_dict().get("flags"), "certified": certified}
    _emit(args, payload, report.table, report.print)
    if args.format != "json":
        print(certified)
    print(f"audit written to {args.out}/ ({AUDIT_RESULTS}, audit.txt, audit.md, flags.json)", file=sys.stderr)
    if (args.fail_on == "masking" and report.masking_likely) or (
            args.fail_on == "risk" and report.level != "no sign"):
        print(f"relucap audit: --fail-on {args.fail_on}: {report.verdict}", file=sys.stderr)
        return 1
    return 0


def _cmd_certify(args: argparse.Namespace) -> int:
    """Certify every sample at every --eps; merge with an evaluate run's results in --out."""
    from .certification import UnsupportedOpError, certify
    from .results import BracketError, Results
    from .threat import ThreatModel

    cleanup = _out_guard(args.out)
    try:
        model, dataset, cfg = _prepare_run(args)
        model.to(cfg.resolve_device())
        tm = ThreatModel(norm=args.norm, eps=tuple(args.eps), steps=args.steps)
        table = certify(model, dataset, tm, args.method, cfg, max_neurons=args.max_neurons,
                        progress=not args.quiet, model_name=args.model)
        table.save(os.path.join(args.out, "certify.jsonl"))
        attacks = os.path.join(args.out, "results.jsonl")
        if os.path.exists(attacks):
            table = Results.load(attacks).merge(table)
    except BracketError as exc:
        return _error("certify", exc, 1)
    except (ValueError, TypeError, FileNotFoundError, ImportError, UnsupportedOpError) as exc:
        return _error("certify", exc, 2, cleanup)
    _write_tables(args.out, "certify", table.table)
    payload = {**_results_payload("certify", args, table),
               "certified": [{"eps": e, "certified_accuracy": table.certified(e)} for e in tm.eps]}
    _emit(args, payload, table.table, table.print)
    print(f"certificates written to {args.out}/ (certify.jsonl, certify.txt, certify.md)", file=sys.stderr)
    return 0


def _add_certify_parser(sub) -> None:
    p = sub.add_parser("certify", help="certified lower bound on robust accuracy (IBP / CROWN)",
                       description="Bound MODEL's logit margins over the --norm ball of each --eps "
                       "(intersected with the pixel range) by IBP and/or CROWN; a sample is certified "
                       "when no input in the ball changes its prediction. With an evaluate run's "
                       "results.jsonl in --out, prints certified <= robust <= worst case per eps.")
    _add_run_arguments(p, "relucap-results", "unused by certify; recorded to match evaluate", None)
    p.add_argument("--method", choices=("ibp", "crown", "best"), default="best",
                   help="ibp (fast), crown (tighter on normally trained nets) or best (default: both)")
    p.add_argument("--max-neurons", type=int, default=2048,
                   help="widest layer CROWN tightens; wider layers keep IBP bounds (default 2048)")
    p.set_defaults(func=_cmd_certify)


def _audit_certified(model, data, tm, cfg, results, args) -> str:
    """The certified column of the audit: certified <= worst case per eps (IBP, the cheap
    bound), or why the model cannot be certified; a sample both certified and broken raises."""
    from .certification import UnsupportedOpError, certify

    try:
        cert = certify(model, data, tm, "ibp", cfg, progress=False, model_name=args.model)
    except UnsupportedOpError as exc:
        return f"certified: not available ({str(exc).split('. Supported')[0]})"
    merged = results.merge(cert)
    return "\n".join(
        f"certified (IBP) at eps {e:g}: {100 * merged.certified(e):.1f}% <= worst case "
        f"{100 * (merged.worst_case(e) or 0):.1f}%" for e in tm.eps)


def _add_audit_parser(sub) -> None:
    p = sub.add_parser("audit", help="standard attack suite + gradient-masking checks and a verdict",
                       description="Attack MODEL with the standard suite (PGD CE/margin, their BPDA "
                       "versions, Square, transfer from the uncapped twin), run every gradient-masking "
                       "check and print the flags, the per-sample worst case and a verdict.")
    _add_run_arguments(p, "relucap-audit", "PGD iterations", 200)
    p.add_argument("--suite", default="standard", help="attack suite (default: standard)")
    p.add_argument("--fail-on", choices=("masking", "risk"), default=None,
                   help="for CI: masking = exit 1 when masking is measured (an attack gap beyond "
                        "sampling noise); risk = also when only risk factors (zero gradients, "
                        "saturated caps) are seen")
    p.set_defaults(func=_cmd_audit)


def _cmd_inspect(args: argparse.Namespace) -> int:
    """Print the ReLU site table of a model (see relucap_plugin.surgery)."""
    import torch

    from .surgery import find_relus, print_sites

    try:
        model = _load_model(args.model).eval()
        shape = _shape_arg(args.input_shape, "1,3,224,224")
        sites = find_relus(model, None if shape is None else torch.zeros(shape), mode=args.mode)
    except (ValueError, TypeError, ImportError) as exc:
        print(f"relucap inspect: error: {_cli_message(exc)}", file=sys.stderr)
        return 2
    shared = sum(s.shared for s in sites)
    print_sites(sites, title=f"{args.model}: {len(sites)} ReLU sites ({shared} on shared modules)")
    return 0


def _add_inspect_parser(sub) -> None:
    p = sub.add_parser("inspect", help="list the ReLU sites of a model (what cap_relus can change)",
                       description="List every ReLU application of MODEL's forward pass: module, "
                       "function and method calls, shared modules, and with --input-shape the "
                       "activation shape and width.")
    p.add_argument("model", metavar="MODEL",
                   help="a torchvision model name (weights=None), package.module:factory, or mlp:256,32,256")
    p.add_argument("--input-shape", metavar="N,C,H,W", help="e.g. 1,3,224,224: adds shapes and widths")
    p.add_argument("--mode", choices=("auto", "modules"), default="auto",
                   help="auto (fx tracing, default) or modules (nn.ReLU/nn.ReLU6 modules only)")
    p.set_defaults(func=_cmd_inspect)


def _cmd_experiment(args: argparse.Namespace) -> int:
    """Run the grid of ``relucap demo`` / ``relucap reproduce`` (relucap_plugin.experiment)."""
    from .experiment import preset, run_experiment

    try:
        config = preset(args.command, full_grid=getattr(args, "full_grid", False), seed=args.seed,
                        pssilu=args.pssilu or None, n_samples=args.n_samples, epochs=args.epochs,
                        n_train=args.n_train, steps=args.steps, square_queries=args.square_queries,
                        caps=None if args.caps is None else tuple(args.caps),
                        eps=None if args.eps is None else tuple(args.eps), device=args.device)
        if args.certified_training is not None:
            config = dataclasses.replace(config, certified_training=None if args.certified_training
                                         == "none" else args.certified_training)
        result = run_experiment(config, out=args.out, progress=not args.quiet)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        print(f"relucap {args.command}: error: {_cli_message(exc)}", file=sys.stderr)
        return 2
    result.print()
    print(f"{len(result.models)} models in {result.seconds:.0f} s; report, plots and results "
          f"written to {args.out}/ (report.md, results/*.jsonl)")
    return 0


_EXPERIMENT_HELP = {"demo": "the paper's experiment in about two minutes (offline, CPU)",
                    "reproduce": "the full grid: cap x layer position x training (a bigger budget)"}


def _add_experiment_parser(sub, name: str, detailed: bool = True) -> None:
    """The ``demo``/``reproduce`` parser; its defaults come from :func:`experiment.preset`, which
    imports torch, so it is only built in full when that command is asked for."""
    if not detailed:
        sub.add_parser(name, help=_EXPERIMENT_HELP[name]).set_defaults(func=_cmd_experiment)
        return
    from .experiment import preset

    d = preset(name)

    def listed(values) -> str:
        return " ".join(f"{v:g}" for v in values)

    p = sub.add_parser(
        name, help=_EXPERIMENT_HELP[name],
        description=f"Train an MLP on the embedded MNIST digits with plain ReLU and capped ReLUs "
        f"(caps {listed(d.caps)} at positions {', '.join(d.positions)}; training "
        f"{', '.join(d.trainings)}{'; FGSM training of ReLU and of the best cap' if d.fgsm_best else ''}"
        "), attack each with the same PGD through torchattacks, Foolbox and ART and with the "
        "standard suite, audit it for gradient masking, print one table and write a report.")
    if name == "demo":
        p.add_argument("--full-grid", action="store_true",
                       help="the paper's cap grid 0.01 0.1 1 10 100 instead of " + listed(d.caps))
    p.add_argument("--caps", type=float, nargs="+", default=None, help=f"default {listed(d.caps)}")
    p.add_argument("--pssilu", action="store_true", help="add a PSSiLU network for comparison")
    p.add_argument("--certified-training", choices=("ibp", "crown_ibp", "none"), default=None,
                   help=f"the certified-trained capped model (default {d.certified_training}; "
                   "none: leave it out); every model gets a certified column either way")
    p.add_argument("--out", default=f"relucap-{name}", metavar="DIR",
                   help=f"output folder (default relucap-{name})")
    p.add_argument("--seed", type=int, default=0, help="seed of the split, weights, training and "
                   "attacks (default 0); the same seed gives the same table")
    p.add_argument("--n-samples", type=int, default=None,
                   help=f"test digits attacked (default {d.n_samples})")
    p.add_argument("--n-train", type=int, default=None, help="training digits (default all 4000)")
    p.add_argument("--epochs", type=int, default=None, help=f"default {d.epochs}")
    p.add_argument("--eps", type=float, nargs="+", default=None,
                   help=f"L-inf budgets (default {listed(d.eps)}; the table shows "
                   f"{d.headline_eps:g} if listed, else the largest)")
    p.add_argument("--steps", type=int, default=None, help=f"PGD steps (default {d.steps})")
    p.add_argument("--square-queries", type=int, default=None,
                   help=f"Square attack queries (default {d.square_queries})")
    p.add_argument("--device", default=None, help="auto (default), cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_cmd_experiment)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The ``relucap`` parser; ``command`` (the subcommand about to run, None: all) is built in
    full, the experiment commands only when asked for (see :func:`_add_experiment_parser`)."""
    parser = argparse.ArgumentParser(
        prog="relucap",
        description="Capped ReLU activations, model surgery and honest adversarial evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"relucap-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="versions, device and registered activations")
    p.set_defaults(func=_cmd_info)
    _add_evaluate_parser(sub)
    _add_audit_parser(sub)
    _add_certify_parser(sub)
    _add_inspect_parser(sub)
    for name in ("demo", "reproduce"):
        _add_experiment_parser(sub, name, detailed=command in (None, name))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    parser = build_parser(command)
    args = parser.parse_args(argv)
    repeated = _repeated_options(parser, argv)
    if repeated:
        parser.error(f"option given twice: {'; '.join(repeated)} (the last would silently win); "
                     "give each option once (--eps takes several values: --eps 0.1 0.3)")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
