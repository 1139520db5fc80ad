"""What produced a results file: digests of the model, the data, the threat model, the attacks
and the config, compared on resume, merge and across distributed ranks.

Tensors are hashed where they live (CPU or GPU), in chunks of :data:`CHUNK` words, by a
128-bit linear hash: the tensor's bytes as int32 words ``v_i``,
``h_k = sum_i w_k(i) * v_i mod 2**64`` with odd pseudo-random weights ``w_k`` (two of them;
chunk ``j`` scaled by the odd ``2j + 1``), so only 16 bytes per tensor leave the device, and the
same tensor gives the same digest on any device. Any single changed word changes the hash (an
odd weight is invertible mod 2**64). It detects accidental change (retrained weights,
other images), not a collision crafted on purpose. Our own design.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "CHUNK", "DataDigest", "architecture_digest", "attack_digest", "differences", "model_digest",
    "run_fingerprint", "tensor_digest",
]

#: Words hashed per step (the cached weights take 16 x CHUNK bytes per device).
CHUNK = 1 << 20
_MULT = (0x9E3779B97F4A7C15 - (1 << 64), 0xBF58476D1CE4E5B9 - (1 << 64))


def _words(t: Tensor) -> Tensor:
    flat = t.detach().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    raw = flat.view(torch.uint8)
    if raw.numel() % 4:
        raw = torch.cat([raw, raw.new_zeros(4 - raw.numel() % 4)])
    return raw.view(torch.int32)


_WEIGHTS: dict[str, Tensor] = {}


def _weights(device: torch.device) -> Tensor:
    """(2, CHUNK) odd int64 weights, made once per device from a fixed formula."""
    key = str(device)
    if key not in _WEIGHTS:
        i = torch.arange(1, CHUNK + 1, dtype=torch.int64, device=device)
        rows = []
        for mult in _MULT:
            w = i * mult
            w = w ^ (w >> 31)
            rows.append((w * mult) | 1)
        _WEIGHTS[key] = torch.stack(rows)
    return _WEIGHTS[key]


def _linear_hash(t: Tensor) -> bytes:
    """The 128-bit linear hash of ``t``'s bytes, computed on ``t.device`` in chunks; the same
    value on every device (int64 arithmetic wraps mod 2**64 everywhere)."""
    words = _words(t.contiguous())
    weights = _weights(t.device)
    acc = torch.zeros(2, dtype=torch.int64, device=t.device)
    for j, start in enumerate(range(0, words.numel(), CHUNK)):
        v = words[start:start + CHUNK].to(torch.int64)
        part = (weights[:, :v.numel()] * v).sum(1)
        acc += part * (2 * j + 1) if j else part
    return b"".join(int(a).to_bytes(8, "little", signed=True) for a in acc.tolist())


def tensor_digest(t: Tensor) -> str:
    """Hex digest of ``t``'s dtype, shape and values (see the module doc), device-independent."""
    if t.is_meta:
        raise ValueError("a tensor on the meta device has no values to hash; materialise the "
                         "model (load its weights) before evaluating it")
    h = hashlib.sha256(f"{t.dtype}|{tuple(t.shape)}|".encode())
    h.update(_linear_hash(t))
    return h.hexdigest()


def model_digest(model: nn.Module) -> str:
    """SHA-256 over the names and :func:`tensor_digest` of every parameter and buffer."""
    h = hashlib.sha256()
    tensors = [*model.named_parameters(), *model.named_buffers()]
    meta = [name for name, t in tensors if t.is_meta]
    if meta:
        raise ValueError(f"the model's {', '.join(meta[:3])} are on the meta device (not "
                         "materialised); load its weights (e.g. model.to_empty(...) then "
                         "load_checkpoint) before evaluating it")
    for name, t in tensors:
        h.update(f"{name}|{tensor_digest(t)}|".encode())
    return h.hexdigest()


