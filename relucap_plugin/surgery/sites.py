"""Site discovery: trace a model with fx (or list its ReLU modules), number its ReLU
applications, add shapes from an example input; ``find_relus`` and its reusable result."""

from __future__ import annotations

import dataclasses
import itertools
import os
import types
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, fx, nn

from ._codegen import _GeneratedForward
from .._torch import caller_state
from ._records import (
    _OWN_MODULES,
    _RECORDS,
    _RELU_MODULES,
    _SURGERY_DIR,
    _TORCH_DIR,
    ReluSite,
    UntraceableModelError,
    _check_mode,
    _check_model,
    paused_gc,
    _is_installed,
    _relative,
    _site_op,
)
from .running import _Discovery, _width, probe_discovery, probe_leaves, runtime_discovery
from .verify import _as_args, bad_example_input, probe, probe_run, relu_like_note

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

    def __init__(self, scope: nn.Module | None = None, leaves: frozenset[int] = frozenset()):
        super().__init__()
        self.only = scope
        self.leaves = leaves
        self.calls: dict[str, list[_Call]] = {}
        self.inlined: dict[type, None] = {}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self.only is not None:
            return m is not self.only
        return (id(m) in self.leaves or _is_installed(m) or type(m).__module__ in _OWN_MODULES
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
        if not inside and not os.path.abspath(code.co_filename).startswith(_SURGERY_DIR):
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
            "What still works: cap_relus(model, cap, example_input=x) finds the ReLUs by "
            "running the model once and caps functional ones (F.relu, torch.relu, x.relu()) "
            "at run time; mode='modules' replaces the nn.ReLU/nn.ReLU6 modules only (each "
            "instance is one site), and its self-check refuses to return a model in which a "
            "functional ReLU stays plain."
        ) from exc
    finally:
        if own is not None:
            module.__class__ = cls
        constants = {k: module.__dict__.pop(k) for k in set(module.__dict__) - before}
    return graph, constants


def _discover_fx(model: nn.Module, leaves: frozenset[int] = frozenset()) -> _Discovery:
    tracer = _SiteTracer(leaves=leaves)
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


def _add_shapes(model: nn.Module, disc: _Discovery, example_input: Any, fn: str) -> None:
    """Fill ``shape``/``width`` of the sites from one eval-mode, no-grad forward pass."""
    args = _as_args(example_input, model, fn)
    shapes: dict[int, tuple[int, ...]] = {}
    with caller_state(model), torch.no_grad():
        try:
            if disc.graph is not None:
                run = _ShapeInterpreter(model, disc.graph, disc.constants, set(disc.nodes))
                run.run(*args)
                for i, node in enumerate(disc.nodes):
                    if node in run.shapes:
                        shapes[i] = run.shapes[node]
            else:
                shapes = _first_calls(model, disc, args)
        except Exception as exc:
            raise bad_example_input(fn, model, example_input, exc) from exc
    disc.sites = [
        _replace(site, index=j, shape=shapes.get(j), width=_width(shapes.get(j)))
        for j, site in enumerate(disc.sites)
    ]


def _first_calls(model: nn.Module, disc: _Discovery, args: tuple) -> dict[int, tuple[int, ...]]:
    """Modules mode: run ``model`` with hooks; sites reordered by their first call, uncalled
    instances dropped; the output shape of each site's first call."""
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
    called = sorted(first, key=lambda i: first[i][0])
    disc.sites = [_replace(disc.sites[i], shared=disc.sites[i].shared or counts[i] > 1)
                  for i in called]
    disc.instances = [disc.instances[i] for i in called]
    disc.nodes = [None] * len(called)
    disc.owner_call = [0] * len(called)
    return {j: first[i][1] for j, i in enumerate(called)}


def _replace(site: ReluSite, **changes: Any) -> ReluSite:
    return ReluSite(**{**site.__dict__, **changes})


def _activation_summary(model: nn.Module) -> str:
    names = sorted({type(m).__name__ for m in model.modules()
                    if type(m).__module__.startswith("torch.nn.modules.activation")})
    return f" (its activation modules: {', '.join(names)})" if names else ""


def _discover(model: nn.Module, example_input: Any, mode: str, fn: str,
              run: Any = None, trace: bool = False) -> _Discovery:
    """Sites of ``model``. ``run``: a forward pass of it recorded by
    :class:`.recorder.ReluRecorder` (on ``example_input`` if given), or None. With a run, a
    model whose ReLUs are all modules needs no trace (unless ``trace``), and the trace of the
    others stops at the modules in which the run applied no ReLU; without a run, fx traces
    the whole model."""
    if mode == "auto":
        calls = run.calls if run is not None and run.error is None else None
        disc = None if calls is None or trace else probe_discovery(
            model, run, example_input is not None, _SiteTracer().is_leaf_module)
        if disc is None:
            leaves = None if calls is None else probe_leaves(model, calls, run.reads)
            try:
                disc = _discover_fx(model, leaves or frozenset())
            except UntraceableModelError as exc:
                if example_input is None:
                    raise
                if calls is None:
                    calls = probe(model, _as_args(example_input, model, fn)).calls
                disc = runtime_discovery(model, calls, str(exc))
    else:
        disc = _discover_modules(model)
    if example_input is not None and not disc.untraced and not disc.probed:
        _add_shapes(model, disc, example_input, fn)
    if not disc.sites:
        written = getattr(run, "relu_like", None)
        raise ValueError(
            f"{fn}: {type(model).__name__} applies no ReLU in its forward pass"
            f"{' (mode=modules finds nn.ReLU/nn.ReLU6 modules only)' if mode == 'modules' else ''}"
            f"{_activation_summary(model)}; there is nothing to cap. "
            + ("Its ReLUs were converted by cap_relus already; call uncap(model) to start over"
               if model.__dict__.get(_RECORDS) else
               "Pass a model that uses nn.ReLU, nn.ReLU6, F.relu, torch.relu, F.relu6 or x.relu()")
            + (f". {relu_like_note(fn, written, model).split(': ', 1)[1]}" if written else "")
        )
    return disc


def find_relus(
    model: nn.Module, example_input: Any = None, *, mode: str = "auto"
) -> list[ReluSite]:
    """Every ReLU application of ``model``'s forward pass, in execution order.

    ``example_input`` (a tensor, or a tuple of forward arguments) adds each site's activation
    shape and width. Discovery runs the model once under ``no_grad`` in its own mode (on
    ``example_input``, or on a small input made up from its first layer; buffers, modes and
    RNG restored; forward hooks do fire) and records every ReLU application; fx traces only
    the modules in which a ReLU was applied when some ReLU is functional, and the whole model
    if no input runs or the forward reads tensor values into Python. ``mode="modules"`` skips
    both and lists each ``nn.ReLU``/``nn.ReLU6`` instance once (registration order, or
    first-call order with ``example_input``). ``model`` is not changed.
    """
    with paused_gc():
        _check_model(model, "find_relus")
        mode = _check_mode(mode)
        run = probe_run(model, example_input, "find_relus") if mode == "auto" else None
        disc = _discover(model, example_input, mode, "find_relus", run)
        if run is not None and run.relu_like:
            warnings.warn(relu_like_note("find_relus", run.relu_like, model), UserWarning, stacklevel=2)
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
    from .._console import print_table

    rows = [
        (s.index, s.name, s.op, "yes" if s.shared else "",
         "" if s.shape is None else "x".join(map(str, s.shape)),
         "" if s.width is None else s.width)
        for s in sites
    ]
    print_table(["#", "site", "op", "shared", "shape", "width"],
                rows, title=title, file=file)


# --------------------------------------------------------------------------- selection
