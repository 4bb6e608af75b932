"""The installed package: docstrings on everything, type stubs that match the module."""

import ast
import inspect
import os
import re

import numpy as np

import qmoe

PUBLIC = sorted(n for n in dir(qmoe) if not n.startswith("_"))


def stub_path():
    return os.path.join(os.path.dirname(qmoe.__file__), "__init__.pyi")


def test_package_ships_stubs_and_py_typed():
    pkg = os.path.dirname(qmoe.__file__)
    assert os.path.isfile(stub_path())
    assert os.path.isfile(os.path.join(pkg, "py.typed"))


def test_every_public_name_has_a_docstring():
    assert qmoe.__doc__ and qmoe._qmoe.__doc__
    missing = []
    for name in PUBLIC:
        obj = getattr(qmoe, name)
        if inspect.ismodule(obj):
            continue
        if not (obj.__doc__ or "").strip():
            missing.append(name)
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                if attr.startswith("_"):
                    continue
                doc = getattr(member, "__doc__", None) or ""
                if not doc.strip():
                    missing.append(f"{name}.{attr}")
    assert not missing, f"no docstring: {missing}"


def test_stubs_match_the_module():
    with open(stub_path()) as f:
        tree = ast.parse(f.read())
    stub_names = set()
    stub_members = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            stub_names.add(node.name)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            stub_names.add(node.target.id)
        if isinstance(node, ast.ClassDef):
            stub_members[node.name] = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
    runtime = {n for n in PUBLIC if not inspect.ismodule(getattr(qmoe, n))}
    stub_names -= {"PathLike", "FloatArray", "CodecName", "GridName", "__version__"}  # aliases, dunders
    assert runtime == stub_names
    for cls, members in stub_members.items():
        public = {a for a in vars(getattr(qmoe, cls)) if not a.startswith("_")}
        assert public == {m for m in members if not m.startswith("_")}, cls



# ---- stub signatures against the module's ----------------------------------------------------
# A parameter is (name, kind, default): kind an inspect.Parameter kind; default NO_DEFAULT,
# ANY_DEFAULT (a stub's `= ...`: some default, its value not given) or the value itself (a runtime
# default whose text is not a Python literal stays text, as Unreadable).

P = inspect.Parameter
KIND_NAMES = {
    P.POSITIONAL_ONLY: "positional-only",
    P.POSITIONAL_OR_KEYWORD: "positional-or-keyword",
    P.VAR_POSITIONAL: "*args",
    P.KEYWORD_ONLY: "keyword-only",
    P.VAR_KEYWORD: "**kwargs",
}


class Marker:
    def __init__(self, text):
        self.text = text

    def __repr__(self):
        return self.text


NO_DEFAULT = Marker("<no default>")
ANY_DEFAULT = Marker("...")


class Unreadable(str):
    """A runtime default whose text is not a Python literal."""

    def __repr__(self):
        return str(self)


