"""Conversion: apply a plan to a model (swap instances, or regenerate owners' forwards), record
every change so it can be undone; ``cap_relus``, ``uncap`` and ``is_converted``."""

from __future__ import annotations

import inspect
import itertools
import types
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from torch import fx, nn

from .._torch import all_modules, float_dtype, model_device

from . import sites as _tracing
from ._codegen import _compile_forward, _copy_graph, _free_attr, _rewrite, _used_after, _works_inplace
from ._records import (
    _MARK, _RECORDS, CapReport, ConversionCheckError, UntraceableModelError, _check_mode,
    _check_model, _class_codes, _positional_input, _Record, _relative, _site_input, _site_op,
    carry_hooks, paused_gc,
)
from . import verify
from ._copy import copy_model
from .quantize import cap_quantizable, refuse_fused
from .runtime import has_with_block, wrap_forward
from .select import _plan, _recipe
from .sites import _Call, _discover, _Discovery, _moved, _region_key, _Sites, _SiteTracer

def _class_reads_training(cls: type) -> bool:
    return any("training" in code.co_names for code in _class_codes(cls))


class _Converter:
    """Applies a plan (site index -> recipe) to ``model``, recording every change.

    Modules are built only for what gets installed (one per shared instance when its calls
    can share), on the model's device and dtype, in the mode of the module they stand in for.
    """

    def __init__(self, model: nn.Module, disc: _Discovery, plan: Mapping[int, Any],
                 forced: str | None = None):
        self.model = model
        self.forced = forced or (disc.untraced and f"fx cannot trace the model ({disc.untraced})")
        self.how: dict[str, str] = {}
        self.reasons: dict[str, str] = {}
        self.runtime: list[str] = []
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
        self.device, self.dtype = model_device(model), float_dtype(model, torch.get_default_dtype())
        self._traces: dict[Any, fx.Graph] = {}
        self._compiled: dict[Any, Callable] = {}
        self._split: tuple[list[tuple[nn.Module, list[int]]], list[int]] | None = None
        self.same_input = True  # sites found on the check's input: applications are countable

    def _module(self, i: int) -> nn.Module:
        module = self.built.get(i)
        if module is None:
            site = self.disc.sites[i]
            module = self.plan[i].build(site)
            tensors = ([*module._parameters.values(), *module._buffers.values()]
                       if not module._modules else
                       itertools.chain(module.parameters(), module.buffers()))
            if self.device is not None and any(
                t is not None and (t.device != self.device
                                   or (t.is_floating_point() and t.dtype != self.dtype))
                for t in tensors
            ):
                module.to(device=self.device, dtype=self.dtype)
            like = (self.disc.instances[i] if site.kind == "module"
                    else self.named.get(site.owner, self.model))
            if module._modules or module.training != like.training:
                module.train(like.training)
            if site.kind == "module":
                carry_hooks(like, module)
            module.__dict__[_MARK] = site.name
            self.built[i] = module
        return module

    def _use(self, sites: Iterable[int], module: nn.Module, path: str, how: str) -> None:
        for i in sites:
            self.used[i] = module
            self.paths[self.disc.sites[i].name] = path
            self.how[self.disc.sites[i].name] = how

    # -- module replacement ------------------------------------------------------------------

    def _split_needed(self) -> tuple[list[tuple[nn.Module, list[int]]], list[int]]:
        """Instances replaced whole, and site indices that need an fx rewrite (or run-time
        capping): worked out once per converter."""
        if self._split is None:
            self._split = self._work_out_split()
        return self._split

    def _work_out_split(self) -> tuple[list[tuple[nn.Module, list[int]]], list[int]]:
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
            # without graph nodes (a discovery by running) whether the input of an in-place
            # ReLU is read later is unknown: such a site asks for a trace
            redirect = any(
                disc.sites[i].inplace and (disc.probed or (
                    disc.nodes[i] is not None
                    and _used_after(disc.nodes[i], _site_input(disc.nodes[i]), order)))
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
        for parent in all_modules(self.model):
            for name, child in parent._modules.items():
                if child is not None and id(child) in wanted:
                    locations.setdefault(id(child), []).append((parent, name))
        for inst, group in whole:
            chosen = [i for i in group if i in self.plan]
            new = self._module(chosen[0])
            nodes = [self.disc.nodes[i] for i in group]
            if any(n is None or n.kwargs for n in nodes) and not any(
                    h is _positional_input for h in new._forward_pre_hooks.values()):
                for name in ("_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"):
                    new.__dict__[name] = type(getattr(new, name))(getattr(new, name))  # its own
                new.register_forward_pre_hook(_positional_input, with_kwargs=True, prepend=True)
            for parent, name in locations[id(inst)]:
                parent._modules[name] = new
                self.record.replaced.append((parent, name, inst))
                self.record.installed.append(new)
            self._use(chosen, new, self.disc.sites[chosen[0]].module_path, "module")

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
        """(graph, constants) of ``owner.forward`` with every other module a leaf, or the
        reason it cannot be had.

        Owners of one class whose calls recorded the same operations share one trace (fx
        tracing costs milliseconds per call, and a model can have a hundred owners).
        """
        keys = {_region_key(c, owner_path) for c in calls}
        key = None
        if len(keys) == 1 and None not in keys:
            own = owner.__dict__.get("forward")
            key = (type(owner), id(getattr(own, "fn", getattr(own, "__func__", own))), keys.pop())
        elif len(keys) > 1:
            return "its calls run different operations"
        if key is not None and key in self._traces:
            return _copy_graph(self._traces[key])[0], {}
        try:
            graph, constants = _tracing._trace(owner, _SiteTracer(scope=owner))
        except (UntraceableModelError, TypeError) as exc:
            return f"its forward cannot be traced alone ({str(exc).split('. ')[0]})"
        if key is not None and not constants:
            self._traces[key] = graph
            graph = _copy_graph(graph)[0]
        return graph, constants

    def _owner_target(self, owner_path: str, nodes_set: set[int], by_owner: dict[str, list[int]]):
        """(path, module, graph, constants, targets) to rewrite ``owner_path``'s forward alone,
        or the reason it cannot be."""
        disc = self.disc
        owner = self.named.get(owner_path)
        calls = disc.calls.get(owner_path, [])
        if owner is None or (owner_path and not calls):
            return "fx recorded no call of it"
        if owner_path:
            forward = owner.__dict__.get("forward") or type(owner).forward
            try:
                params = list(inspect.signature(forward).parameters.values())
            except (TypeError, ValueError):
                return "its forward has no readable signature"
            if isinstance(forward, types.FunctionType):
                params = params[1:]
            if any(p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params):
                return "its forward takes *args, **kwargs or keyword-only arguments"
            if not all(c.simple and len(c.args) == len(params) for c in calls):
                return "it is called with keywords, defaults or non-tensor arguments"
        per_call: dict[int, list[int]] = {}
        for i in by_owner[owner_path]:
            per_call.setdefault(disc.owner_call[i], []).append(i)
        if len(per_call) != max(1, len(calls)) or len({len(v) for v in per_call.values()}) != 1:
            return "its calls apply different numbers of ReLUs"
        traced = self._owner_graph(owner_path, owner, calls)
        if isinstance(traced, str):
            return traced
        graph, constants = traced
        scoped = self._scoped_modules(owner_path)
        relu_nodes = [(n, op) for n in graph.nodes if (op := _site_op(n, scoped)) is not None]
        columns = list(zip(*[per_call[c] for c in sorted(per_call)]))
        if len(relu_nodes) != len(columns):
            return "its own trace finds another number of ReLUs than the model's trace"
        targets = []
        for (node, op), column in zip(relu_nodes, columns):
            if op[1] != disc.sites[column[0]].op:
                return "its own trace finds the ReLUs in another order"
            picked = [i for i in column if i in nodes_set]
            if not picked:
                continue
            keys = {self.keys[i] for i in column if i in self.plan}
            shareable = len(keys) == 1 and None not in keys
            if len(picked) != len(column) or (len(column) > 1 and not shareable):
                return "its calls need different activations at one call site"
            parent_path, _ = self._home(column[0])
            if _relative(parent_path, owner_path) is None and parent_path != owner_path:
                return "a ReLU module it calls lives outside it"
            targets.append((node, column))
        return owner_path, owner, graph, constants, targets

    def _runtime_reason(self, owner_path: str) -> str | None:
        """Why the functional sites of ``owner_path`` are capped at run time, or None."""
        if self.forced:
            return self.forced
        owner = self.named.get(owner_path)
        if owner is not None and has_with_block(type(owner)):
            return (f"{type(owner).__name__} opens a `with` block (no_grad, autocast, ...) "
                    "that a regenerated forward would drop")
        return None

    def _scoped_modules(self, owner_path: str) -> dict[str, nn.Module]:
        """Modules under ``owner_path`` keyed by their path relative to it."""
        if not owner_path:
            return self.named
        prefix = owner_path + "."
        return {k[len(prefix):]: m for k, m in self.named.items() if k.startswith(prefix)}

    def _rewrite_owners(self, nodes: list[int]) -> None:
        """fx-rewrite each owner's forward alone where possible. Functional sites of owners
        whose forward must keep its code (``with`` blocks) or cannot be rewritten alone are
        capped at run time; the whole model's forward is rewritten only when that cannot be."""
        disc = self.disc
        by_owner: dict[str, list[int]] = {}
        for i, s in enumerate(disc.sites):
            by_owner.setdefault(s.owner, []).append(i)
        runtime: dict[str, tuple[dict[int, list[int]], str]] = {}
        planned, failed = [], {}
        nodes_set = set(nodes)
        for owner_path in dict.fromkeys(disc.sites[i].owner for i in nodes):
            mine = [i for i in nodes if disc.sites[i].owner == owner_path]
            functional = all(disc.sites[i].kind != "module" for i in mine)
            must = self._runtime_reason(owner_path) if functional else None
            reason = must
            if must is None and disc.graph is not None:
                target = self._owner_target(owner_path, nodes_set, by_owner)
                if not isinstance(target, str):
                    planned.append(target)
                    continue
                reason = f"its forward cannot be rewritten alone: {target}"
            columns = self._runtime_columns(owner_path, mine, by_owner[owner_path]) if (
                functional) else "it applies a ReLU module that needs a rewrite"
            if isinstance(columns, str) and must is not None:
                raise ValueError(
                    f"cap_relus: the sites of {owner_path or 'the model'} must be capped at run "
                    f"time ({must}), but {columns}")
            if isinstance(columns, str):
                failed[owner_path] = f"{reason}, and at run time {columns}"
                continue
            runtime[owner_path] = (columns, reason)
        if failed and disc.graph is None:
            raise ValueError(
                "cap_relus: " + "; ".join(f"{p or 'the model'}: {r}" for p, r in failed.items())
                + f". That needs an fx rewrite, and {disc.untraced or 'fx was not used'}: give "
                "all calls of a shared ReLU module the same cap")
        if failed:
            why = "; ".join(f"{p or 'the model'}: {r}" for p, r in failed.items())
            root = [i for i in nodes if disc.sites[i].owner not in runtime]
            for i in root:
                self.reasons[disc.sites[i].name] = f"model forward rewritten by fx because {why}"
            self._rewrite_root(root)
        else:
            for owner_path, owner, graph, constants, targets in planned:
                rewrites = []
                for node, column in targets:
                    module = self._module(column[0])
                    path = self._install(column[0], module)
                    self._use(column, module, path, "fx")
                    for i in column:
                        self.reasons[disc.sites[i].name] = (
                            f"owner {owner_path or 'model'} forward rewritten by fx: "
                            + self._why_fx(i))
                    inplace = disc.sites[column[0]].inplace
                    rewrites.append((node, _relative(path, owner_path), module, inplace))
                _rewrite(graph, rewrites)
                self._set_forward(owner, graph, constants, owner_path, (type(owner),))
        for owner_path, (columns, reason) in runtime.items():
            self._intercept(owner_path, columns, reason)

    def _why_fx(self, i: int) -> str:
        if self.disc.sites[i].kind != "module":
            return "a function call has no module to swap"
        return ("calls of one shared module need different activations, or an in-place "
                "input is read later")

    def _runtime_columns(self, owner_path: str, sites: list[int], owned: list[int]):
        """Occurrence k -> the sites (one per call of the owner) capped as its k-th ReLU call,
        or why the owner's ReLUs cannot be capped at run time."""
        disc = self.disc
        per_call: dict[int, list[int]] = {}
        for i in owned:
            if disc.sites[i].kind != "module":
                per_call.setdefault(disc.owner_call[i], []).append(i)
        if len({len(v) for v in per_call.values()}) != 1:
            return "its calls apply different numbers of ReLUs"
        chosen = set(sites)
        table: dict[int, list[int]] = {}
        for k, column in enumerate(zip(*[per_call[c] for c in sorted(per_call)])):
            picked = [i for i in column if i in chosen]
            if not picked:
                continue
            keys = {self.keys[i] for i in column if i in self.plan}
            if len(picked) != len(column) or (len(column) > 1 and (len(keys) != 1 or None in keys)):
                return (f"its {len(column)} calls need different activations at call site "
                        f"{[disc.sites[i].name for i in column]}")
            table[k] = list(column)
        return table

    def _intercept(self, owner_path: str, columns: dict[int, list[int]], reason: str) -> None:
        """Cap the functional sites of one owner at run time; see :mod:`.runtime`."""
        owner = self.named.get(owner_path, self.model) if owner_path else self.model
        table: dict[int, str] = {}
        for k, column in columns.items():
            module = self._module(column[0])
            path = self._install(column[0], module)
            self._use(column, module, path, "runtime")
            for i in column:
                self.reasons[self.disc.sites[i].name] = f"capped at run time: {reason}"
            table[k] = _relative(path, owner_path) if owner_path else path
        self.record.forwards.append((owner, owner.__dict__.get("forward")))
        owner.__dict__["forward"] = wrap_forward(owner, table)
        self.runtime.append(owner_path)

    def _rewrite_root(self, nodes: list[int]) -> None:
        graph, copied = _copy_graph(self.disc.graph)  # the discovery stays reusable
        rewrites = []
        for i in nodes:
            module = self._module(i)
            path = self._install(i, module)
            self._use([i], module, path, "fx")
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
            self.abort()
            raise
        return self

    def abort(self) -> None:
        """Undo this conversion (it must be the latest one on the model)."""
        records = self.model.__dict__.get(_RECORDS) or []
        if records and records[-1] is self.record:
            records.pop()
        self.record.undo()
        if not records:
            self.model.__dict__.pop(_RECORDS, None)

    def installed(self) -> dict[nn.Module, tuple[str, float, bool]]:
        """Each new activation -> (site name, the site's built-in bound, in place)."""
        return {m: (self.disc.sites[i].name, self.disc.sites[i].upper, self.disc.sites[i].inplace)
                for i, m in self.used.items()}


def cap_relus(
    model: nn.Module,
    cap: Any,
    sites: Any = None,
    example_input: Any = None,
    inplace: bool = False,
    *,
    mode: str = "auto",
    quantizable: bool = False,
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

    ``quantizable=True`` keeps the model fusable and quantizable in eager mode (torchvision's
    ``quantization.*`` models: ``fuse_model()``, then ``prepare``/``convert``): ReLU modules
    stay and clamp through a forward hook, ``FloatFunctional`` is wrapped; one numeric cap for
    every site. See :mod:`.quantize`.
    """
    with paused_gc():
        _check_model(model, "cap_relus")
        mode = _check_mode(mode)
        if not isinstance(inplace, bool):
            raise TypeError(f"inplace must be True or False (got {inplace!r})")
        refuse_fused(model)
        if quantizable:
            return cap_quantizable(model, cap, sites, example_input, inplace)
        if cap is None:
            raise TypeError("cap is required: a number, math.inf (plain ReLU), a spec or a mapping")
        for where, value in ({f"cap[{k!r}]": v for k, v in cap.items()} if isinstance(cap, Mapping)
                             else {"cap": cap}).items():
            _recipe(value, where)
        found = (sites.discovery(model, mode, example_input is not None)
                 if isinstance(sites, _Sites) else None)
        if inplace:
            target = model
        else:
            memo: dict[int, Any] = {}
            try:
                target = copy_model(model, memo)
            except Exception as exc:
                raise TypeError(
                    f"cap_relus: {type(model).__name__} cannot be deep-copied ({type(exc).__name__}: "
                    f"{exc}); convert it in place instead: cap_relus(model, ..., inplace=True) "
                    "changes model itself, and report.undo() or uncap(model) restores it"
                ) from exc
            found = found and _moved(found, memo)
        # the self-check's reference pass comes first: its record of the ReLU applications is
        # the discovery too (no fx trace for a model whose ReLUs are all modules)
        args, ref, unchecked = verify.reference_run(target, example_input)
        converter, checked = convert_verified(
            target, example_input, (args, ref, unchecked), mode, "cap_relus",
            lambda disc: _plan(disc.sites, cap, sites), found)
        disc = converter.disc
        for message in converter.warnings:
            warnings.warn(message, UserWarning, stacklevel=2)
        used = converter.used
        replaced = {disc.sites[i].name: getattr(used[i], "spec", type(used[i]).__name__)
                    for i in sorted(used)}
        report = CapReport(
            model=target, replaced=replaced,
            paths={name: converter.paths[name] for name in replaced},
            method="fx" if converter.rewritten else "runtime" if converter.runtime else "modules",
            rewritten=tuple(converter.rewritten), sites=tuple(disc.sites),
            warnings=tuple(converter.warnings), _record=converter.record,
            how={name: converter.how[name] for name in replaced},
            reasons={name: converter.reasons[name] for name in replaced if name in converter.reasons},
            check=checked,
        )
        return target, report


def convert_verified(target: nn.Module, example_input: Any, reference: tuple, mode: str, fn: str,
                     make_plan: Callable[[_Discovery], Mapping[int, Any]],
                     found: _Discovery | None = None) -> tuple[_Converter, str]:
    """Discover ``target``'s sites (``found``, or from the reference pass), convert them as
    ``make_plan`` says and self-check; returns the converter and the check's summary. The
    reference is ``(args, the unconverted model's pass, why unchecked)`` from
    :func:`.verify.reference_run`. Raises with ``target`` unchanged."""
    args, ref, unchecked = reference
    disc = found or _discover(target, example_input, mode, fn, ref)
    converter = _Converter(target, disc, make_plan(disc))
    if disc.probed and converter._split_needed()[1]:
        # a shared module needs different activations per call, or an in-place ReLU's input
        # may be read later: that takes graph nodes
        disc = _discover(target, example_input, mode, fn, ref, trace=True)
        converter = _Converter(target, disc, make_plan(disc))
    converter.same_input = found is None
    try:
        return _convert_checked(converter, ref, args, mode, unchecked, fn)
    except ConversionCheckError:
        if found is not None or mode != "auto":
            raise
        # the fast discovery (our own heuristic) skipped a module hiding a ReLU: trace it all
        disc = _discover(target, example_input, mode, fn)
        return _convert_checked(_Converter(target, disc, make_plan(disc)), ref, args, mode,
                                unchecked, fn)


def _convert_checked(converter: _Converter, ref, args, mode, unchecked, fn: str
                     ) -> tuple[_Converter, str]:
    """Convert, then self-check; an fx rewrite that fails the check is replaced by the runtime
    path for the functional sites. Raises ConversionCheckError with the model unchanged.

    ``ref`` is the unconverted model's pass under ``no_grad``. Where the conversion will
    regenerate or wrap a forward (exactly when some site is not a whole-module swap), ``ref``
    first becomes a pass with autograd (in place), and the check compares the parameters
    gradients reach: a regenerated forward can lose a ``no_grad`` block."""
    model, disc, plan = converter.model, converter.disc, converter.plan
    if ref is not None and ref.grads is None and converter._split_needed()[1]:
        verify.add_gradients(model, ref, args, fn)
    converter.run()
    if ref is None:
        converter.warnings.append(f"{fn}: the conversion was not self-checked: {unchecked}")
        return converter, f"not run: {unchecked}"
    everything = len(plan) == len(disc.sites)
    try:
        return converter, _check(model, converter, ref, args, everything, fn)
    except BaseException as exc:
        converter.abort()
        if not isinstance(exc, ConversionCheckError) or not converter.rewritten or mode != "auto":
            raise
        same_input, converter = converter.same_input, _Converter(model, disc, plan, forced=(
            f"the fx rewrite failed the self-check ({str(exc).split(': ', 1)[1][:160]})"))
        converter.same_input = same_input
        converter.run()
        try:
            return converter, _check(model, converter, ref, args, everything, fn)
        except ConversionCheckError:
            converter.abort()
            raise exc from None
        except BaseException:
            converter.abort()
            raise


def _forwards_changed(converter: _Converter) -> bool:
    """Whether a forward was regenerated or wrapped: only then can gradients reach other
    parameters at ``cap=inf`` (a module swap keeps every forward's code, and the check runs
    the sites' own ReLU in the new modules)."""
    return bool(converter.rewritten or converter.runtime)


def _check(model: nn.Module, converter: _Converter, ref: Any, args: tuple, all_sites: bool,
           fn: str) -> str:
    summary, notes = verify.check(
        model, ref, args, converter.installed(), all_sites, fn,
        _forwards_changed(converter), len(converter.used) if converter.same_input else None,
        frozenset(id(old) for _, _, old in converter.record.replaced))
    converter.warnings.extend(notes)
    return summary
