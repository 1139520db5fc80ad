"""Model surgery: find every ReLU application in a model and swap chosen ones for capped ones.

A *site* is one application of ReLU in one forward pass: an ``nn.ReLU``/``nn.ReLU6`` module
call (exact types: ``nn.ReLU6`` subclasses ``nn.Hardtanh``, which is not a ReLU), an
``F.relu``/``torch.relu``/``torch.relu_``/``F.relu6`` call, or an ``x.relu()``/``x.relu_()``
call. A ResNet block that calls one ``self.relu`` twice has two sites.

Sites are found by tracing the model with ``torch.fx`` (``mode="auto"``), or, for models fx
cannot trace, by listing the ReLU modules (``mode="modules"``). Conversion replaces module
instances when every call of an instance gets the same activation; otherwise it rewrites the
forward of the module that applies the ReLU (its *owner*) with fx, so each call site gets its
own activation. See ``docs/surgery.md`` for the rules and the limits.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import inspect
import itertools
import linecache
import math
import numbers
import os
import types
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from .activations import CappedReLU, validate_cap
from .registry import create_activation

__all__ = [
    "CapReport",
    "ReluSite",
    "UntraceableModelError",
    "calibrate_caps",
    "cap_relus",
    "find_relus",
    "print_sites",
    "is_converted",
    "uncap",
]

_RELU_MODULES: dict[type, str] = {nn.ReLU: "nn.ReLU", nn.ReLU6: "nn.ReLU6"}
# callable -> (label, name token, always in place); F.relu_ is torch.relu_.
_RELU_FUNCTIONS: dict[Any, tuple[str, str, bool]] = {
    F.relu: ("F.relu", "relu", False),
    torch.relu: ("torch.relu", "relu", False),
    torch.relu_: ("torch.relu_", "relu", True),
    F.relu6: ("F.relu6", "relu6", False),
}
_RELU_METHODS: dict[str, tuple[str, str, bool]] = {
    "relu": ("Tensor.relu", "relu", False),
    "relu_": ("Tensor.relu_", "relu", True),
}
_RELU6_OPS = frozenset({"nn.ReLU6", "F.relu6"})
# Activations of this package are never ReLU sites: fx treats them as leaves, not traced into.
_OWN_MODULES = frozenset({CappedReLU.__module__, __name__})
_MARK = "_relucap_site"
_MODES = ("auto", "modules")
_RECORDS = "_relucap_records"
_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_LIST_LIMIT = 60


class UntraceableModelError(ValueError):
    """``torch.fx`` cannot trace the model; the message names the part and what still works."""


@dataclass(frozen=True)
class ReluSite:
    """One application of ReLU in a forward pass, as found by :func:`find_relus`.

    ``name`` is stable across runs and copies: the module path for module sites, ``owner:relu``
    (or ``owner:relu6``) for function and method sites; a ``#k`` suffix numbers the calls when
    one module (or one owner's ``F.relu``) is applied more than once. ``owner`` is the module
    whose forward applies the ReLU (``""`` = the model itself). ``shape`` and ``width``
    (features of an (N, F) activation, channels of an (N, C, *) one) are known only when
    :func:`find_relus` got an ``example_input``.
    """

    name: str
    index: int
    kind: str
    op: str
    module_path: str
    owner: str
    shared: bool
    inplace: bool
    shape: tuple[int, ...] | None = None
    width: int | None = None

    @property
    def upper(self) -> float:
        """The built-in bound of the site: 6 for ReLU6, ``inf`` for ReLU."""
        return 6.0 if self.op in _RELU6_OPS else math.inf

    @property
    def base_name(self) -> str:
        """``name`` without the ``#k`` call number."""
        return self.name.split("#", 1)[0]


@dataclass
class _Record:
    """Everything one conversion changed, in the order it changed it; ``undo`` reverts it."""

    replaced: list[tuple[nn.Module, str, nn.Module]] = field(default_factory=list)
    added: list[tuple[nn.Module, str]] = field(default_factory=list)
    forwards: list[tuple[nn.Module, Any]] = field(default_factory=list)
    constants: list[tuple[nn.Module, str]] = field(default_factory=list)

    def undo(self) -> None:
        for module, previous in reversed(self.forwards):
            if previous is None:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous
        for parent, name in reversed(self.added):
            parent._modules.pop(name, None)
        for module, name in self.constants:
            module.__dict__.pop(name, None)
        for parent, name, old in reversed(self.replaced):
            parent._modules[name] = old


@dataclass
class CapReport:
    """What :func:`cap_relus` did to ``model``.

    ``replaced`` maps each converted site to the spec of its new activation and ``paths`` to
    the module path of that activation in ``model``; ``method`` is ``"modules"`` (instances
    swapped) or ``"fx"`` (the forward of the modules in ``rewritten`` regenerated by fx; ``""``
    is the model itself). ``sites`` lists every site found, converted or not.
    """

    model: nn.Module
    replaced: dict[str, str]
    paths: dict[str, str]
    method: str
    rewritten: tuple[str, ...]
    sites: tuple[ReluSite, ...]
    warnings: tuple[str, ...]
    _record: _Record = field(repr=False)

    @property
    def count(self) -> int:
        """Number of sites converted."""
        return len(self.replaced)

    def undo(self) -> nn.Module:
        """Restore ``model`` to its state before this conversion (bit-identical outputs)."""
        records = self.model.__dict__.get(_RECORDS) or []
        if not records or records[-1] is not self._record:
            raise ValueError(
                "this conversion is not the latest one on the model (it was undone already, or "
                "cap_relus ran on the model again since); undo the later reports first, or call "
                "uncap(model) to remove every conversion"
            )
        records.pop().undo()
        if not records:
            self.model.__dict__.pop(_RECORDS, None)
        return self.model

    def print(self, file=None) -> None:
        """Print the converted sites and their new activations as a table."""
        from ._console import print_table

        rows = [(n, spec, self.paths[n]) for n, spec in self.replaced.items()]
        print_table(
            ["site", "new activation", "module path"], rows,
            title=f"{self.count} of {len(self.sites)} ReLU sites converted ({self.method})",
            file=file,
        )

    def __str__(self) -> str:
        where = f", forward rewritten in {list(self.rewritten)}" if self.rewritten else ""
        return (f"CapReport({self.count} of {len(self.sites)} sites converted by "
                f"{self.method}{where})")


# --------------------------------------------------------------------------- checks


def _check_model(model: object, fn: str) -> nn.Module:
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        raise TypeError(
            f"{fn}: got a {type(model).__name__} wrapper; pass the wrapped model instead: "
            f"{fn}(model.module, ...), and wrap the converted model again afterwards"
        )
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(
            f"{fn}: got a TorchScript module ({type(model).__name__}); its code cannot be "
            "rewritten. Convert the eager nn.Module first, then script the converted model"
        )
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    inner = model.__dict__.get("_orig_mod")
    if isinstance(inner, nn.Module) and type(model).__module__.startswith("torch._dynamo"):
        raise TypeError(
            f"{fn}: got a torch.compile wrapper; pass model._orig_mod and compile the "
            "converted model afterwards"
        )
    return model


def _check_mode(mode: object) -> str:
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES} (got {mode!r})")
    return mode  # type: ignore[return-value]


