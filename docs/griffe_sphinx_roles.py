"""Griffe extension for the API reference: Sphinx roles in docstrings become mkdocs links.

The package's docstrings use Sphinx cross references (``:func:`evaluate```,
``:class:`~relucap_plugin.attacks.Attack```). mkdocstrings renders Markdown, so each role is
rewritten, once the whole package is loaded, to an autorefs link ``[evaluate][relucap_plugin.
evaluation.evaluate]`` when its target is a public object of a module rendered on docs/api.md,
and to plain code otherwise (private helpers, torch). Names are resolved like Sphinx does:
the object's class, its module, then the package. Our own tool; griffe reads the source
statically, so the docs environment needs no torch.
"""

from __future__ import annotations

import re
from typing import Any

from griffe import Extension, Object

ROLE = re.compile(r":(?:py:)?(func|class|meth|attr|data|mod|obj|exc):`(~?)([^`<>]+)`")
ROOT = "relucap_plugin"
#: modules that docs/api.md renders (kept in step with it by docs/api.md's own list)
RENDERED = {
    "activations", "registry", "surgery", "threat", "attacks", "adapters", "adapters.base",
    "adapters.art", "adapters.foolbox", "adapters.torchattacks", "adapters.plain_torch",
    "evaluation", "results", "diagnostics", "adaptive", "training", "data", "models", "experiment",
    "report", "distributed", "cli",
}


class SphinxRoles(Extension):
    def on_package(self, *, pkg: Object, **kwargs: Any) -> None:
        if pkg.path != ROOT:
            return
        for obj in _walk(pkg):
            if obj.docstring is not None:
                obj.docstring.value = ROLE.sub(lambda m, o=obj: _link(pkg, o, m), obj.docstring.value)


def _walk(obj: Object):
    yield obj
    for member in obj.members.values():
        if not member.is_alias:
            yield from _walk(member)


def _scopes(obj: Object) -> list[str]:
    out, cur = [], obj
    while cur is not None:
        if cur.is_class or cur.is_module:
            out.append(cur.path)
        cur = cur.parent
    return out


def _find(pkg: Object, path: str) -> Object | None:
    if path != ROOT and not path.startswith(ROOT + "."):
        return None
    cur = pkg
    for part in path.split(".")[1:]:
        try:
            cur = cur.members[part]
            if cur.is_alias:
                cur = cur.final_target
        except Exception:
            return None
    return cur


def _rendered(obj: Object) -> bool:
    parts = obj.path.split(".")[1:]
    if any(p.startswith("_") for p in parts):
        return False
    module = obj.module.path.split(".", 1)[1] if "." in obj.module.path else ""
    return module in RENDERED


def _link(pkg: Object, obj: Object, match: re.Match) -> str:
    _, short, target = match.groups()
    target = target.strip()
    shown = target.rsplit(".", 1)[-1] if short else target
    name = target.lstrip(".")
    candidates = [name] + [f"{scope}.{name}" for scope in _scopes(obj)] + [f"{ROOT}.{name}"]
    for path in candidates:
        found = _find(pkg, path)
        if found is not None and _rendered(found):
            return f"[`{shown}`][{found.path}]"
    return f"`{shown}`"
