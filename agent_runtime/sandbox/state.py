"""Episode state of the sandbox: how an action's variables reach the next step.

Each action runs in a fresh process, so the variables of an episode travel as bytes between
steps (``EpisodeState`` in ``host.py`` holds them; the host never unpickles them).  A state
records each variable in the cheapest form that brings it back:

- ``stars``: modules star-imported (``from sympy import *``), re-imported first;
- ``imports``: variable -> ``"module"`` or ``"module:attribute"``, for what ``import`` and
  ``from m import a`` bound and the code did not rebind;
- ``defs``: variable -> source of the statement that made it, for functions and classes the code
  defined (pickle stores those only by name, so their ``def``/``class``/``f = lambda ...``
  statement is run again);
- ``values``: variable -> pickle, one per variable so that one unpicklable value (a generator,
  an open file) loses only itself.  Objects shared between two variables come back as copies.

Restoring runs definitions and unpickles values in rounds until nothing changes, so a class
restored after the instance needing it, or a ``def`` whose default is a variable, still comes
back.  Unpickling only reaches the allowed modules and the action's own namespace.  Runs inside
the worker only.
"""

from __future__ import annotations

import ast
import io
import pickle
import sys
import types
from dataclasses import dataclass, field

from agent_runtime.sandbox.guard import (
    GuardedModule,
    ImportPolicy,
    check_code,
    guarded_module_name,
    in_denied_module,
)

STATE_FORMAT = 2
MAX_STATE_BYTES = 64 << 20
_COPYREG_ALLOWED = frozenset({"_reconstructor", "__newobj__", "__newobj_ex__"})


@dataclass
class Bindings:
    """How names got bound at module level: by one action (``step_bindings``) or carried from the
    earlier steps (``restore_state``, where ``defs`` also keeps the object each source made)."""

    sources: dict[str, str] = field(default_factory=dict)  # name -> def/class/assignment source
    attributes: dict[str, str] = field(default_factory=dict)  # name -> "module:attribute"
    stars: list[str] = field(default_factory=list)  # star-imported modules
    defs: dict[str, tuple[str, object]] = field(default_factory=dict)  # restored: name -> (source, object)


def step_bindings(tree: ast.Module) -> Bindings:
    """The module-level bindings of an action (including inside if/for/while/with/try/match,
    not inside functions or classes); for a name bound twice the last statement wins."""
    found = Bindings()

    def record(name: str, node: ast.AST) -> None:
        found.sources.pop(name, None)  # re-insert: later definitions are re-run later
        found.sources[name] = ast.unparse(node)

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                record(node.name, node)
                continue
            if isinstance(node, ast.ImportFrom) and node.module:
                for alias in node.names:
                    if alias.name == "*":
                        found.stars.append(node.module)
                    else:
                        found.attributes[alias.asname or alias.name] = f"{node.module}:{alias.name}"
            elif isinstance(node, ast.Assign) and all(isinstance(t, ast.Name) for t in node.targets):
                for target in node.targets:
                    record(target.id, node)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value:
                record(node.target.id, node)
            for name in ("body", "orelse", "finalbody"):
                visit(getattr(node, name, []))
            for handler in getattr(node, "handlers", []):
                visit(handler.body)
            for case in getattr(node, "cases", []):
                visit(case.body)

    visit(tree.body)
    return found


def _made_by_code(value: object) -> bool:
    """True for functions and classes the action defined (pickle stores those only by name)."""
    is_definition = isinstance(value, (types.FunctionType, type)) or (
        callable(value) and hasattr(value, "__wrapped__"))  # functools.wraps / lru_cache wrappers
    return is_definition and getattr(value, "__module__", None) == "__main__"


def _star_values(stars: list[str], policy: ImportPolicy) -> dict[str, object]:
    """What ``from m import *`` binds, for every module in ``stars``."""
    values: dict[str, object] = {}
    for module_name in stars:
        proxy = policy.import_module(module_name)
        for name in proxy.__all__:
            values[name] = getattr(proxy, name)
    return values


def _imported_attribute(reference: str) -> object:
    """The object ``from module import attribute`` binds (None if it is gone)."""
    module_name, _, attribute = reference.partition(":")
    module = sys.modules.get(module_name)
    return None if module is None else vars(module).get(attribute)


class _StateUnpickler(pickle.Unpickler):
    """Loads the outer state container: plain dicts, lists, strings and bytes, no globals at all."""

    def find_class(self, module: str, name: str) -> object:
        raise pickle.UnpicklingError(f"unexpected global {module}.{name} in a sandbox state")


class _ValueUnpickler(pickle.Unpickler):
    """Loads one variable: globals only from the allowed modules, the safe builtins and the
    action's own namespace (``__main__``)."""

    def __init__(self, data: bytes, namespace: dict, policy: ImportPolicy):
        super().__init__(io.BytesIO(data))
        self._namespace = namespace
        self._policy = policy

    def find_class(self, module: str, name: str) -> object:
        if module == "__main__":
            head, *rest = name.split(".")
            obj = self._namespace[head]  # KeyError: not restored yet, retried next round
            for part in rest:
                obj = getattr(obj, part)
            return obj
        if module == "builtins":
            safe_builtins = self._namespace["__builtins__"]
            if name in safe_builtins:
                return safe_builtins[name]
        elif module == "copyreg" and name in _COPYREG_ALLOWED:
            return super().find_class(module, name)
        elif module.split(".")[0] in self._policy.allowed and not in_denied_module(module):
            return self._policy.guard(super().find_class(module, name), f"{module}.{name}")
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a sandbox state")