def _name_list(sites: Sequence[ReluSite]) -> str:
    names = [s.name for s in sites]
    text = ", ".join(names[:_LIST_LIMIT])
    if len(names) > _LIST_LIMIT:
        text += f", ... ({len(names) - _LIST_LIMIT} more; print_sites(find_relus(model)) lists all)"
    return text


# --------------------------------------------------------------------------- tracing


@dataclass
class _Call:
    """One call of a non-leaf module during tracing: its arguments, the nodes it created
    (``first``..``last``, None if none) and what it returned."""

    args: tuple
    simple: bool
    first: fx.Node | None
    last: fx.Node | None
    ret: Any

    def nodes(self) -> list[fx.Node]:
        out: list[fx.Node] = []
        node = self.first
        while node is not None:
            out.append(node)
            if node is self.last:
                break
            node = node.next
        return out


class _SiteTracer(fx.Tracer):
    """fx tracer that records every call of a non-leaf module (see :class:`_Call`).

    With ``scope`` set, only ``scope.forward`` is traced and every other module is a leaf.
    """

    def __init__(self, scope: nn.Module | None = None):
        super().__init__()
        self.only = scope
        self.calls: dict[str, list[_Call]] = {}
        self.inlined: dict[type, None] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.only is not None:
            return m is not self.only
        return (_is_installed(m) or type(m).__module__ in _OWN_MODULES
                or super().is_leaf_module(m, module_qualified_name))

    def create_arg(self, a: Any) -> Any:
        # fx's own create_arg checks every argument against torch's opaque-type registry before
        # it returns a Proxy's node, as here: most arguments are Proxies, and that check was a
        # fifth of the time of find_relus on resnet50 (torch 2.14)
        if isinstance(a, fx.Proxy):
            return a.node
        return super().create_arg(a)

    def _last(self) -> fx.Node | None:
        return next(iter(reversed(self.graph.nodes)), None)

    def call_module(self, m, forward, args, kwargs):
        if self.is_leaf_module(m, ""):
            return super().call_module(m, forward, args, kwargs)
        before = self._last()
        ret = super().call_module(m, forward, args, kwargs)
        last = self._last()
        first = None
        if last is not before:
            first = before.next if before is not None else next(iter(self.graph.nodes))
        simple = not kwargs and all(isinstance(a, fx.Proxy) for a in args)
        self.calls.setdefault(self.path_of_module(m), []).append(
            _Call(tuple(args), simple, first, last if first is not None else None, ret))
        self.inlined[type(m)] = None
        return ret


def _region_key(call: _Call, scope: str) -> str | None:
    """A string equal for two calls iff they recorded the same operations on their inputs
    (targets relative to ``scope``); None if the call used values from outside it."""
    nodes = call.nodes()
    index = {n: i for i, n in enumerate(nodes)}
    inputs = {a.node: j for j, a in enumerate(call.args) if isinstance(a, fx.Proxy)}
    outside = []

    def token(n: fx.Node) -> str:
        if n in index:
            return f"%{index[n]}"
        if n in inputs:
            return f"$in{inputs[n]}"
        outside.append(n)
        return "?"

    def value(v: Any) -> Any:
        if isinstance(v, fx.Proxy):
            return token(v.node)
        if isinstance(v, (tuple, list)):
            return (type(v).__name__, [value(x) for x in v])
        if isinstance(v, dict):
            return {k: value(x) for k, x in v.items()}
        return v

    parts = []
    for n in nodes:
        target: Any = n.target
        if n.op in ("call_module", "get_attr"):
            target = _relative(target, scope)
            if target is None:
                return None
        elif n.op == "call_function":
            target = id(target)
        parts.append(f"{n.op}|{target}|{fx.node.map_arg(n.args, token)!r}|"
                     f"{fx.node.map_arg(n.kwargs, token)!r}")
    parts.append(f"return {value(call.ret)!r}")
    return None if outside else "\n".join(parts)


def _user_frame(exc: BaseException) -> str:
    """``file:line in function`` of the innermost traceback frame outside torch, or ''."""
    tb = exc.__traceback__
    found = ""
    while tb is not None:
        code = tb.tb_frame.f_code
        inside = os.path.abspath(code.co_filename).startswith(_TORCH_DIR)
        if not inside and code.co_filename != __file__:
            found = f"{code.co_filename}:{tb.tb_lineno} in {code.co_name}"
        tb = tb.tb_next
    return found


def _trace(module: nn.Module, tracer: _SiteTracer) -> tuple[fx.Graph, dict[str, Any]]:
    """Trace ``module`` (honouring a forward installed on the instance) without changing it.

    Returns the graph and the constants the tracer had to attach to ``module`` (removed again;
    a forward generated from the graph needs them put back).
    """
    own = module.__dict__.get("forward")
    cls = type(module)
    if own is not None:
        if isinstance(own, _GeneratedForward) and own.module is module:
            function = own.fn
        elif isinstance(own, types.MethodType) and own.__self__ is module:
            function = own.__func__
        else:
            raise TypeError(
                f"{cls.__name__} has a forward set on the instance that is not a method of it; "
                "fx cannot trace it. Remove it or use mode='modules'"
            )
        module.__class__ = type(cls.__name__, (cls,), {"forward": function})
    before = set(module.__dict__)
    try:
        graph = tracer.trace(module)
    except Exception as exc:
        stack = list(tracer.module_stack.values())
        where = (f"in module '{stack[-1][0]}' ({stack[-1][1].__name__})" if stack
                 else f"in {cls.__name__}.forward")
        line = _user_frame(exc)
        raise UntraceableModelError(
            f"torch.fx cannot trace {cls.__name__}: {where}"
            f"{' at ' + line if line else ''}: {type(exc).__name__}: {exc}. "
            "Functional ReLUs (F.relu, torch.relu, x.relu()) are found by tracing only. What "
            "still works: mode='modules' finds and replaces the nn.ReLU/nn.ReLU6 modules (each "
            "instance is one site and all its calls get the same activation); or make that "
            "part traceable (e.g. move the data-dependent branch into a function wrapped with "
            "torch.fx.wrap)."
        ) from exc
    finally:
        if own is not None:
            module.__class__ = cls
        constants = {k: module.__dict__.pop(k) for k in set(module.__dict__) - before}
    return graph, constants


def _site_op(node: fx.Node, modules: Mapping[str, nn.Module]) -> tuple[str, str, str, bool] | None:
    """``(kind, label, token, inplace)`` if ``node`` applies a ReLU, else None."""
    if node.op == "call_module":
        m = modules.get(node.target)
        label = _RELU_MODULES.get(type(m)) if m is not None else None
        if label is None:
            return None
        return "module", label, label[3:].lower(), bool(m.inplace)
    if node.op == "call_function":
        try:
            found = _RELU_FUNCTIONS.get(node.target)
        except TypeError:  # unhashable target
            return None
        if found is None:
            return None
        label, token, always = found
        positional = node.args[1] if len(node.args) > 1 else False
        inplace = always or bool(node.kwargs.get("inplace", positional))
        return "function", label, token, inplace
    if node.op == "call_method" and node.target in _RELU_METHODS:
        label, token, inplace = _RELU_METHODS[node.target]
        return "method", label, token, inplace
    return None