def json_digest(value: Any) -> str:
    """SHA-256 of ``value``'s canonical JSON (sorted keys; unknown objects by ``repr``)."""
    text = json.dumps(value, sort_keys=True, default=repr, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


class DataDigest:
    """Digest of the exact inputs and labels, fed batch by batch: ``{start: digest}`` per batch
    and one digest of them all in order."""

    def __init__(self) -> None:
        self.batches: dict[int, str] = {}
        self.n = 0

    @staticmethod
    def batch(x: Tensor, y: Tensor) -> str:
        return hashlib.sha256(f"{tensor_digest(x)}|{tensor_digest(y.long())}".encode()).hexdigest()

    def update(self, start: int, x: Tensor, y: Tensor) -> str:
        digest = self.batches[start] = self.batch(x, y)
        self.n = max(self.n, start + len(x))
        return digest

    def hexdigest(self) -> str:
        text = "|".join(f"{s}:{d}" for s, d in sorted(self.batches.items()))
        return hashlib.sha256(f"{self.n}|{text}".encode()).hexdigest()


def _const(c: Any) -> str:
    """``repr`` of a code constant, sets sorted (their order changes with the hash seed)."""
    if isinstance(c, frozenset):
        return "frozenset(" + repr(sorted(_const(v) for v in c)) + ")"
    if isinstance(c, tuple):
        return "(" + ", ".join(_const(v) for v in c) + ("," if len(c) == 1 else "") + ")"
    return repr(c)


def _code_parts(fn: Any, nested: bool = False) -> dict[str, Any]:
    """``{"code", "consts"}`` of a function's (or a callable object's ``__call__``) bytecode and
    constants, ``{}`` when it has none: comments and line numbers do not change them, an edited
    expression or number does. ``nested``: also those of the lambdas and comprehensions in it."""
    code = getattr(fn, "__code__", None) or vars(type(fn)).get("__call__")
    code = getattr(code, "__code__", code)
    if code is None or not hasattr(code, "co_code"):
        return {}
    parts: dict[str, Any] = {
        "code": hashlib.sha256(code.co_code).hexdigest(),
        "consts": "[" + ", ".join(_const(c) for c in code.co_consts if not hasattr(c, "co_code")) + "]"}
    inner = [c for c in code.co_consts if hasattr(c, "co_code")]
    if nested and inner:
        parts["nested"] = [_code_parts(_Code(c), nested=True) for c in inner]
    return parts


class _Code:
    """A code object seen as a function (``__code__``), for :func:`_code_parts`."""

    def __init__(self, code: Any) -> None:
        self.__code__ = code


def attack_digest(attack: Any) -> str:
    """Digest of what makes an attack's rows: its class, spec, threat model and, for a user
    function, the function's code (so a changed function under the same name is noticed)."""
    parts: dict[str, Any] = {
        "class": f"{type(attack).__module__}.{type(attack).__qualname__}",
        "spec": attack.spec,
        "threat_model": attack.threat_model.to_dict() if attack.threat_model else None,
        "family": attack.family,
    }
    fn = getattr(attack, "fn", None)
    if fn is not None:
        parts["fn"] = getattr(fn, "__qualname__", type(fn).__qualname__)
        parts.update(_code_parts(fn))
    return json_digest(parts)


#: Attributes every module has (torch's bookkeeping) and ``inplace`` (the same outputs either
#: way): left out of :func:`architecture_digest`.
_MODULE_BOOKKEEPING = frozenset(vars(nn.Module())) | {"inplace"}
#: Modules whose classes are versioned libraries: their code is not hashed (their settings are).
_LIBRARY_MODULES = ("torch.", "relucap_plugin.")


def _attribute(value: Any) -> Any:
    """A JSON-able stand-in for a module attribute that can change its function (numbers,
    strings, tensors, functions, and lists/tuples/dicts of them); ``None`` for anything else."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return repr(value)
    if isinstance(value, Tensor):
        return tensor_digest(value)
    if isinstance(value, (list, tuple)):
        items = [_attribute(v) for v in value]
        return None if any(i is None for i in items) else items
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        items = {k: _attribute(v) for k, v in value.items()}
        return None if any(i is None for i in items.values()) else items
    if callable(value) and not isinstance(value, (type, nn.Module)):
        return _callable(value)
    return None


def _callable(fn: Any) -> dict[str, Any] | None:
    """A function's code, defaults and closure values, or a callable object's class, ``__call__``
    code and attributes (a hook object holding its cap), or a ``functools.partial``'s parts."""
    if isinstance(fn, functools.partial):
        return {"partial": _callable(fn.func), "args": _attribute(list(fn.args)),
                "keywords": _attribute(dict(fn.keywords))}
    parts: dict[str, Any] = _code_parts(fn, nested=True)
    if hasattr(fn, "__code__"):
        cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ())
                 if c.cell_contents is not fn]
        parts["closure"] = [_attribute(c) for c in cells]
        parts["defaults"] = _attribute(list(getattr(fn, "__defaults__", None) or ()))
    elif hasattr(fn, "__dict__"):
        parts["class"] = f"{type(fn).__module__}.{type(fn).__qualname__}"
        parts["attrs"] = {k: _attribute(v) for k, v in sorted(vars(fn).items())}
    return parts or None