def _classify(namespace: dict, step: Bindings, carried: Bindings, policy: ImportPolicy):
    """Sort the namespace into (imports, defs, values to pickle); star-imported names are dropped."""
    attributes = {**carried.attributes, **step.attributes}
    star_values = _star_values(carried.stars + [m for m in step.stars if m not in carried.stars], policy)
    imports: dict[str, str] = {}
    defs = {name: source for name, (source, obj) in carried.defs.items()
            if name not in step.sources and namespace.get(name) is obj}
    to_pickle: dict[str, object] = {}
    for name, value in namespace.items():
        if (name.startswith("__") and name.endswith("__")) or name in defs:
            continue
        if isinstance(value, GuardedModule):
            imports[name] = guarded_module_name(value)
        elif name in attributes and value is _imported_attribute(attributes[name]):
            imports[name] = attributes[name]  # still what `from m import a` bound
        elif name in star_values and value is star_values[name]:
            continue
        elif isinstance(value, io.IOBase) and value.closed:
            continue  # `with open(...) as f` leaves a closed file behind: nothing worth a note
        elif name in step.sources and _made_by_code(value):
            defs[name] = step.sources[name]
        else:
            to_pickle[name] = value
    return imports, defs, to_pickle


def save_state(namespace: dict, step: Bindings, carried: Bindings,
               policy: ImportPolicy) -> tuple[bytes, list[str], list[str]]:
    """Serialise the action's variables; return (blob, variable names kept, notes on what was not)."""
    imports, defs, to_pickle = _classify(namespace, step, carried, policy)
    values: dict[str, bytes] = {}
    unpicklable = []
    for name, value in to_pickle.items():
        try:
            values[name] = pickle.dumps(value, protocol=5)
        except (Exception, RecursionError, MemoryError):  # noqa: BLE001 - generators, locks, lambdas, ...
            unpicklable.append(name)
    too_large = []
    total = sum(len(v) for v in values.values())
    for name in sorted(values, key=lambda n: len(values[n]), reverse=True):
        if total <= MAX_STATE_BYTES:
            break
        total -= len(values.pop(name))
        too_large.append(name)
    notes = []
    if unpicklable:
        notes.append(f"not kept for the next step (cannot be serialised): {', '.join(sorted(unpicklable))}")
    if too_large:
        notes.append(f"not kept for the next step (state over {MAX_STATE_BYTES >> 20} MB): "
                     f"{', '.join(sorted(too_large))}")
    stars = carried.stars + [m for m in step.stars if m not in carried.stars]
    state = {"format": STATE_FORMAT, "stars": stars, "imports": imports, "defs": defs, "values": values}
    return pickle.dumps(state, protocol=5), sorted([*imports, *defs, *values]), notes


def restore_state(blob: bytes, namespace: dict, policy: ImportPolicy) -> tuple[Bindings, list[str]]:
    """Fill ``namespace`` (already holding the safe ``__builtins__``) from a state blob; return the
    carried bindings for ``save_state`` and notes on what could not be restored.  b"" is empty."""
    carried = Bindings()
    if not blob:
        return carried, []
    state = _StateUnpickler(io.BytesIO(blob)).load()
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError("not a sandbox state of this version")
    lost = []
    for module_name in state["stars"]:
        try:
            namespace.update(_star_values([module_name], policy))
        except Exception:  # noqa: BLE001 - whatever went wrong, the rest of the state still comes back
            lost.append(f"from {module_name} import *")
            continue
        carried.stars.append(module_name)
    for name, reference in state["imports"].items():
        module_name, _, attribute = reference.partition(":")
        try:
            proxy = policy.import_module(module_name)
            namespace[name] = getattr(proxy, attribute) if attribute else proxy
        except Exception:  # noqa: BLE001 - as above
            lost.append(name)
            continue
        if attribute:
            carried.attributes[name] = reference
    pending_defs: dict[str, str] = dict(state["defs"])
    pending_values: dict[str, bytes] = dict(state["values"])
    progress = True
    while progress and (pending_defs or pending_values):
        progress = False
        for name, source in list(pending_defs.items()):
            try:
                exec(compile(check_code(source, policy), "<state>", "exec"), namespace)  # noqa: S102
            except Exception:  # noqa: BLE001, S112 - a NameError on a value not restored yet: next round
                continue
            carried.defs[name] = (source, namespace.get(name))
            del pending_defs[name]
            progress = True
        for name, data in list(pending_values.items()):
            try:
                namespace[name] = _ValueUnpickler(data, namespace, policy).load()
            except Exception:  # noqa: BLE001, S112 - a class not restored yet: next round
                continue
            del pending_values[name]
            progress = True
    lost += [*pending_defs, *pending_values]
    notes = [f"lost from earlier steps (could not be restored): {', '.join(sorted(lost))}"] if lost else []
    return carried, notes