def _site_input(node: fx.Node) -> Any:
    if node.args:
        return node.args[0]
    for key in ("input", "self"):
        if key in node.kwargs:
            return node.kwargs[key]
    raise ValueError(f"cannot find the input of ReLU node {node.format_node()}")


@dataclass
class _Discovery:
    """Sites of one model plus what conversion needs: graph nodes, instances, call records."""

    sites: list[ReluSite]
    instances: list[nn.Module | None]
    nodes: list[fx.Node | None]
    owner_call: list[int]
    graph: fx.Graph | None = None
    constants: dict[str, Any] = field(default_factory=dict)
    calls: dict[str, list[_Call]] = field(default_factory=dict)
    inlined: tuple[type, ...] = ()
    named: dict[str, nn.Module] = field(default_factory=dict)


def _width(shape: tuple[int, ...] | None) -> int | None:
    if shape is None:
        return None
    if len(shape) >= 2:
        return int(shape[1])
    return int(shape[0]) if shape else 1


def _discover_fx(model: nn.Module) -> _Discovery:
    tracer = _SiteTracer()
    graph, constants = _trace(model, tracer)
    modules = dict(model.named_modules())
    raw = []
    for node in graph.nodes:
        op = _site_op(node, modules)
        if op is None:
            continue
        kind, label, token, inplace = op
        entries = list((node.meta.get("nn_module_stack") or {}).items())
        if kind == "module":
            entries = entries[:-1]
        owner, call = "", 0
        if entries:
            key, (owner, _) = entries[-1]
            call = int(key.rsplit("@", 1)[1]) if key != owner and "@" in key else 0
        base = node.target if kind == "module" else f"{owner}:{token}"
        raw.append((node, kind, label, base, owner, call, inplace))
    totals: dict[str, int] = {}
    for item in raw:
        totals[item[3]] = totals.get(item[3], 0) + 1
    seen: dict[str, int] = {}
    sites, instances, nodes, owner_call = [], [], [], []
    for index, (node, kind, label, base, owner, call, inplace) in enumerate(raw):
        k = seen.get(base, 0)
        seen[base] = k + 1
        name = f"{base}#{k}" if totals[base] > 1 else base
        sites.append(ReluSite(
            name=name, index=index, kind=kind, op=label,
            module_path=base if kind == "module" else owner, owner=owner,
            shared=kind == "module" and totals[base] > 1, inplace=inplace,
        ))
        instances.append(modules[node.target] if kind == "module" else None)
        nodes.append(node)
        owner_call.append(call)
    return _Discovery(sites, instances, nodes, owner_call, graph, constants, tracer.calls,
                      tuple(tracer.inlined), modules)


def _discover_modules(model: nn.Module) -> _Discovery:
    paths: dict[nn.Module, list[str]] = {}
    for path, m in model.named_modules(remove_duplicate=False):
        if type(m) in _RELU_MODULES:
            paths.setdefault(m, []).append(path)
    sites = []
    for index, (m, names) in enumerate(paths.items()):
        sites.append(ReluSite(
            name=names[0], index=index, kind="module", op=_RELU_MODULES[type(m)],
            module_path=names[0], owner=names[0].rpartition(".")[0],
            shared=len(set(names)) > 1, inplace=bool(m.inplace),
        ))
    return _Discovery(sites, list(paths), [None] * len(sites), [0] * len(sites),
                      named=dict(model.named_modules()))