def architecture_digest(model: nn.Module) -> str:
    """SHA-256 of what the model computes besides its weights: every submodule's name, class and
    settings (``extra_repr``: caps, strides, Hardtanh limits, dropout rates), its own attributes
    (numbers, plain tensors, functions such as an output selector), its hooks' code, and the code
    of every method of a class that is not torch's or ours (constants in ``forward``, e.g.
    ``x.clamp(0, 0.3)``). Two models with equal weights and another cap, activation or forward
    differ here. Our own design."""
    parts = []
    for name, m in model.named_modules():
        cls = type(m)
        attrs = {k: _attribute(v) for k, v in sorted(vars(m).items()) if k not in _MODULE_BOOKKEEPING}
        hooks = [_callable(h) for d in (m._forward_pre_hooks, m._forward_hooks) for h in d.values()]
        code = {f"{k.__qualname__}.{n}": _code_parts(getattr(f, "__func__", f), nested=True)
                for k in cls.__mro__ if not k.__module__.startswith(_LIBRARY_MODULES)
                and k.__module__ != "builtins" for n, f in sorted(vars(k).items())
                if callable(getattr(f, "__func__", f)) and not isinstance(f, type)}
        parts.append({"name": name, "class": f"{cls.__module__}.{cls.__qualname__}",
                      "settings": m.extra_repr(), "attrs": {k: v for k, v in attrs.items() if v is not None},
                      "hooks": hooks, "code": code})
    return json_digest(parts)


def run_fingerprint(model: nn.Module, data: DataDigest, tm: Any, cfg: Any,
                    attacks: Sequence[Any], forward: nn.Module | None = None) -> dict[str, Any]:
    """What produced a results table: the parts of :data:`PARTS` plus a digest per attack spec;
    stored as ``metadata["fingerprint"]`` and compared on resume, merge and across ranks.
    ``forward``: the module that computes the logits when it wraps ``model`` (an output
    selector); its architecture is recorded instead of the model's."""
    return {
        "model": model_digest(model),
        "architecture": architecture_digest(model if forward is None else forward),
        "data": data.hexdigest(),
        "threat_model": json_digest({k: v for k, v in tm.to_dict().items() if k != "eps"}),
        "config": json_digest({k: cfg.to_dict().get(k) for k in ("seed", "batch_size",
                                                                 "n_samples")}),
        "attacks": {a.spec: attack_digest(a) for a in attacks},
    }


#: What each part of a fingerprint means, and how to change it back (for messages).
PARTS = {
    "model": "the model's weights and buffers",
    "architecture": "the model's architecture (module types and settings such as caps, its "
                    "attributes, forward code, or the output= selector)",
    "data": "the inputs or labels (content or order)",
    "threat_model": "the threat model (norm, bounds, steps, ...; eps may differ)",
    "config": "the config (seed, batch size, number of samples)",
}


def differences(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """The parts of two fingerprints that differ, described; attacks compared per spec present
    in both (a resumed run may add attacks)."""
    out = [PARTS.get(k, k) for k in PARTS if k in a and k in b and a[k] != b[k]]
    aa, ba = a.get("attacks") or {}, b.get("attacks") or {}
    clash = sorted(s for s in set(aa) & set(ba) if aa[s] != ba[s])
    if clash:
        out.append(f"the settings of attack(s) {', '.join(clash)}")
    return out
