"""Python-level guard of the sandbox: the static check of an action and the namespace it runs in.

Defence in depth, not the boundary.  Pure-Python sandboxes are known to leak (numpy can read
and write raw memory, sympy evaluates strings), so the kernel-level isolation in
``isolation.py`` is what contains a determined attacker; this layer turns the common and the
obvious attempts into a clear ``forbidden`` observation before anything runs:

- ``check_code``: parse, then reject imports outside the allowlist, dunder and private
  attribute access (``__subclasses__``, ``__globals__``, ``random._os``), frame and traceback
  attributes (``f_back``, ``gi_frame``, ``tb_frame``), and names like ``eval``/``exec``.
- ``make_builtins``: a reduced ``__builtins__`` (no eval/exec/compile/globals/vars/input),
  an ``__import__`` that enforces the allowlist and hands out ``GuardedModule`` proxies, an
  ``open`` confined to the working directory, and ``getattr``-family functions applying the same
  attribute rules as the static check.
- ``GuardedModule``: a read-only module proxy that refuses private attributes, modules outside
  the allowlist (``sympy.printing.preview.os``) and a deny-list of escape hatches (file I/O in
  numpy, ``lambdify``, ``operator.attrgetter``, ...).
- ``patch_libraries``: makes the string evaluators of sympy and typing run the same check.

Standard library only and no project imports: the worker imports it without the rest of the project.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import os
import sys
import types

ACTION_FILENAME = "<action>"

# Dunder attributes that expose nothing beyond what the provided builtins already give
# (``type(x)`` is available, so is ``x.__class__``); everything else starting with "_" is refused.
DUNDER_ATTRS_ALLOWED = frozenset({
    "__init__", "__new__", "__post_init__", "__name__", "__qualname__", "__doc__", "__class__",
    "__version__", "__repr__", "__str__", "__format__", "__len__", "__iter__", "__next__",
    "__contains__", "__getitem__", "__setitem__", "__delitem__", "__call__", "__hash__", "__bool__",
    "__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__add__", "__sub__", "__mul__",
    "__truediv__", "__floordiv__", "__mod__", "__pow__", "__neg__", "__pos__", "__abs__",
    "__enter__", "__exit__",
})
# Public attribute names that lead to frames (and from there to unguarded globals), or to raw
# memory and files through numpy.
DANGEROUS_ATTRS = frozenset({
    "f_back", "f_builtins", "f_code", "f_globals", "f_locals", "f_trace", "gi_frame", "gi_code",
    "gi_yieldfrom", "cr_frame", "cr_code", "cr_await", "ag_frame", "ag_code", "ag_await",
    "tb_frame", "tb_next", "func_globals", "ctypes", "tofile", "dump",
})
FORBIDDEN_NAMES = frozenset({
    "eval", "exec", "compile", "globals", "locals", "vars", "breakpoint", "input", "help",
    "exit", "quit", "memoryview", "open_code",
})
SAFE_BUILTIN_NAMES = (
    "abs", "all", "any", "ascii", "bin", "bool", "bytearray", "bytes", "callable", "chr",
    "classmethod", "complex", "dict", "dir", "divmod", "enumerate", "filter", "float", "format",
    "frozenset", "hash", "hex", "id", "int", "isinstance", "issubclass", "iter", "len", "list",
    "map", "max", "min", "next", "object", "oct", "ord", "pow", "print", "property", "range",
    "repr", "reversed", "round", "set", "slice", "sorted", "staticmethod", "str", "sum", "super",
    "tuple", "type", "zip", "NotImplemented", "Ellipsis", "__build_class__",
)
# Submodules of allowed packages that are escape hatches (code generation + exec, subprocesses,
# ctypes, file I/O, test runners).  A module matches when its name equals an entry or starts
# with it followed by a dot; functions and classes defined in them are refused as well.
DENIED_MODULES = (
    "numpy.ctypeslib", "numpy.f2py", "numpy.distutils", "numpy.testing", "numpy._pytesttester",
    "numpy.lib.npyio", "numpy.lib._npyio_impl", "numpy.lib.format", "numpy.lib._format_impl",
    "numpy.lib._datasource", "numpy.lib._iotools",
    "sympy.utilities.lambdify", "sympy.utilities.autowrap", "sympy.utilities.codegen",
    "sympy.utilities.runtests", "sympy.utilities.source", "sympy.utilities.pkgdata",
    "sympy.utilities.matchpy_connector", "sympy.utilities.benchmarking", "sympy.utilities.timeutils",
    "sympy.utilities.pytest", "sympy.utilities.tmpfiles", "sympy.testing", "sympy.external",
    "sympy.interactive", "sympy.plotting", "sympy.printing.preview", "sympy.parsing.ast_parser",
    "sympy.parsing.latex", "sympy.parsing.autolev", "sympy.parsing.c", "sympy.parsing.fortran",
    "sympy.parsing.sym_expr", "sympy.parsing.maxima",
)
# Individual objects re-exported under innocent names (their ``__module__`` says "numpy").
DENIED_OBJECTS = (
    "numpy.load", "numpy.save", "numpy.savez", "numpy.savez_compressed", "numpy.loadtxt",
    "numpy.savetxt", "numpy.genfromtxt", "numpy.fromfile", "numpy.fromregex", "numpy.memmap",
    "numpy.test", "numpy.show_config", "numpy.show_runtime", "numpy.rec.fromfile",
    "numpy.lib.stride_tricks.as_strided",
    "sympy.lambdify", "sympy.preview", "sympy.init_session", "sympy.init_printing", "sympy.test",
    "sympy.doctest", "sympy.utilities.misc.find_executable",
    "operator.attrgetter", "operator.methodcaller", "string.Formatter",
)


class ForbiddenError(Exception):
    """Raised at run time when the code reaches for something the sandbox does not allow."""


class ForbiddenCode(Exception):
    """Raised by ``check_code``: the action is refused before it runs."""

    def __init__(self, message: str, lineno: int | None):
        super().__init__(message)
        self.lineno = lineno


def attribute_refusal(name: str) -> str | None:
    """Why reading attribute ``name`` is refused, or None if it is allowed."""
    if name in DANGEROUS_ATTRS:
        return f"attribute '{name}' is not allowed in the sandbox"
    if name.startswith("_") and name not in DUNDER_ATTRS_ALLOWED:
        return f"attribute '{name}' is not allowed in the sandbox (names starting with '_' are private)"
    return None


class ImportPolicy:
    """Which modules and objects user code may reach.  Build it, import, then ``deny_objects()``."""

    def __init__(self, allowed_imports: tuple[str, ...]):
        self.allowed = frozenset(allowed_imports)
        self._denied_ids: set[int] = set()
        self._denied_keep: list[object] = []  # keeps the denied objects alive so ids stay unique

    def module_refusal(self, name: str) -> str | None:
        """Why importing module ``name`` is refused, or None."""
        if name.split(".")[0] not in self.allowed:
            allowed = ", ".join(sorted(self.allowed))
            return f"import of '{name}' is not allowed in the sandbox (allowed modules: {allowed})"
        if in_denied_module(name):
            return f"module '{name}' is not available in the sandbox"
        if any(part.startswith("_") for part in name.split(".")):
            return f"import of private module '{name}' is not allowed in the sandbox"
        return None

    def deny_objects(self) -> list[str]:
        """Resolve ``DENIED_OBJECTS`` among the imported modules; return the names that resolved."""
        resolved = []
        for dotted in DENIED_OBJECTS:
            module_name, _, attr = dotted.rpartition(".")
            module = sys.modules.get(module_name)
            if module is not None and hasattr(module, attr):
                obj = getattr(module, attr)
                self._denied_ids.add(id(obj))
                self._denied_keep.append(obj)
                resolved.append(dotted)
        return resolved

    def guard(self, value: object, qualname: str) -> object:
        """Return ``value`` as user code may see it (modules proxied) or raise ForbiddenError."""
        if isinstance(value, types.ModuleType):
            refusal = self.module_refusal(value.__name__)
            if refusal:
                raise ForbiddenError(f"{qualname}: {refusal}")
            return GuardedModule(value, self)
        if id(value) in self._denied_ids:
            raise ForbiddenError(f"{qualname} is not available in the sandbox")
        if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
            module = value.__module__
            if isinstance(module, str) and in_denied_module(module):
                raise ForbiddenError(f"{qualname} (from {module}) is not available in the sandbox")
        return value

    def import_module(self, name: str) -> GuardedModule:
        """Import an allowed module and return its proxy; ForbiddenError otherwise."""
        refusal = self.module_refusal(name)
        if refusal:
            raise ForbiddenError(refusal)
        return GuardedModule(importlib.import_module(name), self)


def in_denied_module(name: str) -> bool:
    """True when module `name` is one of DENIED_MODULES or inside one."""
    return any(name == d or name.startswith(d + ".") for d in DENIED_MODULES)


class GuardedModule:
    """Read-only view of an allowed module: what ``import`` gives user code."""

    __slots__ = ("_GuardedModule__module", "_GuardedModule__policy")

    def __init__(self, module: types.ModuleType, policy: ImportPolicy):
        object.__setattr__(self, "_GuardedModule__module", module)
        object.__setattr__(self, "_GuardedModule__policy", policy)

    def __getattr__(self, name: str) -> object:
        module = self.__module
        if name == "__name__":
            return module.__name__
        if name == "__all__":  # what `from m import *` copies: public names that pass the guard
            return self.__dir__()
        refusal = attribute_refusal(name)
        if refusal:
            raise ForbiddenError(f"{module.__name__}.{name}: {refusal}")
        try:
            value = getattr(module, name)
        except AttributeError:
            # `from pkg import sub` falls back to sys.modules when getattr fails: answer here so a
            # loaded-but-unbound submodule can never come back unguarded.
            value = sys.modules.get(f"{module.__name__}.{name}")
            if value is None:
                raise AttributeError(f"module '{module.__name__}' has no attribute '{name}'") from None
        return self.__policy.guard(value, f"{module.__name__}.{name}")

    def __setattr__(self, name: str, value: object) -> None:
        qualified = f"{self.__module.__name__}.{name}"
        raise ForbiddenError(f"modules are read-only in the sandbox (cannot set {qualified})")

    def __delattr__(self, name: str) -> None:
        qualified = f"{self.__module.__name__}.{name}"
        raise ForbiddenError(f"modules are read-only in the sandbox (cannot delete {qualified})")

    def __dir__(self) -> list[str]:
        module = self.__module
        names = module.__dict__.get("__all__") or [n for n in vars(module) if not n.startswith("_")]
        public = []
        for name in names:
            if not isinstance(name, str) or attribute_refusal(name):
                continue
            try:
                self.__getattr__(name)
            except Exception:  # noqa: BLE001, S112 - denied or broken lazy attribute: not offered
                continue
            public.append(name)
        return public

    def __repr__(self) -> str:
        return f"<module '{self.__module.__name__}' (sandboxed)>"


def guarded_module_name(proxy: GuardedModule) -> str:
    """Name of the module behind a proxy (used to carry imports from one step to the next)."""
    return object.__getattribute__(proxy, "_GuardedModule__module").__name__


def _node_refusal(node: ast.AST, policy: ImportPolicy) -> str | None:
    """The reason a single AST node is refused, or None."""
    if isinstance(node, ast.Import):
        for alias in node.names:
            refusal = policy.module_refusal(alias.name) or _name_refusal(alias.asname)
            if refusal:
                return refusal
    elif isinstance(node, ast.ImportFrom):
        if node.level:
            return "relative imports are not allowed in the sandbox"
        refusal = policy.module_refusal(node.module or "")
        if refusal:
            return refusal
        for alias in node.names:
            if alias.name != "*" and (alias.name.startswith("_") or _name_refusal(alias.asname)):
                return f"importing private name '{alias.name}' is not allowed in the sandbox"
    elif isinstance(node, ast.Attribute):
        if isinstance(node.ctx, (ast.Store, ast.Del)) and node.attr.startswith("__"):
            return f"assigning attribute '{node.attr}' is not allowed in the sandbox"
        return attribute_refusal(node.attr)
    elif isinstance(node, ast.Name):
        if node.id == "__name__" and isinstance(node.ctx, ast.Load):
            return None
        return _name_refusal(node.id)
    elif isinstance(node, (ast.Global, ast.Nonlocal)):
        return next(filter(None, map(_name_refusal, node.names)), None)
    elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)):
        return _name_refusal(node.name)
    elif isinstance(node, ast.MatchMapping):
        return _name_refusal(node.rest)
    return None


def _name_refusal(name: str | None) -> str | None:
    if name is None:
        return None
    if name in FORBIDDEN_NAMES:
        return f"'{name}' is not allowed in the sandbox"
    if name.startswith("__") and name.endswith("__"):
        return f"name '{name}' is not allowed in the sandbox"
    return None


def check_code(code: str, policy: ImportPolicy, mode: str = "exec") -> ast.AST:
    """Parse ``code`` and refuse it if any node breaks the rules; return the tree to compile.

    Raises SyntaxError for code that does not parse and ForbiddenCode (with the line) for code
    the sandbox refuses.  Runs inside the worker only: parsing hostile input in the host could
    crash the host.
    """
    tree = ast.parse(code, filename=ACTION_FILENAME, mode=mode)
    for node in ast.walk(tree):
        refusal = _node_refusal(node, policy)
        if refusal:
            raise ForbiddenCode(refusal, getattr(node, "lineno", None))
    return tree


def make_guarded_getattrs(policy: ImportPolicy) -> dict[str, object]:
    """``getattr``/``hasattr``/``setattr``/``delattr`` with the static check's attribute rules."""

    def guarded_getattr(obj, name, *default):
        refusal = attribute_refusal(name) if isinstance(name, str) else None
        if refusal:
            raise ForbiddenError(refusal)
        return getattr(obj, name, *default)

    def guarded_hasattr(obj, name):
        refusal = attribute_refusal(name) if isinstance(name, str) else None
        if refusal:
            raise ForbiddenError(refusal)
        return hasattr(obj, name)

    def guarded_setattr(obj, name, value):
        if isinstance(name, str) and name.startswith("_"):
            raise ForbiddenError(f"setting attribute '{name}' is not allowed in the sandbox")
        setattr(obj, name, value)

    def guarded_delattr(obj, name):
        if isinstance(name, str) and name.startswith("_"):
            raise ForbiddenError(f"deleting attribute '{name}' is not allowed in the sandbox")
        delattr(obj, name)

    return {"getattr": guarded_getattr, "hasattr": guarded_hasattr, "setattr": guarded_setattr,
            "delattr": guarded_delattr}