class _Eval:
    """Context: every module in eval mode under ``no_grad``; the modes are restored on exit."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.modes = [(m, m.training) for m in model.modules()]

    def __enter__(self):
        self.model.eval()
        self._grad = torch.no_grad()
        self._grad.__enter__()

    def __exit__(self, *exc):
        self._grad.__exit__(*exc)
        for m, mode in self.modes:
            m.training = mode


def _as_args(example_input: Any) -> tuple:
    """Forward arguments from ``example_input``; tensors cloned (a model may work in place)."""
    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    return tuple(a.clone() if isinstance(a, Tensor) else a for a in args)


class _ShapeInterpreter(fx.Interpreter):
    """Runs a discovery graph on the real model and keeps the output shape of the site nodes."""

    def __init__(self, module, graph, constants, wanted):
        super().__init__(module, garbage_collect_values=True, graph=graph)
        self.constants = constants
        self.wanted = wanted
        self.shapes: dict[fx.Node, tuple[int, ...]] = {}

    def fetch_attr(self, target: str):
        if target in self.constants:
            return self.constants[target]
        return super().fetch_attr(target)

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.wanted and isinstance(out, Tensor):
            self.shapes[n] = tuple(out.shape)
        return out


def _add_shapes(model: nn.Module, disc: _Discovery, example_input: Any) -> None:
    """Fill ``shape``/``width`` of the sites from one eval-mode, no-grad forward pass."""
    args = _as_args(example_input)
    shapes: dict[int, tuple[int, ...]] = {}
    with _Eval(model):
        if disc.graph is not None:
            run = _ShapeInterpreter(model, disc.graph, disc.constants, set(disc.nodes))
            run.run(*args)
            for i, node in enumerate(disc.nodes):
                if node in run.shapes:
                    shapes[i] = run.shapes[node]
        else:
            first: dict[int, tuple[int, tuple[int, ...]]] = {}
            counts: dict[int, int] = {}
            order = itertools.count()

            def hook(i):
                def record(module, inputs, output):
                    counts[i] = counts.get(i, 0) + 1
                    if i not in first and isinstance(output, Tensor):
                        first[i] = (next(order), tuple(output.shape))
                return record

            handles = [m.register_forward_hook(hook(i)) for i, m in enumerate(disc.instances)]
            try:
                model(*args)
            finally:
                for h in handles:
                    h.remove()
            # Modules mode: sites in the order of their first call; uncalled instances dropped.
            called = sorted(first, key=lambda i: first[i][0])
            disc.sites = [_replace(disc.sites[i], shared=disc.sites[i].shared or counts[i] > 1)
                          for i in called]
            disc.instances = [disc.instances[i] for i in called]
            disc.nodes = [None] * len(called)
            disc.owner_call = [0] * len(called)
            shapes = {j: first[i][1] for j, i in enumerate(called)}
    disc.sites = [
        _replace(site, index=j, shape=shapes.get(j), width=_width(shapes.get(j)))
        for j, site in enumerate(disc.sites)
    ]


def _replace(site: ReluSite, **changes: Any) -> ReluSite:
    return ReluSite(**{**site.__dict__, **changes})


def _activation_summary(model: nn.Module) -> str:
    names = sorted({type(m).__name__ for m in model.modules()
                    if type(m).__module__.startswith("torch.nn.modules.activation")})
    return f" (its activation modules: {', '.join(names)})" if names else ""


def _discover(model: nn.Module, example_input: Any, mode: str, fn: str) -> _Discovery:
    disc = _discover_fx(model) if mode == "auto" else _discover_modules(model)
    if example_input is not None:
        _add_shapes(model, disc, example_input)
    if not disc.sites:
        raise ValueError(
            f"{fn}: {type(model).__name__} applies no ReLU in its forward pass"
            f"{' (mode=modules finds nn.ReLU/nn.ReLU6 modules only)' if mode == 'modules' else ''}"
            f"{_activation_summary(model)}; there is nothing to cap. "
            + ("Its ReLUs were converted by cap_relus already; call uncap(model) to start over"
               if model.__dict__.get(_RECORDS) else
               "Pass a model that uses nn.ReLU, nn.ReLU6, F.relu, torch.relu, F.relu6 or x.relu()")
        )
    return disc


def find_relus(
    model: nn.Module, example_input: Any = None, *, mode: str = "auto"
) -> list[ReluSite]:
    """Every ReLU application of ``model``'s forward pass, in execution order.

    ``example_input`` (a tensor, or a tuple of forward arguments) adds each site's activation
    shape and width; it costs one eval-mode forward pass under ``no_grad`` (modes are
    restored). ``mode="modules"`` skips fx and lists each ``nn.ReLU``/``nn.ReLU6`` instance once
    (registration order, or first-call order with ``example_input``). ``model`` is not changed.
    """
    _check_model(model, "find_relus")
    disc = _discover(model, example_input, _check_mode(mode), "find_relus")
    return _Sites(model, disc, mode)


_PLAIN = frozenset({bool, int, float, str, type(None)})


def _fingerprint(model: nn.Module) -> tuple:
    """Changes when anything a trace depends on is likely to change: the module objects, their
    modes, forwards set on instances and plain (bool/int/float/str/None) attributes."""
    parts: list[Any] = []
    for m in model.modules():
        state = m.__dict__
        parts.append((id(m), id(state.get("forward"))))
        parts.extend((k, v) for k, v in state.items() if k[0] != "_" and type(v) in _PLAIN)
    return tuple(parts)


class _Sites(list):
    """The list :func:`find_relus` returns. It remembers how the sites were found, so
    ``cap_relus(model, cap, sites=find_relus(model))`` converts without tracing again, as
    long as the model, the list and the mode are unchanged."""

    __slots__ = ("_found",)

    def __init__(self, model: nn.Module, disc: _Discovery, mode: str):
        super().__init__(disc.sites)
        self._found = (weakref.ref(model), _fingerprint(model), disc, mode)

    def __reduce__(self):
        return list, (list(self),)

    def discovery(self, model: nn.Module, mode: str, need_shapes: bool) -> _Discovery | None:
        ref, fingerprint, disc, found_mode = self._found
        if (ref() is not model or found_mode != mode or list(self) != disc.sites
                or (need_shapes and any(s.shape is None for s in disc.sites))
                or fingerprint != _fingerprint(model)):
            return None
        return disc


def _moved(disc: _Discovery, memo: dict[int, Any]) -> _Discovery:
    """``disc`` of a model, for its deep copy made with ``memo``."""
    return dataclasses.replace(
        disc,
        instances=[None if m is None else memo[id(m)] for m in disc.instances],
        named={path: memo[id(m)] for path, m in disc.named.items()},
    )


def print_sites(sites: Sequence[ReluSite], title: str | None = None, file=None) -> None:
    """Print sites from :func:`find_relus` as a table (rich if installed).

    Kind, owner and in-place flag are left out to keep long names readable; the ``op`` column
    tells the kind (``nn.*`` module, ``F.*``/``torch.*`` function, ``Tensor.*`` method).
    """
    from ._console import print_table

    rows = [
        (s.index, s.name, s.op, "yes" if s.shared else "",
         "" if s.shape is None else "x".join(map(str, s.shape)),
         "" if s.width is None else s.width)
        for s in sites
    ]
    print_table(["#", "site", "op", "shared", "shape", "width"],
                rows, title=title, file=file)


# --------------------------------------------------------------------------- selection


_GLOB = frozenset("*?[")


def _matches(site: ReluSite, pattern: str) -> bool:
    """``pattern`` is the site's name, its name without ``#k``, or a glob matching either."""
    if site.name == pattern or site.base_name == pattern:
        return True
    return not _GLOB.isdisjoint(pattern) and (
        fnmatch.fnmatchcase(site.name, pattern) or fnmatch.fnmatchcase(site.base_name, pattern))


def _select(sites: Sequence[ReluSite], selector: Any) -> list[ReluSite]:
    """The sites chosen by ``selector`` (see :func:`cap_relus`), in execution order."""
    if selector is None:
        return list(sites)
    if isinstance(selector, str) and selector == "bottleneck":
        if any(s.width is None for s in sites):
            raise ValueError(
                "sites='bottleneck' picks the site(s) with the smallest width, which needs "
                "activation shapes: pass example_input (e.g. a batch of 1 input)"
            )
        smallest = min(s.width for s in sites)  # type: ignore[type-var]
        return [s for s in sites if s.width == smallest]
    if callable(selector) and not isinstance(selector, (str, ReluSite)):
        chosen = [s for s in sites if selector(s)]
        if not chosen:
            raise ValueError(
                f"the sites predicate matched no site; available sites: {_name_list(sites)}")
        return chosen
    if isinstance(selector, (str, numbers.Integral, ReluSite)):
        items: list[Any] = [selector]
    elif isinstance(selector, Iterable) and not isinstance(selector, Mapping):
        items = list(selector)
    else:
        raise TypeError(
            "sites must be None (all), a glob pattern or list of patterns, site indices, site "
            f"records, a predicate on a ReluSite, or 'bottleneck'; got {type(selector).__name__}"
        )
    names: set[str] = set()
    by_name = {s.name for s in sites}
    for item in items:
        if isinstance(item, bool):
            raise TypeError(f"sites: {item!r} is a bool, not a site index or pattern")
        if isinstance(item, numbers.Integral):
            i = int(item)
            if not -len(sites) <= i < len(sites):
                raise ValueError(
                    f"site index {i} is out of range: the model has {len(sites)} sites "
                    f"(0..{len(sites) - 1}, negative counts from the end)"
                )
            names.add(sites[i].name)
        elif isinstance(item, ReluSite):
            if item.name not in by_name:
                raise ValueError(f"site {item.name!r} is not a site of this model; "
                                 f"available sites: {_name_list(sites)}")
            names.add(item.name)
        elif isinstance(item, str):
            found = [s.name for s in sites if _matches(s, item)]
            if not found:
                raise ValueError(f"site pattern {item!r} matches no site; "
                                 f"available sites: {_name_list(sites)}")
            names.update(found)
        else:
            raise TypeError(f"sites: cannot select by {type(item).__name__} {item!r}; "
                            "use names, globs or ints")
    return [s for s in sites if s.name in names]


