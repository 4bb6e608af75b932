"""The installed package: docstrings on everything, type stubs that match the module."""

import ast
import inspect
import os

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
