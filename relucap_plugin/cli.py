"""The ``relucap`` command line. Each subcommand is one ``_cmd_*`` function registered below."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import __version__
from ._console import print_table


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relucap",
        description="Capped ReLU activations, model surgery and honest adversarial evaluation.",
    )
    parser.add_argument("--version", action="version", version=f"relucap-plugin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    p = sub.add_parser("info", help="versions, device and registered activations")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