# --------------------------------------------------------------------------- recipes


@dataclass(frozen=True)
class _Recipe:
    """What to install at a site: a numeric cap (a CappedReLU) or an activation spec."""

    cap: float | Tensor | None = None
    spec: Any = None

    def build(self, site: ReluSite) -> nn.Module:
        if self.spec is not None:
            if isinstance(self.spec, nn.Module):
                return copy.deepcopy(self.spec)
            return create_activation(self.spec)
        cap = self.cap
        if math.isfinite(site.upper):
            cap = cap.clamp(max=site.upper) if isinstance(cap, Tensor) else min(cap, site.upper)
        return CappedReLU(cap, inplace=site.inplace)

    def key(self, site: ReluSite) -> Any:
        """Equal keys mean interchangeable modules (may share one instance); None: never."""
        if self.spec is not None:
            return None
        cap = self.cap
        if isinstance(cap, Tensor):
            return ("cap", tuple(cap.clamp(max=site.upper).tolist()))
        return ("cap", min(cap, site.upper))


def _recipe(value: Any, where: str) -> _Recipe:
    if isinstance(value, (numbers.Number, Tensor)) or (
        isinstance(value, (list, tuple)) and all(isinstance(v, numbers.Number) for v in value)
    ):
        return _Recipe(cap=validate_cap(value, name=where))
    if isinstance(value, (str, nn.Module)) or callable(value):
        recipe = _Recipe(spec=value)
        recipe.build(ReluSite("", 0, "module", "nn.ReLU", "", "", False, False))  # fail early
        return recipe
    raise TypeError(
        f"{where} must be a number (math.inf = plain ReLU), a 1-D tensor/list of per-channel "
        "caps, an activation spec ('pssilu', 'learnable_capped_relu(cap=1)'), an activation "
        f"class or factory, or a mapping {{site name or glob: cap}}; got {type(value).__name__}"
    )


def _plan(sites: Sequence[ReluSite], cap: Any, selector: Any) -> dict[int, _Recipe]:
    """Site index -> recipe for every site to convert; validates everything, changes nothing."""
    if isinstance(cap, Mapping):
        recipes = {}
        for key, value in cap.items():
            name = key.name if isinstance(key, ReluSite) else key
            if not isinstance(name, str):
                raise TypeError("cap mapping keys must be site names or globs, got "
                                f"{type(key).__name__} {key!r}")
            recipes[name] = _recipe(value, f"cap[{name!r}]")
        chosen = {s.index for s in _select(sites, selector)}
        plan: dict[int, _Recipe] = {}
        for key in recipes:
            if not any(_matches(s, key) for s in sites):
                raise ValueError(f"cap mapping key {key!r} matches no site; "
                                 f"available sites: {_name_list(sites)}")
        for s in sites:
            if s.index not in chosen:
                continue
            if s.name in recipes:
                plan[s.index] = recipes[s.name]
                continue
            hits = [k for k in recipes if _matches(s, k)]
            if hits:
                plan[s.index] = recipes[hits[-1]]
        return plan
    recipe = _recipe(cap, "cap")
    return {s.index: recipe for s in _select(sites, selector)}


# --------------------------------------------------------------------------- rewriting


def _free_attr(module: nn.Module, base: str) -> str:
    name, k = base, 0
    while hasattr(module, name) or name in module._modules:
        k += 1
        name = f"{base}_{k}"
    return name


_forward_ids = itertools.count()


def _exec_forward(src: str, namespace: dict[str, Any], owner_name: str) -> Callable:
    """The ``forward`` function defined by ``src``; the source is kept in linecache so
    tracebacks and inspect show the generated lines."""
    name = f"<relucap forward {next(_forward_ids)} of {owner_name}>"
    linecache.cache[name] = (len(src), None, src.splitlines(keepends=True), name)
    namespace = dict(namespace)
    exec(compile(src, name, "exec", dont_inherit=True), namespace)
    return namespace["forward"]


def _portable(namespace: Mapping[str, Any]) -> dict[str, Any]:
    """``namespace`` with modules replaced by their names, so that it pickles."""
    return {k: ("module", v.__name__) if isinstance(v, types.ModuleType) else ("value", v)
            for k, v in namespace.items()}


def _rebuild_forward(module: nn.Module, src: str, portable: dict[str, Any]) -> _GeneratedForward:
    import importlib

    namespace = {k: importlib.import_module(v) if kind == "module" else v
                 for k, (kind, v) in portable.items()}
    fn = _exec_forward(src, namespace, type(module).__name__)
    return _GeneratedForward(module, src, namespace, fn)


class _GeneratedForward:
    """A forward generated by fx from a rewritten graph, set on one module instance.

    It pickles as its source (``torch.save(model)`` round-trips) and deep-copies with its
    module; ``fn`` is the compiled function, called as ``fn(module, *args)``.
    """

    __slots__ = ("module", "src", "namespace", "fn")

    def __init__(self, module: nn.Module, src: str, namespace: dict[str, Any], fn: Callable):
        self.module = module
        self.src = src
        self.namespace = namespace
        self.fn = fn

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(self.module, *args, **kwargs)

    def __reduce__(self):
        return _rebuild_forward, (self.module, self.src, _portable(self.namespace))

    def __deepcopy__(self, memo: dict[int, Any]) -> _GeneratedForward:
        module = copy.deepcopy(self.module, memo)
        return _GeneratedForward(module, self.src, self.namespace, self.fn)

    def __repr__(self) -> str:
        return f"<forward generated by relucap_plugin for {type(self.module).__name__}>"


def _compile_forward(graph: fx.Graph, owner: nn.Module, cache: dict) -> _GeneratedForward:
    """The forward of ``graph`` for ``owner``; equal sources compile once (``cache``)."""
    code = graph.python_code(root_module="self")
    key = (code.src, tuple(sorted((k, id(v)) for k, v in code.globals.items())))
    fn = cache.get(key)
    if fn is None:
        fn = cache[key] = _exec_forward(code.src, code.globals, type(owner).__name__)
    return _GeneratedForward(owner, code.src, code.globals, fn)


def _copy_graph(graph: fx.Graph) -> tuple[fx.Graph, dict[fx.Node, fx.Node]]:
    """A copy of ``graph`` (code generator included) and its old -> new node map."""
    new = copy.deepcopy(graph)
    return new, dict(zip(graph.nodes, new.nodes))


def _is_installed(module: nn.Module) -> bool:
    """True for activations cap_relus installed (marked, so a later conversion skips them)."""
    return _MARK in module.__dict__


def _works_inplace(module: nn.Module) -> bool:
    """True if ``module`` changes its input in place like an in-place ReLU does."""
    return bool(getattr(module, "inplace", False)) and not getattr(module, "per_channel", False)


def _used_after(node: fx.Node, value: Any, order: Mapping[fx.Node, int]) -> bool:
    return isinstance(value, fx.Node) and any(
        order.get(user, -1) > order[node] for user in value.users if user is not node
    )