def make_open(work_dir: str):
    """``open`` restricted to paths inside ``work_dir`` (after resolving symlinks)."""
    root = os.path.realpath(work_dir)

    def guarded_open(file, mode="r", buffering=-1, encoding=None, errors=None, newline=None):
        if not isinstance(file, str):
            raise ForbiddenError("open() takes a path (str) inside the working directory")
        path = os.path.realpath(os.path.join(root, file))
        if os.path.commonpath([root, path]) != root:
            raise ForbiddenError(f"open() outside the working directory is not allowed: {file!r}")
        return open(path, mode, buffering, encoding, errors, newline)

    return guarded_open


def make_builtins(policy: ImportPolicy, work_dir: str | None, extra: dict[str, object]) -> dict[str, object]:
    """The ``__builtins__`` of an action: safe builtins, every exception class, guarded import,
    getattr family and (when ``work_dir`` is given) open, plus ``extra`` (final_answer, ...)."""
    safe = {name: getattr(builtins, name) for name in SAFE_BUILTIN_NAMES}
    safe.update({name: value for name, value in vars(builtins).items()
                 if isinstance(value, type) and issubclass(value, BaseException)})
    safe.update(make_guarded_getattrs(policy))

    def guarded_import(name, globals=None, locals=None, fromlist=(), level=0):
        if level:
            raise ForbiddenError("relative imports are not allowed in the sandbox")
        if name.split(".")[0] not in policy.allowed or in_denied_module(name):
            if name in sys.modules and not in_denied_module(name):
                # C code importing lazily (datetime's _strptime, numpy internals) reaches the
                # builtins of the calling frame, i.e. this function; it only wants the side
                # effect.  User code never gets here: check_code refused its import statement.
                return None
            raise ForbiddenError(policy.module_refusal(name) or f"import of '{name}' is not allowed")
        module = importlib.import_module(name)  # private submodules too: numpy's C code imports them lazily
        return GuardedModule(module if fromlist else sys.modules[name.split(".")[0]], policy)

    safe["__import__"] = guarded_import
    if work_dir is not None:
        safe["open"] = make_open(work_dir)
    safe.update(extra)
    return safe