def stub_parameters(fn, drop_first=False):
    """(name, kind, default) of each parameter of a stub's ast.FunctionDef."""
    a = fn.args
    positional = [(x, P.POSITIONAL_ONLY) for x in a.posonlyargs]
    positional += [(x, P.POSITIONAL_OR_KEYWORD) for x in a.args]
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    params = [(x.arg, kind, d) for (x, kind), d in zip(positional, defaults)]
    if a.vararg:
        params.append((a.vararg.arg, P.VAR_POSITIONAL, None))
    params += [(x.arg, P.KEYWORD_ONLY, d) for x, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        params.append((a.kwarg.arg, P.VAR_KEYWORD, None))

    def value(node):
        if node is None:
            return NO_DEFAULT
        if isinstance(node, ast.Constant) and node.value is Ellipsis:
            return ANY_DEFAULT
        return ast.literal_eval(node)

    params = [(name, kind, value(d)) for name, kind, d in params]
    return params[1:] if drop_first else params


def top_level(text):
    """(index, char) of each character of `text` outside brackets and string literals (a bracket
    that opens or closes the outermost level included), then (len(text), None). ValueError for
    unbalanced brackets or quotes."""
    depth, quote, escaped = 0, None, False
    for i, c in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == quote:
                quote = None
        elif c in "'\"":
            quote = c
        elif c in "([{<":
            if depth == 0:
                yield i, c
            depth += 1
        elif c in ")]}>":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced {c!r} in {text!r}")
            if depth == 0:
                yield i, c
        elif depth == 0:
            yield i, c
    if quote or depth:
        raise ValueError(f"unbalanced brackets or quotes in {text!r}")
    yield len(text), None


def split_top_level(text, sep):
    """`text` split at each `sep` outside brackets and string literals."""
    parts, begin = [], 0
    for i, c in top_level(text):
        if c == sep or c is None:
            parts.append(text[begin:i])
            begin = i + 1
    return parts


def parse_signature_line(line, name):
    """The parameters of one pybind11 signature line, `name(a: int, *, b: str = 'x') -> T`."""
    if not line.startswith(name + "("):
        raise ValueError(f"not a signature of {name}: {line!r}")
    # The parameter list ends at the parenthesis that closes its opening one.
    rest = line[len(name) :]
    end = next(i for i, c in top_level(rest) if c in (")", None))
    if end == len(rest):
        raise ValueError(f"unterminated parameter list: {line!r}")
    params, kind = [], P.POSITIONAL_OR_KEYWORD
    text = rest[1:end].strip()
    for item in split_top_level(text, ",") if text else []:
        item = item.strip()
        if item == "/":
            params = [(n, P.POSITIONAL_ONLY, d) for n, _, d in params]
            continue
        if item == "*":
            kind = P.KEYWORD_ONLY
            continue
        head, *default = split_top_level(item, "=")
        pname = head.split(":", 1)[0].strip()
        if pname.startswith("**"):
            params.append((pname[2:], P.VAR_KEYWORD, NO_DEFAULT))
            continue
        if pname.startswith("*"):
            params.append((pname[1:], P.VAR_POSITIONAL, NO_DEFAULT))
            kind = P.KEYWORD_ONLY
            continue
        value = NO_DEFAULT
        if default:
            text_default = "=".join(default).strip()
            try:
                value = ast.literal_eval(text_default)
            except (ValueError, SyntaxError):
                value = Unreadable(text_default)
        params.append((pname, kind, value))
    return params


def runtime_signatures(obj, name):
    """Every signature of a runtime function or method, as lists of (name, kind, default)."""
    if inspect.isfunction(obj) or inspect.ismethod(obj):  # pure Python
        sig = inspect.signature(obj)
        return [
            [
                (p.name, p.kind, NO_DEFAULT if p.default is P.empty else p.default)
                for p in sig.parameters.values()
            ]
        ]
    # pybind11: the signature is the docstring's first line; an overloaded function has
    # "name(*args, **kwargs)" there, then "Overloaded function." and "<n>. name(...)" lines.
    lines = (obj.__doc__ or "").splitlines()
    first = next((line for line in lines if line.strip()), "")
    if first.startswith(name + "(*args, **kwargs)") and "Overloaded function." in lines[:3]:
        numbered = re.compile(rf"\d+\. {re.escape(name)}\(")
        overloads = [line.split(". ", 1)[1] for line in lines if numbered.match(line)]
        return [parse_signature_line(line, name) for line in overloads]
    return [parse_signature_line(first, name)]


def same_default(a, b):
    if a is ANY_DEFAULT or b is ANY_DEFAULT:
        return True
    if isinstance(a, Unreadable) or isinstance(b, Unreadable):
        return False
    return a == b and isinstance(a, bool) == isinstance(b, bool)


def show(params):
    """A parameter list as a signature, e.g. (w, h=None, *, bf16=False)."""
    out, keyword = [], False
    for i, (name, kind, d) in enumerate(params):
        if kind == P.KEYWORD_ONLY and not keyword:
            out.append("*")
        keyword = keyword or kind in (P.KEYWORD_ONLY, P.VAR_POSITIONAL)
        stars = {P.VAR_POSITIONAL: "*", P.VAR_KEYWORD: "**"}.get(kind, "")
        out.append(stars + name + ("" if d is NO_DEFAULT else f"={d!r}"))
        if kind == P.POSITIONAL_ONLY and (i + 1 == len(params) or params[i + 1][1] != kind):
            out.append("/")
    return "(" + ", ".join(out) + ")"


def signature_differences(stub, runtime, overload=False):
    """What differs between a stub's parameters and the module's, as sentences. `overload`: the
    stub is one of several @overload variants, which may leave out a default (narrowing)."""
    names_s, names_r = [p[0] for p in stub], [p[0] for p in runtime]
    if names_s != names_r:
        missing = [n for n in names_r if n not in names_s]
        extra = [n for n in names_s if n not in names_r]
        what = []
        if missing:
            what.append(f"missing from the stub: {', '.join(missing)}")
        if extra:
            what.append(f"not in the module: {', '.join(extra)}")
        return [f"parameter names differ ({'; '.join(what) or 'in order'})"]
    out = []
    for (name, kind_s, d_s), (_, kind_r, d_r) in zip(stub, runtime):
        if kind_s != kind_r:
            out.append(
                f"'{name}' is {KIND_NAMES[kind_s]} in the stub, {KIND_NAMES[kind_r]} in the module"
            )
        if d_s is NO_DEFAULT and d_r is not NO_DEFAULT:
            if not overload:
                out.append(f"'{name}' has no default in the stub, {d_r!r} in the module")
        elif d_s is not NO_DEFAULT and d_r is NO_DEFAULT:
            out.append(f"'{name}' has a default in the stub ({d_s!r}), none in the module")
        elif not same_default(d_s, d_r):
            if isinstance(d_r, Unreadable):
                out.append(
                    f"'{name}': the module's default {d_r} is not a literal (`= ...` in the stub)"
                )
            else:
                out.append(f"'{name}' defaults to {d_s!r} in the stub, {d_r!r} in the module")
    return out


def stub_callables():
    """(qualified name, [parameter lists, one per @overload], is a property) of every function and
    class member in the stubs."""
    with open(stub_path()) as f:
        tree = ast.parse(f.read())
    found = {}

    def add(qualname, fn):
        deco = {ast.unparse(d) for d in fn.decorator_list}
        is_property = "property" in deco or any(d.endswith((".setter", ".deleter")) for d in deco)
        variants = found.setdefault(qualname, ([], is_property))[0]
        if not is_property:
            variants.append(stub_parameters(fn, drop_first="classmethod" in deco))

    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            add(node.name, node)
        elif isinstance(node, ast.ClassDef):
            for member in node.body:
                if isinstance(member, ast.FunctionDef):
                    add(f"{node.name}.{member.name}", member)
    return [(name, variants, is_property) for name, (variants, is_property) in found.items()]


def stub_problems(qualname, variants, runtime):
    """The differences between a function's stub (its @overload variants) and its signatures in
    the module."""
    if len(runtime) > 1:  # overloaded in the module: each overload stubbed as it is
        problems = [
            f"stub overload {show(stub)} matches none of the module's"
            for stub in variants
            if all(signature_differences(stub, r) for r in runtime)
        ]
        problems += [
            f"the module's overload {show(r)} has no stub"
            for r in runtime
            if all(signature_differences(stub, r) for stub in variants)
        ]
        return problems
    (runtime,) = runtime
    problems = []
    for stub in variants:
        diff = signature_differences(stub, runtime, overload=len(variants) > 1)
        if diff:
            problems.append(
                "; ".join(diff) + f"\n    stub:   {show(stub)}\n    module: {show(runtime)}"
            )
    if len(variants) > 1 and not problems:
        for i, (name, _, d) in enumerate(runtime):
            if d is not NO_DEFAULT and all(v[i][2] is NO_DEFAULT for v in variants):
                problems.append(f"'{name}' has a default in the module, in none of the overloads")
    return problems


def test_stub_signatures_match_the_module():
    """Every function and method of the stubs takes the module's parameters: names, order,
    positional-only / keyword-only, defaults (and their values where the module shows them)."""
    problems = []
    for qualname, variants, is_property in stub_callables():
        owner_name, _, name = qualname.rpartition(".")
        owner = getattr(qmoe, owner_name) if owner_name else qmoe
        if not hasattr(owner, name):
            continue  # test_stubs_match_the_module reports the names
        static = inspect.getattr_static(owner, name) if owner_name else None
        if isinstance(static, property) != is_property:
            what = ("a method", "a property")
            problems.append(
                f"qmoe.{qualname}: {what[is_property]} in the stub, {what[not is_property]} in "
                "the module"
            )
            continue
        if is_property:
            continue
        try:
            runtime = runtime_signatures(getattr(owner, name), name)
        except ValueError as e:
            problems.append(f"qmoe.{qualname}: the module's signature cannot be read: {e}")
            continue
        problems += [f"qmoe.{qualname}: {p}" for p in stub_problems(qualname, variants, runtime)]
    assert not problems, "stub signatures differ from the module's:\n" + "\n".join(problems)


def test_signature_comparison():
    """The signature parser and comparison on the cases they must handle."""
    line = (
        "f(self: m.C, a: dict[str, tuple[int, int]], /, b: str = 'x, (y)', *, "
        "c: typing.Optional[float] = None, d: list[int] = [1, 2], e: int = 0) -> tuple[int, str]"
    )
    assert parse_signature_line(line, "f") == [
        ("self", P.POSITIONAL_ONLY, NO_DEFAULT),
        ("a", P.POSITIONAL_ONLY, NO_DEFAULT),
        ("b", P.POSITIONAL_OR_KEYWORD, "x, (y)"),
        ("c", P.KEYWORD_ONLY, None),
        ("d", P.KEYWORD_ONLY, [1, 2]),
        ("e", P.KEYWORD_ONLY, 0),
    ]
    assert parse_signature_line("g(*args, **kwargs) -> None", "g") == [
        ("args", P.VAR_POSITIONAL, NO_DEFAULT),
        ("kwargs", P.VAR_KEYWORD, NO_DEFAULT),
    ]
    assert parse_signature_line("h() -> (anonymous namespace)::T", "h") == []
    assert parse_signature_line("k(x: C = <m.C object at 0x1>) -> None", "k") == [
        ("x", P.POSITIONAL_OR_KEYWORD, Unreadable("<m.C object at 0x1>"))
    ]

    class Overloaded:
        __doc__ = "f(*args, **kwargs)\nOverloaded function.\n\n1. f(a: int) -> int\n\nOne.\n\n" + (
            "2. f(a: str, b: int = 1) -> str\n\nTwo.\n"
        )

    assert runtime_signatures(Overloaded, "f") == [
        [("a", P.POSITIONAL_OR_KEYWORD, NO_DEFAULT)],
        [("a", P.POSITIONAL_OR_KEYWORD, NO_DEFAULT), ("b", P.POSITIONAL_OR_KEYWORD, 1)],
    ]

    def python_function(a, /, b=1, *c, d=None, **e):
        pass

    assert runtime_signatures(python_function, "python_function") == [
        parse_signature_line("python_function(a, /, b=1, *c, d=None, **e)", "python_function")
    ]

    def stub(source):
        return stub_parameters(ast.parse(source).body[0])

    def module(line):
        return parse_signature_line(line, "f")

    s = stub("def f(a, b=1, *, c: str = 'x', d=...): ...")
    assert signature_differences(s, module("f(a, b=1, *, c='x', d=[]) -> None")) == []
    assert signature_differences(s, module("f(a, b=2, *, c='x', d=[])")) == [
        "'b' defaults to 1 in the stub, 2 in the module"
    ]
    assert signature_differences(s, module("f(a, b=True, *, c='x', d=[])")) == [
        "'b' defaults to 1 in the stub, True in the module"
    ]
    assert signature_differences(s, module("f(a, *, b=1, c='x', d=[])")) == [
        "'b' is positional-or-keyword in the stub, keyword-only in the module"
    ]
    assert signature_differences(s, module("f(a, /, b=1, *, c='x', d=[])")) == [
        "'a' is positional-or-keyword in the stub, positional-only in the module"
    ]
    assert signature_differences(s, module("f(a, b=1, *, c, d=[])")) == [
        "'c' has a default in the stub ('x'), none in the module"
    ]
    assert signature_differences(s, module("f(a, b=1, *, d=[], c='x')")) == [
        "parameter names differ (in order)"
    ]
    assert signature_differences(s, module("f(a, b=1, *, c='x', e=0)")) == [
        "parameter names differ (missing from the stub: e; not in the module: d)"
    ]
    # @overload variants may leave out a default, but one of them must have it.
    both = [stub("def f(a, *, b: bool = False): ..."), stub("def f(a, *, b: bool): ...")]
    only_required = [stub("def f(a, *, b: bool): ...")] * 2
    assert stub_problems("f", both, [module("f(a, *, b=False)")]) == []
    assert stub_problems("f", only_required, [module("f(a, *, b=False)")]) == [
        "'b' has a default in the module, in none of the overloads"
    ]


def test_codecs_come_from_the_library_table():
    table = qmoe.codecs()
    names = [c["name"] for c in table]
    assert names == ["qmoe-v1", "qmoe-v2", "qmoe-v3", "qmoe-g4", "qmoe-p5"]
    for c in table:
        assert c["members"][-1] == "levels" and c["dictionary"] in ("none", "builtin", "fitted")
        assert c["row_unit"] in (1, 2, 4) and c["summary"]
    by_name = {c["name"]: c for c in table}
    assert by_name["qmoe-v3"]["row_unit"] == 2 and by_name["qmoe-g4"]["row_unit"] == 4
    assert [c["name"] for c in table if c["gpu_native"]] == ["qmoe-v1", "qmoe-v2", "qmoe-p5"]
    assert {c["auto_for"]: c["name"] for c in table if c["auto_for"]} == {
        "any": "qmoe-v1", "cpu": "qmoe-g4", "gpu": "qmoe-v2"}
    # Every codec round-trips through the encoder by its table name.
    w = np.random.default_rng(0).standard_normal((8, 40)).astype(np.float32)
    s, l = qmoe.ternarize_rtn(w)
    for name in names:
        np.testing.assert_array_equal(qmoe.encode(s, l, codec=name).decode_symbols(), s)
    # The stubs' CodecName lists the same codecs, so type checkers cannot drift from the library.
    with open(stub_path()) as f:
        tree = ast.parse(f.read())
    literal = next(n.value for n in tree.body if isinstance(n, ast.Assign)
                   and isinstance(n.targets[0], ast.Name) and n.targets[0].id == "CodecName")
    assert [e.value for e in literal.slice.elts] == names