def _rewrite(graph: fx.Graph, targets: Sequence[tuple[fx.Node, str, nn.Module, bool]]) -> None:
    """Make each ``(node, path, module, inplace_site)`` call ``path`` instead of its ReLU.

    An in-place site whose new module works out of place has later uses of its input read the
    new output instead (views taken of that input before the site are not redirected).
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    for node, path, module, inplace_site in targets:
        value = _site_input(node)
        with graph.inserting_after(node):
            new = graph.create_node("call_module", path, (value,), {})
        node.replace_all_uses_with(new)
        if inplace_site and not _works_inplace(module) and isinstance(value, fx.Node):
            for user in list(value.users):
                if user is not new and order.get(user, -1) > order[node]:
                    user.replace_input_with(value, new)
        graph.erase_node(node)


def _relative(path: str, scope: str) -> str | None:
    if not scope:
        return path
    return path[len(scope) + 1:] if path.startswith(scope + ".") else None


def _class_reads_training(cls: type) -> bool:
    for klass in cls.__mro__:
        if klass in (nn.Module, object):
            break
        for value in vars(klass).values():
            code = getattr(value, "__code__", None)
            if code is not None and "training" in code.co_names:
                return True
    return False


class _Converter:
    """Applies a plan (site index -> recipe) to ``model``, recording every change.

    Modules are built only for what gets installed (one per shared instance when its calls
    can share), on the model's device and dtype, in the mode of the module they stand in for.
    """

    def __init__(self, model: nn.Module, disc: _Discovery, plan: Mapping[int, Any]):
        self.model = model
        self.disc = disc
        self.plan = plan
        self.keys = {i: recipe.key(disc.sites[i]) for i, recipe in plan.items()}
        self.built: dict[int, nn.Module] = {}
        self.used: dict[int, nn.Module] = {}
        self.record = _Record()
        self.paths: dict[str, str] = {}
        self.rewritten: list[str] = []
        self.warnings: list[str] = []
        self.named = disc.named
        self.device, self.dtype = _placement(model)
        self._traces: dict[Any, fx.Graph] = {}
        self._compiled: dict[Any, Callable] = {}

    def _module(self, i: int) -> nn.Module:
        module = self.built.get(i)
        if module is None:
            site = self.disc.sites[i]
            module = self.plan[i].build(site)
            if self.device is not None and any(
                t.device != self.device or (t.is_floating_point() and t.dtype != self.dtype)
                for t in itertools.chain(module.parameters(), module.buffers())
            ):
                module.to(device=self.device, dtype=self.dtype)
            like = (self.disc.instances[i] if site.kind == "module"
                    else self.named.get(site.owner, self.model))
            module.train(like.training)
            module.__dict__[_MARK] = site.name
            self.built[i] = module
        return module

    def _use(self, sites: Iterable[int], module: nn.Module, path: str) -> None:
        for i in sites:
            self.used[i] = module
            self.paths[self.disc.sites[i].name] = path

    # -- module replacement ------------------------------------------------------------------

    def _split_needed(self) -> tuple[list[tuple[nn.Module, list[int]]], list[int]]:
        """Instances replaced whole, and site indices that need an fx rewrite."""
        disc, plan = self.disc, self.plan
        groups: dict[int, list[int]] = {}
        for i, site in enumerate(disc.sites):
            if site.kind == "module":
                groups.setdefault(id(disc.instances[i]), []).append(i)
        order = ({n: k for k, n in enumerate(disc.graph.nodes)} if disc.graph is not None else {})
        whole, nodes = [], []
        for group in groups.values():
            chosen = [i for i in group if i in plan]
            if not chosen:
                continue
            keys = {self.keys[i] for i in group if i in plan}
            redirect = any(
                disc.sites[i].inplace and disc.nodes[i] is not None
                and _used_after(disc.nodes[i], _site_input(disc.nodes[i]), order)
                and not _works_inplace(self._module(i))
                for i in chosen
            )
            if not redirect and (len(group) == 1 or (
                    len(chosen) == len(group) and len(keys) == 1 and None not in keys)):
                whole.append((disc.instances[group[0]], group))
            else:
                nodes.extend(chosen)
        nodes.extend(i for i, s in enumerate(disc.sites) if s.kind != "module" and i in plan)
        return whole, sorted(nodes)

    def _replace_instances(self, whole: list[tuple[nn.Module, list[int]]]) -> None:
        if not whole:
            return
        wanted = {id(inst) for inst, _ in whole}
        locations: dict[int, list[tuple[nn.Module, str]]] = {}
        for parent in self.model.modules():
            for name, child in parent._modules.items():
                if child is not None and id(child) in wanted:
                    locations.setdefault(id(child), []).append((parent, name))
        for inst, group in whole:
            chosen = [i for i in group if i in self.plan]
            new = self._module(chosen[0])
            for parent, name in locations[id(inst)]:
                parent._modules[name] = new
                self.record.replaced.append((parent, name, inst))
            self._use(chosen, new, self.disc.sites[chosen[0]].module_path)

    # -- fx rewriting --------------------------------------------------------------------------

    def _home(self, i: int) -> tuple[str, str]:
        """(parent path, attribute base name) where site ``i``'s new module goes."""
        site = self.disc.sites[i]
        k = site.name.rsplit("#", 1)[1] if "#" in site.name else "0"
        if site.kind == "module":
            parent, _, attr = site.module_path.rpartition(".")
            return parent, f"{attr}_call{k}"
        return site.owner, f"{site.op.split('.')[-1].rstrip('_')}_fn{k}"

    def _install(self, i: int, module: nn.Module) -> str:
        parent_path, base = self._home(i)
        parent = self.named[parent_path]
        attr = _free_attr(parent, base)
        parent.add_module(attr, module)
        self.record.added.append((parent, attr))
        return f"{parent_path}.{attr}" if parent_path else attr

    def _owner_graph(self, owner_path: str, owner: nn.Module, calls: list[_Call]):
        """(graph, constants) of ``owner.forward`` with every other module a leaf, or None.

        Owners of one class whose calls recorded the same operations share one trace (fx
        tracing costs milliseconds per call, and a model can have a hundred owners).
        """
        keys = {_region_key(c, owner_path) for c in calls}
        key = None
        if len(keys) == 1 and None not in keys:
            own = owner.__dict__.get("forward")
            key = (type(owner), id(getattr(own, "fn", getattr(own, "__func__", own))), keys.pop())
        elif len(keys) > 1:
            return None
        if key is not None and key in self._traces:
            return _copy_graph(self._traces[key])[0], {}
        try:
            graph, constants = _trace(owner, _SiteTracer(scope=owner))
        except (UntraceableModelError, TypeError):
            return None
        if key is not None and not constants:
            self._traces[key] = graph
            graph = _copy_graph(graph)[0]
        return graph, constants

    def _owner_targets(self, nodes: list[int]):
        """Per owner: (path, module, graph, constants, targets), or None if some owner's own
        forward cannot be rewritten alone (then the model's forward is rewritten instead)."""
        disc = self.disc
        result = []
        nodes_set = set(nodes)
        by_owner: dict[str, list[int]] = {}
        for i, s in enumerate(disc.sites):
            by_owner.setdefault(s.owner, []).append(i)
        for owner_path in dict.fromkeys(disc.sites[i].owner for i in nodes):
            owner = self.named.get(owner_path)
            calls = disc.calls.get(owner_path, [])
            if owner is None or (owner_path and not calls):
                return None
            if owner_path:
                forward = owner.__dict__.get("forward") or type(owner).forward
                try:
                    params = list(inspect.signature(forward).parameters.values())
                except (TypeError, ValueError):
                    return None
                if isinstance(forward, types.FunctionType):
                    params = params[1:]
                if any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params):
                    return None
                if not all(c.simple and len(c.args) == len(params) for c in calls):
                    return None
            per_call: dict[int, list[int]] = {}
            for i in by_owner[owner_path]:
                per_call.setdefault(disc.owner_call[i], []).append(i)
            if len(per_call) != max(1, len(calls)) or len({len(v) for v in per_call.values()}) != 1:
                return None
            traced = self._owner_graph(owner_path, owner, calls)
            if traced is None:
                return None
            graph, constants = traced
            scoped = self._scoped_modules(owner_path)
            relu_nodes = [(n, op) for n in graph.nodes if (op := _site_op(n, scoped)) is not None]
            columns = list(zip(*[per_call[c] for c in sorted(per_call)]))
            if len(relu_nodes) != len(columns):
                return None
            targets = []
            for (node, op), column in zip(relu_nodes, columns):
                if op[1] != disc.sites[column[0]].op:
                    return None
                picked = [i for i in column if i in nodes_set]
                if not picked:
                    continue
                keys = {self.keys[i] for i in column if i in self.plan}
                shareable = len(keys) == 1 and None not in keys
                if len(picked) != len(column) or (len(column) > 1 and not shareable):
                    return None
                parent_path, _ = self._home(column[0])
                if _relative(parent_path, owner_path) is None and parent_path != owner_path:
                    return None
                targets.append((node, column))
            result.append((owner_path, owner, graph, constants, targets))
        return result

    def _scoped_modules(self, owner_path: str) -> dict[str, nn.Module]:
        """Modules under ``owner_path`` keyed by their path relative to it."""
        if not owner_path:
            return self.named
        prefix = owner_path + "."
        return {k[len(prefix):]: m for k, m in self.named.items() if k.startswith(prefix)}

    def _rewrite_owners(self, nodes: list[int]) -> None:
        scoped = self._owner_targets(nodes)
        if scoped is None:
            self._rewrite_root(nodes)
            return
        for owner_path, owner, graph, constants, targets in scoped:
            rewrites = []
            for node, column in targets:
                module = self._module(column[0])
                path = self._install(column[0], module)
                self._use(column, module, path)
                inplace = self.disc.sites[column[0]].inplace
                rewrites.append((node, _relative(path, owner_path), module, inplace))
            _rewrite(graph, rewrites)
            self._set_forward(owner, graph, constants, owner_path, (type(owner),))

    def _rewrite_root(self, nodes: list[int]) -> None:
        graph, copied = _copy_graph(self.disc.graph)  # the discovery stays reusable
        rewrites = []
        for i in nodes:
            module = self._module(i)
            path = self._install(i, module)
            self._use([i], module, path)
            rewrites.append((copied[self.disc.nodes[i]], path, module, self.disc.sites[i].inplace))
        _rewrite(graph, rewrites)
        self._set_forward(self.model, graph, self.disc.constants, "",
                          (type(self.model), *self.disc.inlined))

    def _set_forward(self, owner, graph, constants, owner_path, classes) -> None:
        for name, value in constants.items():
            owner.__dict__[name] = value
            self.record.constants.append((owner, name))
        self.record.forwards.append((owner, owner.__dict__.get("forward")))
        owner.__dict__["forward"] = _compile_forward(graph, owner, self._compiled)
        self.rewritten.append(owner_path)
        readers = sorted({c.__name__ for c in classes if _class_reads_training(c)})
        if readers:
            mode = "train" if owner.training else "eval"
            self.warnings.append(
                f"the forward of {owner_path or 'the model'} was regenerated by fx in {mode} "
                f"mode and {', '.join(readers)} reads self.training: branches on it keep the "
                f"{mode}-mode path in both modes. Convert the model in the mode you will use it in."
            )

    def run(self) -> _Converter:
        whole, nodes = self._split_needed()
        records = self.model.__dict__.setdefault(_RECORDS, [])
        records.append(self.record)
        try:
            self._replace_instances(whole)
            if nodes:
                self._rewrite_owners(nodes)
        except BaseException:
            records.pop()
            self.record.undo()
            if not records:
                self.model.__dict__.pop(_RECORDS, None)
            raise
        for message in self.warnings:
            warnings.warn(message, UserWarning, stacklevel=3)
        return self