def patch_libraries(policy: ImportPolicy) -> list[str]:
    """Route the string evaluators of loaded libraries through ``check_code``; return what was patched.

    sympy's ``sympify``/``parse_expr`` end in ``eval_expr`` with a namespace holding the real
    builtins (``__import__`` included); ``typing`` evaluates string annotations through
    ``ForwardRef``.  Both would run text that the static check never saw.
    """
    patched = []
    if "sympy" in sys.modules:  # sympify imports its parser lazily: load it now so it gets patched
        importlib.import_module("sympy.parsing.sympy_parser")
    parser = sys.modules.get("sympy.parsing.sympy_parser")
    if parser is not None:
        original_eval = parser.eval_expr
        pure = make_builtins(policy, None, {})
        del pure["__import__"]
        real = {id(v) for v in vars(builtins).values()}

        def guarded_eval_expr(code, local_dict, global_dict):
            check_code(code, policy, mode="eval")
            namespace = {}
            for key, value in global_dict.items():
                if id(value) not in real:
                    namespace[key] = value
                elif key in pure:  # parse_expr copies the real builtin functions in: swap them
                    namespace[key] = pure[key]
            namespace["__builtins__"] = pure
            return original_eval(code, local_dict, namespace)

        parser.eval_expr = guarded_eval_expr
        patched.append("sympy.parsing.sympy_parser.eval_expr")
    typing = sys.modules.get("typing")
    if typing is not None:
        original_init = typing.ForwardRef.__init__

        def guarded_forward_ref(self, arg, *args, **kwargs):
            if isinstance(arg, str):
                check_code(arg, policy, mode="eval")
            original_init(self, arg, *args, **kwargs)

        typing.ForwardRef.__init__ = guarded_forward_ref
        patched.append("typing.ForwardRef")
    return patched
