"""What the ``relucap`` command line reads from the user: model specs (``MODEL``), data files
(``--data``), shapes (``--input-shape``), and options given twice. Split from :mod:`relucap_plugin.cli`
(which keeps the commands) to keep each module small; the functions are the CLI's, not an API.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

__all__ = ["load_eval_data", "load_model", "repeated_options", "shape_arg"]


def load_model(spec: str):
    """Build the model named by ``spec`` (weights not loaded).

    ``mlp:256,32,256`` (optionally ``mlp:256,32,256:capped_relu(cap=0.1)``) is
    :func:`relucap_plugin.models.mlp`; ``package.module:factory`` imports exactly that module and
    calls ``factory()``, which must be an ``nn.Module`` class or a function marked with
    :func:`relucap_plugin.models.register_model` (nothing else is called); any other name is a
    torchvision model built with ``weights=None``.
    """
    import importlib
    import inspect

    from torch import nn

    if spec.startswith("mlp:"):
        from .models import mlp

        _, widths, *activation = spec.split(":", 2)
        try:
            sizes = tuple(int(w) for w in widths.split(","))
        except ValueError:
            raise ValueError(f"model {spec!r}: widths must be integers like mlp:256,32,256") from None
        return mlp(sizes, activation[0]) if activation else mlp(sizes)
    if ":" in spec:
        module_name, _, factory_name = spec.partition(":")
        if not module_name or not factory_name.isidentifier():
            raise ValueError(f"model {spec!r}: write package.module:factory, e.g. mypkg.nets:small_cnn")
        factory = getattr(importlib.import_module(module_name), factory_name, None)
        if not callable(factory):
            raise ValueError(f"model {spec!r}: {module_name} has no callable {factory_name!r}")
        from .models import is_model_factory

        if not is_model_factory(factory):
            raise ValueError(f"model {spec!r}: {module_name}.{factory_name} is neither an nn.Module "
                             "class nor a model factory, so it is not called; mark your factory "
                             "with @relucap_plugin.models.register_model, or name the model class")
        model = factory()
    else:
        try:
            import torchvision
        except ImportError:
            raise ImportError(f"model {spec!r} is read as a torchvision model name, but torchvision is "
                              "not installed (pip install torchvision); or use mlp:... or "
                              "package.module:factory") from None
        try:
            builder = torchvision.models.get_model_builder(spec)
            accepted = inspect.signature(builder).parameters
            extra = {"weights_backbone": None} if "weights_backbone" in accepted else {}  # no download
            model = builder(weights=None, **extra)
        except ValueError:
            raise ValueError(f"unknown model {spec!r}: not a torchvision model name; use mlp:256,32,256, "
                             "package.module:factory or one of torchvision.models.list_models()") from None
    if not isinstance(model, nn.Module):
        raise TypeError(f"model {spec!r} built a {type(model).__name__}, not a torch.nn.Module")
    return model


def load_eval_data(spec: str):
    """``mnist5k`` (its 1000-sample test split), a folder of MNIST IDX files or CIFAR-10 python
    batches (test split), a ``.npz`` with arrays ``x``, ``y``, or a ``.pt`` holding ``(x, y)``."""
    import numpy as np
    import torch

    from . import data

    if spec == "mnist5k":
        return data.load_mnist5k()[1]
    if os.path.isdir(spec):
        try:
            return data.load_mnist(spec)[1]
        except FileNotFoundError:
            return data.load_cifar10(spec)[1]
    if not os.path.isfile(spec):
        raise FileNotFoundError(f"--data {spec!r}: no such file or folder; use mnist5k, a folder of "
                                "MNIST/CIFAR-10 files, a .npz with x and y, or a .pt holding (x, y)")
    if spec.endswith(".npz"):
        with np.load(spec, allow_pickle=False) as f:
            if "x" not in f or "y" not in f:
                raise ValueError(f"--data {spec!r} must hold arrays named 'x' and 'y' (has {list(f)})")
            return data.as_dataset((f["x"], f["y"]))
    try:
        loaded = torch.load(spec, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"--data {spec!r} is not a weights-only torch file of tensors (refused: "
                         f"{type(exc).__name__}); save (x, y) with torch.save or use a .npz") from None
    if isinstance(loaded, dict) and {"x", "y"} <= set(loaded):
        loaded = (loaded["x"], loaded["y"])
    if not isinstance(loaded, (tuple, list)) or len(loaded) != 2:
        raise ValueError(f"--data {spec!r} must hold an (x, y) pair or a dict with 'x' and 'y'")
    return data.as_dataset(tuple(loaded))


def shape_arg(text: str | None, example: str) -> tuple[int, ...] | None:
    """``--input-shape 1,28,28`` as a tuple of positive ints (``None`` if not given)."""
    if not text:
        return None
    try:
        shape = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--input-shape {text!r}: write sizes like {example}") from None
    if not shape or min(shape) < 1:
        raise ValueError(f"--input-shape {text!r}: sizes must be positive, e.g. {example}")
    return shape


def repeated_options(parser: argparse.ArgumentParser, argv: Sequence[str]) -> list[str]:
    """Options of the chosen subcommand given more than once (a second ``--eps`` would silently
    replace the first); repeatable options (``--attack``) are fine."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    tokens = list(argv)
    if sub is not None:
        start = next((i for i, t in enumerate(tokens) if t in sub.choices), None)
        if start is None:
            return []
        parser, tokens = sub.choices[tokens[start]], tokens[start + 1:]
    strings = {s: a for a in parser._actions for s in a.option_strings}
    seen: dict[int, list[str]] = {}
    for token in tokens:
        if token == "--":
            break
        name = token.split("=", 1)[0]
        if not name.startswith("-"):
            continue
        matches = [s for s in strings if s == name] or [s for s in strings if s.startswith(name)]
        actions = {id(strings[s]) for s in matches}
        if len(actions) == 1:
            action = strings[matches[0]]
            if not isinstance(action, (argparse._AppendAction, argparse._CountAction)):
                seen.setdefault(id(action), []).append(name)
    return [" and ".join(names) for names in seen.values() if len(names) > 1]
