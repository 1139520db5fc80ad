"""A deep copy of a model with the result of ``copy.deepcopy``, in a fraction of its time.

``copy.deepcopy`` of an ``nn.Module`` goes through ``__reduce_ex__``, ``copyreg`` and a
reconstruction per object: ghostnetv3_050 (2,269 modules) takes 0.3-0.5 s, more than the rest
of ``cap_relus``. Almost all of that is the bookkeeping of modules and their many small dicts
(hooks, parameters, buffers, children). :func:`copy_model` copies exactly those itself, for
module classes that keep ``nn.Module``'s own pickling (no ``__deepcopy__``, ``__reduce__``,
``__getstate__`` or slots of their own), plain parameters and buffers, and hands everything else (tensors,
parameters, hooks, custom classes) to ``copy.deepcopy`` with the same memo, so sharing (tied
weights, a module registered twice) comes out as ``copy.deepcopy`` makes it. Our own design.

Unlike ``copy.deepcopy``, the objects copied here are not kept alive in the memo: each is held
by the model (a module, one of its dicts, a parameter, a buffer), which outlives the copy, so
no id in the memo can be reused while it is in use. Strings and other atomic values are
shared without a call, as ``copy.deepcopy`` shares them.
"""

from __future__ import annotations

import copy
import functools
from collections import OrderedDict
from typing import Any

import torch
from torch import nn

from .._torch import all_modules

_ATOMIC = frozenset({t for t, f in copy._deepcopy_dispatch.items() if f is copy._deepcopy_atomic}
                    | {torch.dtype})
_NIL = object()
_LAZY = nn.parameter.UninitializedTensorMixin
_CONTAINERS = frozenset({dict, OrderedDict, set})
_SHARED = "relucap shared storages"
_MODULE_STATE = frozenset(nn.Module().__dict__)  # what every module has: no tensor among it  # a memo key that no id() can be


@functools.cache
def _plain(cls: type) -> bool:
    """True if ``copy.deepcopy`` would copy instances of this module class through
    ``nn.Module``'s own ``__getstate__`` (and the class's ``__setstate__``): then
    :func:`_copy` may."""
    if (getattr(cls, "__deepcopy__", None) is not None
            or cls.__reduce_ex__ is not object.__reduce_ex__
            or cls.__reduce__ is not object.__reduce__
            or cls.__getstate__ is not nn.Module.__getstate__
            or getattr(cls, "__getnewargs_ex__", None) is not None
            or getattr(cls, "__getnewargs__", None) is not None):
        return False
    return not any("__slots__" in vars(klass) for klass in cls.__mro__ if klass is not object)


def _copy(obj: Any, memo: dict[int, Any]) -> Any:
    cls = type(obj)
    if cls in _ATOMIC:
        return obj
    found = memo.get(id(obj), _NIL)
    if found is not _NIL:
        return found
    if cls is dict or cls is OrderedDict:
        new = cls()
        memo[id(obj)] = new
        for key, value in obj.items():
            new[key if type(key) is str else _copy(key, memo)] = (
                value if type(value) in _ATOMIC else _copy(value, memo))
        return new
    if cls is tuple and all(type(e) in _ATOMIC for e in obj):  # as copy.deepcopy: itself
        return obj
    if cls in (set, frozenset) and all(type(e) in _ATOMIC for e in obj):
        new = cls(obj)
        memo[id(obj)] = new
        return new
    if cls is nn.Parameter:  # what nn.Parameter.__deepcopy__ does
        new = nn.Parameter(obj.data.clone(memory_format=torch.preserve_format), obj.requires_grad)
        memo[id(obj)] = new
        return new
    if cls is torch.Tensor and _plain_buffer(obj, memo):
        new = obj.clone()
        memo[id(obj)] = new
        return new
    if isinstance(obj, nn.Module) and _plain(cls):
        new = cls.__new__(cls)
        memo[id(obj)] = new
        state = obj.__dict__.copy()  # atomic values stay; the others are replaced below
        state.pop("_compiled_call_impl", None)
        for k, v in state.items():
            kind = type(v)
            if kind in _ATOMIC:
                continue
            if kind in _CONTAINERS and not v:
                if k in _MODULE_STATE:  # nn.Module's own hook dicts: nothing else holds them
                    state[k] = kind()
                elif id(v) not in memo:
                    state[k] = memo[id(v)] = kind()
                else:
                    state[k] = memo[id(v)]
            else:
                state[k] = _copy(v, memo)
        if cls.__setstate__ is nn.Module.__setstate__ and state.keys() >= _MODULE_STATE:
            new.__dict__.update(state)  # what nn.Module.__setstate__ does when nothing is missing
        else:
            new.__setstate__(state)
        return new
    return copy.deepcopy(obj, memo)


def _plain_buffer(t: torch.Tensor, memo: dict[int, Any]) -> bool:
    """True for a tensor that ``clone`` copies exactly as ``copy.deepcopy`` does: a dense,
    contiguous leaf on CPU/CUDA owning all of a storage no other tensor of the model uses."""
    return (t.is_leaf and not t.requires_grad and t.grad is None and t.layout == torch.strided
            and t.device.type in ("cpu", "cuda") and not t.is_quantized and not t.is_conj()
            and not t.is_neg() and not t.__dict__ and t.storage_offset() == 0
            and t.is_contiguous() and t.data_ptr() != 0
            and t.untyped_storage().nbytes() == t.numel() * t.element_size()
            and t.data_ptr() not in memo[_SHARED])


def _shared_storages(model: nn.Module) -> set[int]:
    """Data pointers of the storages that more than one buffer or tensor attribute of
    ``model`` uses. Parameters are left out: ``nn.Parameter.__deepcopy__`` clones a parameter's
    data on its own, so a buffer owning a parameter's whole storage comes out of
    ``copy.deepcopy`` as a clone of that storage too, which is what :func:`_copy` makes."""
    tensors: list[Any] = []
    tensor = torch._C.TensorBase  # isinstance(v, torch.Tensor) runs a Python __instancecheck__
    for m in all_modules(model):
        tensors += m._buffers.values()
        d = m.__dict__
        tensors += [d[k] for k in d.keys() - _MODULE_STATE if isinstance(d[k], tensor)]
    seen: set[int] = set()
    shared: set[int] = set()
    for t in dict.fromkeys(t for t in tensors if t is not None and not isinstance(t, _LAZY)
                           and not t.is_meta):  # a lazy module's parameter has no storage yet
        if t.layout == torch.strided and not t.is_quantized:  # no storage object to make
            ptr = t.data_ptr() - t.storage_offset() * t.element_size()
        else:
            ptr = t.untyped_storage().data_ptr()
        (shared if ptr in seen else seen).add(ptr)
    return shared


def copy_model(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """``copy.deepcopy(model, memo)``, faster; ``memo`` maps ids of the originals to copies."""
    memo = {} if memo is None else memo
    memo[_SHARED] = _shared_storages(model)
    try:
        return _copy(model, memo)
    finally:
        del memo[_SHARED]
