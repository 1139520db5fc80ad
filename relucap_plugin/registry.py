"""Name -> factory registry of activations, with string specs that round-trip.

``create_activation("capped_relu", cap=0.1)`` and ``create_activation("capped_relu(cap=0.1)")``
build the same module; every built-in module's ``spec`` property gives such a string back.
Specs are parsed with :mod:`ast` and only literal values are accepted: nothing is evaluated.
Other packages add activations with :func:`register_activation` or through the entry-point group
``relucap_plugin.activations`` (each entry point loads a class or a factory).
"""

from __future__ import annotations

import ast
import inspect
import math
import re
import warnings
from collections.abc import Callable
from importlib import metadata
from typing import Any

from torch import nn

from . import activations as _act

__all__ = [
    "ENTRY_POINT_GROUP",
    "create_activation",
    "list_activations",
    "parse_spec",
    "register_activation",
]

ENTRY_POINT_GROUP = "relucap_plugin.activations"

Factory = Callable[..., nn.Module]
_REGISTRY: dict[str, Factory] = {}
_entry_points_loaded = False
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def register_activation(
    name: str, factory: Factory | None = None, *, overwrite: bool = False
) -> Any:
    """Register ``factory`` (a module class or a function returning a module) under ``name``.

    Usable as a decorator: ``@register_activation("my_act")``. Names are identifiers and are
    matched case-insensitively. Registering a taken name raises unless ``overwrite=True``.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ValueError(
            f"activation name must be an identifier like 'my_act' (got {name!r})"
        )
    key = name.lower()

    def decorate(obj: Factory) -> Factory:
        if not callable(obj):
            raise TypeError(f"activation factory for {name!r} must be callable, got {obj!r}")
        if key in _REGISTRY and _REGISTRY[key] is not obj and not overwrite:
            raise ValueError(
                f"activation {name!r} is already registered ({_REGISTRY[key]!r}); "
                "pass overwrite=True to replace it"
            )
        _REGISTRY[key] = obj
        return obj

    return decorate if factory is None else decorate(factory)


def _load_entry_points() -> None:
    global _entry_points_loaded
    if _entry_points_loaded:
        return
    _entry_points_loaded = True
    for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
        if ep.name.lower() in _REGISTRY:
            continue
        try:
            register_activation(ep.name, ep.load())
        except Exception as exc:  # a broken plugin must not break the package
            warnings.warn(
                f"could not load activation {ep.name!r} from entry point {ep.value!r}: {exc}",
                RuntimeWarning,
                stacklevel=3,
            )


def list_activations() -> list[str]:
    """Names of all registered activations, built-in and from plugins, sorted."""
    _load_entry_points()
    return sorted(_REGISTRY)


_CONSTANTS = {"inf": math.inf, "nan": math.nan, "true": True, "false": False, "none": None}


def _literal(node: ast.expr, spec: str) -> Any:
    if isinstance(node, ast.Name) and node.id.lower() in _CONSTANTS:
        return _CONSTANTS[node.id.lower()]
    if (
        isinstance(node, ast.UnaryOp)
        and isinstance(node.op, ast.USub)
        and isinstance(node.operand, ast.Name)
        and node.operand.id.lower() == "inf"
    ):
        return -math.inf
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(elt, spec) for elt in node.elts]
    try:
        return ast.literal_eval(node)
    except ValueError:
        raise ValueError(
            f"activation spec {spec!r}: {ast.unparse(node)!r} is not a literal; values must be "
            "numbers, strings, True/False/None, inf, or lists of those"
        ) from None


def parse_spec(spec: str) -> tuple[str, list[Any], dict[str, Any]]:
    """Split ``"name(arg, key=value)"`` into ``(name, args, kwargs)`` without evaluating code."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"activation spec must be a non-empty string like 'capped_relu(cap=0.1)' (got {spec!r})")
    try:
        tree = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError:
        raise ValueError(
            f"cannot parse activation spec {spec!r}; write it as 'name' or 'name(key=value, ...)'"
        ) from None
    if isinstance(tree, ast.Name):
        return tree.id, [], {}
    if isinstance(tree, ast.Call) and isinstance(tree.func, ast.Name):
        args = [_literal(a, spec) for a in tree.args]
        kwargs = {}
        for kw in tree.keywords:
            if kw.arg is None:
                raise ValueError(f"activation spec {spec!r}: '**' is not allowed")
            kwargs[kw.arg] = _literal(kw.value, spec)
        return tree.func.id, args, kwargs
    raise ValueError(
        f"cannot parse activation spec {spec!r}; write it as 'name' or 'name(key=value, ...)'"
    )


def _lookup(name: str) -> Factory:
    key = name.lower()
    if key not in _REGISTRY:
        _load_entry_points()
    if key not in _REGISTRY:
        raise ValueError(
            f"unknown activation {name!r}; registered: {', '.join(list_activations())}"
        )
    return _REGISTRY[key]


def create_activation(spec: str | Factory | nn.Module, *args: Any, **kwargs: Any) -> nn.Module:
    """Build an activation module from a registered name, a spec string, or a factory.

    ``create_activation("capped_relu", cap=0.1)``, ``create_activation("capped_relu(cap=0.1)")``
    and ``create_activation(CappedReLU, cap=0.1)`` are equivalent; keyword arguments given here
    override those in the string. Passing a module instance returns it unchanged.
    """
    if isinstance(spec, nn.Module):
        if args or kwargs:
            raise TypeError(f"create_activation: spec is the module {type(spec).__name__} and arguments were given too "
                            f"(args={args!r}, kwargs={kwargs!r}); pass either a module instance or a spec "
                            "with arguments, not both")
        return spec
    if isinstance(spec, str):
        name, spec_args, spec_kwargs = parse_spec(spec)
        factory = _lookup(name)
        args = (*spec_args, *args)
        kwargs = {**spec_kwargs, **kwargs}
    elif callable(spec):
        factory, name = spec, getattr(spec, "__name__", repr(spec))
    else:
        raise TypeError(
            f"activation spec must be a name, a 'name(key=value)' string, a module class or a "
            f"module, got {type(spec).__name__} {spec!r:.80}; registered names: {', '.join(list_activations())}"
        )
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            accepted = [p for p in signature.parameters if p not in ("self", "args", "kwargs")]
            raise TypeError(
                f"bad arguments for activation {name!r}: {exc}; it accepts: {', '.join(accepted) or 'no arguments'}"
            ) from None
    module = factory(*args, **kwargs)
    if not isinstance(module, nn.Module):
        raise TypeError(f"activation factory {name!r} returned {type(module).__name__}, not an nn.Module")
    return module


def _relu(inplace: bool = False) -> nn.Module:
    return nn.ReLU(inplace=inplace)


for _name, _factory in {
    "relu": _relu,
    "capped_relu": _act.CappedReLU,
    "learnable_capped_relu": _act.LearnableCappedReLU,
    "dynamic_capped_relu": _act.DynamicCappedReLU,
    "prelu": _act.PReLU,
    "psoftplus": _act.PSoftplus,
    "psilu": _act.PSiLU,
    "pssilu": _act.PSSiLU,
    "spatial_attention_relu": _act.SpatialAttentionReLU,
}.items():
    register_activation(_name, _factory)