def _placement(model: nn.Module) -> tuple[torch.device | None, torch.dtype | None]:
    for t in itertools.chain(model.parameters(), model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return None, None


def cap_relus(
    model: nn.Module,
    cap: Any,
    sites: Any = None,
    example_input: Any = None,
    inplace: bool = False,
    *,
    mode: str = "auto",
) -> tuple[nn.Module, CapReport]:
    """Replace chosen ReLU sites of ``model`` by capped (or any registered) activations.

    ``cap``: a number (``math.inf`` keeps plain ReLU); a 1-D tensor of per-channel caps; an
    activation spec (``"pssilu"``, ``"learnable_capped_relu(cap=1)"``, a class or factory, or a
    module used as a template), built fresh for each site; or a mapping ``{site name or glob:
    any of those}`` (an exact name beats a glob; among globs the last one wins; sites no key
    matches are left alone). A numeric cap on a ReLU6 site becomes ``min(cap, 6)``.

    ``sites``: None (all), glob pattern(s) on site names (``"layer1.*"``; a shared module's
    path matches all its calls), int indices in execution order, a predicate on
    :class:`ReluSite`, or ``"bottleneck"`` (smallest width; needs ``example_input``).

    Passing the list :func:`find_relus` returned (``sites=find_relus(model)``) converts those
    sites without tracing the model again, if the model has not changed since.

    Returns ``(converted, report)``. By default ``converted`` is a deep copy and ``model`` is
    untouched; ``inplace=True`` converts ``model`` itself (``report.undo()`` or
    :func:`uncap` restore it). Parameters, buffers, ``state_dict`` keys, device, dtype and
    train/eval mode are preserved. Where calls of one module need different activations, or a
    site is a function call, the forward of the module applying it is regenerated by fx and
    set on that instance (see ``report.rewritten`` and ``docs/surgery.md``).
    """
    _check_model(model, "cap_relus")
    mode = _check_mode(mode)
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False (got {inplace!r})")
    if cap is None:
        raise TypeError("cap is required: a number, math.inf (plain ReLU), a spec or a mapping")
    for value in cap.values() if isinstance(cap, Mapping) else [cap]:
        _recipe(value, "cap value" if isinstance(cap, Mapping) else "cap")
    found = (sites.discovery(model, mode, example_input is not None)
             if isinstance(sites, _Sites) else None)
    if inplace:
        target = model
    else:
        memo: dict[int, Any] = {}
        target = copy.deepcopy(model, memo)
        found = found and _moved(found, memo)
    disc = found or _discover(target, example_input, mode, "cap_relus")
    plan = _plan(disc.sites, cap, sites)
    converter = _Converter(target, disc, plan).run()
    used = converter.used
    replaced = {disc.sites[i].name: getattr(used[i], "spec", type(used[i]).__name__)
                for i in sorted(used)}
    report = CapReport(
        model=target, replaced=replaced,
        paths={name: converter.paths[name] for name in replaced},
        method="fx" if converter.rewritten else "modules",
        rewritten=tuple(converter.rewritten), sites=tuple(disc.sites),
        warnings=tuple(converter.warnings), _record=converter.record,
    )
    return target, report


def is_converted(model: nn.Module) -> bool:
    """Whether ``model`` carries conversions by :func:`cap_relus` that :func:`uncap` can undo."""
    return bool(getattr(model, "__dict__", {}).get(_RECORDS))


def uncap(model: nn.Module) -> nn.Module:
    """Undo every conversion :func:`cap_relus` made to ``model`` (latest first), in place.

    The original ReLU modules and forwards come back, so outputs are bit-identical to the
    model before capping. Learned cap parameters are dropped with their modules.
    """
    _check_model(model, "uncap")
    records = model.__dict__.get(_RECORDS)
    if not records:
        raise ValueError(
            f"uncap: this {type(model).__name__} carries no conversion by cap_relus (the record "
            "lives on the converted model object). For a model rebuilt from a state_dict, "
            "build the uncapped architecture and load the state_dict into it instead"
        )
    while records:
        records.pop().undo()
    model.__dict__.pop(_RECORDS, None)
    return model


# --------------------------------------------------------------------------- calibration


class _Recorder(nn.Module):
    """The site's own ReLU (or ReLU6) that keeps a sample of its positive outputs."""

    def __init__(self, upper: float, inplace: bool, max_samples: int):
        super().__init__()
        self.upper = upper
        self.inplace = inplace
        self.max_samples = max_samples
        self.samples: list[Tensor] = []
        self.max = 0.0

    def forward(self, x: Tensor) -> Tensor:
        if math.isinf(self.upper):
            out = F.relu(x, self.inplace)
        else:
            out = F.hardtanh(x, 0.0, self.upper, self.inplace)
        values = out.detach().reshape(-1)
        values = values[values > 0]
        if values.numel():
            self.max = max(self.max, float(values.max()))
            step = -(-values.numel() // self.max_samples)
            self.samples.append(values[::step].float().cpu())
        return out

    def quantile(self, q: float) -> float:
        if not self.samples:
            return math.inf
        if q >= 1.0:
            return self.max
        values = torch.cat(self.samples)
        k = max(1, min(values.numel(), math.ceil(q * values.numel())))
        return float(values.kthvalue(k).values)


class _RecorderRecipe:
    """Builds one :class:`_Recorder` per site (never shared) and keeps them by site name."""

    def __init__(self, max_samples: int):
        self.max_samples = max_samples
        self.built: dict[str, _Recorder] = {}

    def build(self, site: ReluSite) -> _Recorder:
        recorder = self.built[site.name] = _Recorder(site.upper, site.inplace, self.max_samples)
        return recorder

    def key(self, site: ReluSite) -> None:
        return None


def _batches(data: Any, batch_size: int) -> Iterator[Tensor]:
    if isinstance(data, Tensor):
        yield from data.split(batch_size)
        return
    if not isinstance(data, Iterable):
        raise TypeError(
            f"data must be a tensor, a DataLoader, or an iterable of tensors or (x, y) batches; "
            f"got {type(data).__name__}"
        )
    for batch in data:
        if isinstance(batch, (tuple, list)) and batch:
            batch = batch[0]
        if not isinstance(batch, Tensor):
            raise TypeError(
                f"each batch must be a tensor or an (x, y) pair whose x is a tensor; got "
                f"{type(batch).__name__}"
            )
        yield batch


def calibrate_caps(
    model: nn.Module,
    data: Any,
    quantile: float = 0.999,
    sites: Any = None,
    max_batches: int | None = None,
    *,
    mode: str = "auto",
    batch_size: int = 256,
    max_samples: int = 1 << 16,
) -> dict[str, float]:
    """Per-site caps: the ``quantile`` of each site's positive outputs over ``data``.

    ``data``: a DataLoader or iterable of tensors or ``(x, y)`` batches, or one tensor (split
    into ``batch_size`` chunks); at most ``max_batches`` batches are used. Each call site has a
    recorder of its own, so two calls of one shared ``nn.ReLU`` get separate caps. The model runs
    in eval mode on a copy; ``model`` is untouched. Each batch keeps at most ``max_samples``
    evenly strided values per site (``quantile=1`` is the exact maximum). A site with no
    positive output gets ``math.inf`` (with a warning). The result is a mapping that
    ``cap_relus(model, cap=caps)`` accepts.
    """
    _check_model(model, "calibrate_caps")
    mode = _check_mode(mode)
    if (isinstance(quantile, bool) or not isinstance(quantile, numbers.Real)
            or not 0.0 < quantile <= 1.0):
        raise ValueError(f"quantile must be a number in (0, 1] (got {quantile!r}); e.g. 0.999")
    if max_batches is not None and (
            isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"max_batches must be a positive int or None (got {max_batches!r})")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int (got {batch_size!r})")
    batches = _batches(data, batch_size)
    first = next(batches, None)
    if first is None:
        raise ValueError("calibrate_caps: data yielded no batch; pass at least one batch of inputs")
    work = copy.deepcopy(model).eval()
    device, dtype = _placement(work)

    def prepare(x: Tensor) -> Tensor:
        if device is not None:
            x = x.to(device=device, dtype=dtype if x.is_floating_point() else None)
        return x

    example = prepare(first) if isinstance(sites, str) and sites == "bottleneck" else None
    disc = _discover(work, example, mode, "calibrate_caps")
    chosen = _select(disc.sites, sites)
    recipe = _RecorderRecipe(max_samples)
    _Converter(work, disc, {s.index: recipe for s in chosen}).run()
    recorders = {i: recipe.built[disc.sites[i].name] for i in (s.index for s in chosen)}
    with torch.no_grad():
        for b, x in enumerate(itertools.chain([first], batches)):
            if max_batches is not None and b >= max_batches:
                break
            work(prepare(x))
    caps = {disc.sites[i].name: rec.quantile(float(quantile)) for i, rec in recorders.items()}
    dead = [name for name, value in caps.items() if math.isinf(value)]
    if dead:
        warnings.warn(
            f"calibrate_caps: no positive output at {len(dead)} site(s) ({', '.join(dead[:10])}"
            f"{', ...' if len(dead) > 10 else ''}); their cap is math.inf (plain ReLU)",
            UserWarning, stacklevel=2,
        )
    return caps
