"""Site selection and recipes: which sites a ``sites=`` selector picks and what a ``cap=``
value installs at each; validates everything and changes nothing."""

from __future__ import annotations

import copy
import fnmatch
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from .._format import short_repr
from ..activations import CappedReLU, validate_cap
from ..registry import create_activation
from ._records import ReluSite, _name_list

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
            f"records, a predicate on a ReluSite, or 'bottleneck'; got {type(selector).__name__} {selector!r:.80}"
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


_FORMS = ("a number (math.inf = plain ReLU), a 1-D tensor/list of per-channel caps, an activation "
          "spec ('pssilu', 'learnable_capped_relu(cap=1)'), an activation class or factory, or a "
          "mapping {site name or glob: cap}")


def _recipe(value: Any, where: str) -> _Recipe:
    if isinstance(value, (numbers.Number, Tensor)) or (
        isinstance(value, (list, tuple)) and all(isinstance(v, numbers.Number) for v in value)
    ):
        return _Recipe(cap=validate_cap(value, name=where))
    if isinstance(value, (str, nn.Module)) or callable(value):
        recipe = _Recipe(spec=value)
        try:
            recipe.build(ReluSite("", 0, "module", "nn.ReLU", "", "", False, False))  # fail early
        except (ValueError, TypeError) as exc:
            raise (TypeError if isinstance(exc, TypeError) else ValueError)(
                f"{where}={short_repr(value)} is not a usable activation spec ({exc}); "
                f"{where} takes {_FORMS}") from exc
        return recipe
    raise TypeError(f"{where} must be {_FORMS}; got {type(value).__name__} {short_repr(value)}")


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
