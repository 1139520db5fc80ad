"""Discovery by running: the sites of a model from the ReLU applications one forward pass
records (:class:`.recorder.ReluRecorder`), named by the rules of the fx discovery in
:mod:`.sites`; and the record both discoveries fill, :class:`_Discovery`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ._records import _OWN_MODULES, _RELU_MODULES, ReluSite


@dataclass
class _Discovery:
    """Sites of one model plus what conversion needs: graph nodes, instances, call records."""

    sites: list[ReluSite]
    instances: list[nn.Module | None]
    nodes: list[fx.Node | None]
    owner_call: list[int]
    graph: fx.Graph | None = None
    constants: dict[str, Any] = field(default_factory=dict)
    calls: dict[str, list[Any]] = field(default_factory=dict)  # sites._Call per owner path
    inlined: tuple[type, ...] = ()
    named: dict[str, nn.Module] = field(default_factory=dict)
    untraced: str = ""
    probed: bool = False  # found by running the model (no graph nodes), see _probe_discovery


def _width(shape: tuple[int, ...] | None) -> int | None:
    if shape is None:
        return None
    if len(shape) >= 2:
        return int(shape[1])
    return int(shape[0]) if shape else 1



def _number(model: nn.Module, raw: list[tuple], names: dict[nn.Module, str] | None = None,
            **fields: Any) -> _Discovery:
    """A discovery from ReLU applications found by running, in execution order; each
    ``(instance or None, kind, op, base name, owner, owner call, in place, shape)``. Names
    follow the fx discovery's rules, so both ways name a site alike."""
    totals: dict[str, int] = {}
    for item in raw:
        totals[item[3]] = totals.get(item[3], 0) + 1
    counter: dict[str, int] = {}
    sites, instances, owner_call = [], [], []
    for index, (module, kind, op, base, owner, call, inplace, shape) in enumerate(raw):
        k = counter[base] = counter.get(base, -1) + 1
        sites.append(ReluSite(
            name=f"{base}#{k}" if totals[base] > 1 else base, index=index, kind=kind, op=op,
            module_path=base if kind == "module" else owner, owner=owner,
            shared=kind == "module" and totals[base] > 1, inplace=inplace, shape=shape,
            width=_width(shape)))
        instances.append(module)
        owner_call.append(call)
    named = {path: m for m, path in (names or _first_paths(model)).items()}
    return _Discovery(sites, instances, [None] * len(sites), owner_call, named=named, **fields)


def _first_paths(model: nn.Module) -> dict[nn.Module, str]:
    """Each module of ``model`` and the path ``named_modules()`` gives it (its first), in that
    order; a recursive walk, several times faster than ``named_modules`` on models of
    thousands of modules."""
    names: dict[nn.Module, str] = {model: ""}

    def visit(parent: nn.Module, prefix: str) -> None:
        for key, child in parent._modules.items():
            if child is not None and child not in names:
                names[child] = path = prefix + key
                visit(child, path + ".")

    visit(model, "")
    return names


def _is_site_call(call: Any) -> bool:
    """False for ReLUs inside activations of this package (never sites, as in the fx way)."""
    return not (call.installed or (call.module is not None
                                   and type(call.module).__module__ in _OWN_MODULES))


def probe_discovery(model: nn.Module, run: Any, shapes: bool,
                    is_leaf: Callable[[nn.Module, str], bool]) -> _Discovery | None:
    """Sites from one run's ReLU applications (a :class:`.recorder.ReluRecorder` run), with no
    fx trace at all, when every application is a call of an ``nn.ReLU``/``nn.ReLU6`` that an
    fx trace would see as a site (not inside a module ``is_leaf`` keeps whole) and the run
    read no tensor value into Python (``if x.sum() > 0``, ``x.item()``: control flow that
    another input could take elsewhere). None otherwise: functional ReLUs need their owners
    traced to be rewritten, and a value-dependent forward needs fx's verdict.

    Our own design: a forward pass at a small input is far cheaper than an fx trace
    (ghostnetv3_050: about 0.1 s against 4 s) and sees the same module calls."""
    if run.reads:
        return None
    names = _first_paths(model)
    hidden: set[int] = set()
    leaf = is_leaf

    def walk(m: nn.Module, under: bool) -> None:
        for child in m._modules.values():
            if child is None:
                continue
            if under:
                hidden.add(id(child))
            walk(child, under or leaf(child, ""))

    walk(model, False)
    raw = []
    for call in run.calls:
        if not _is_site_call(call):
            continue
        m = call.module
        label = _RELU_MODULES.get(type(m))
        if label is None or m not in names or id(m) in hidden or m is model:
            return None  # fx sees these otherwise (a root nn.ReLU: fx traces its F.relu)
        path = names[m]
        owner = names.get(call.caller, path.rpartition(".")[0])
        raw.append((m, "module", label, path, owner, 0, bool(m.inplace),
                    call.shape if shapes else None))
    return _number(model, raw, names, probed=True)


def probe_leaves(model: nn.Module, calls: list, reads: list = ()) -> frozenset[int] | None:
    """Ids of the modules in whose subtree the run applied no ReLU and read no tensor value
    into Python: fx keeps them whole (the trace is only as deep as the ReLUs). A module whose
    forward branches on a value may apply a ReLU on another input, so fx must see it. None if
    an application or a read has no registered module."""
    names = _first_paths(model)
    busy: set[str] = set()
    modules = [call.module for call in calls if _is_site_call(call)]
    for module in modules + [module for _, module in reads]:
        if module is None or module not in names:
            return None
        path = names[module]
        while path:
            busy.add(path)
            path = path.rpartition(".")[0]
    return frozenset(id(m) for m, path in names.items() if path and path not in busy)


def runtime_discovery(model: nn.Module, calls: list, why: str) -> _Discovery:
    """Sites of a model fx cannot trace, from one run's ReLU applications: ReLU modules by
    instance, functional ReLUs by owner and order within each call of the owner. Only what
    the run reached is found (the self-check runs the same input)."""
    names = _first_paths(model)
    raw, frames = [], {}
    for call in calls:
        module = call.module
        if module not in names or not _is_site_call(call):
            continue  # built inside a forward: no place to install; the self-check names it
        label = _RELU_MODULES.get(type(module))
        path = names[module]
        if label is not None:
            raw.append((module, "module", label, path, path.rpartition(".")[0], 0,
                        bool(module.inplace), call.shape))
            continue
        seen = frames.setdefault(module, [])
        if not seen or seen[-1] is not call.frame:
            seen.append(call.frame)
        op, token = _LABELS[call.func]
        raw.append((None, "function" if not op.startswith("Tensor") else "method", op,
                    f"{path}:{token}", path, len(seen) - 1, call.inplace, call.shape))
    return _number(model, raw, names, untraced=why.split(". What")[0])


_LABELS = {F.relu: ("F.relu", "relu"), torch.relu: ("torch.relu", "relu"),
           torch.relu_: ("torch.relu_", "relu"), F.relu6: ("F.relu6", "relu6"),
           Tensor.relu: ("Tensor.relu", "relu"), Tensor.relu_: ("Tensor.relu_", "relu")}
