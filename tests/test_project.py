"""What a newcomer reads before the code: the licence, the package's description, its shape.

The shape: app/ is in packages by capability, in layers that only point down (issue 25).
The import checker below reads every module of app/ and cli/ with `ast`, so an import
inside a function counts as much as one at the top.
"""
import ast
import configparser
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent


def test_the_licence_file_is_the_licence_setup_cfg_declares():
    metadata = configparser.ConfigParser()
    metadata.read(REPO / "setup.cfg")
    assert metadata["metadata"]["license"] == "MIT"
    assert metadata["metadata"]["license_files"] == "LICENSE"
    text = (REPO / "LICENSE").read_text()
    assert text.startswith("MIT License") and "WITHOUT WARRANTY OF ANY KIND" in text


# Highest first: a module may import from its own layer's packages or from lower layers.
# Same layer, another package is allowed (a circle between them is caught anyway).
LAYERS = [
    ["cli"],
    ["app.serving", "app.gunicorn_conf"],  # gunicorn's master and workers; the shim
    ["app"],  # create_app (app/__init__.py)
    ["app.routes"],
    ["app.ui"],
    ["app.proxy"],
    ["app.admission", "app.upstreams", "app.accounting"],
    ["app.keys"],
    ["app.webhooks"],
    ["app.store"],
    ["app.config", "app.errors", "app.limits", "app.cooperative", "app.redact", "app.metrics"],
]
# Beside the packages in app/, counting app/__init__.py and the app/gunicorn_conf.py shim.
MOST_MODULES_IN_APP = 8


def layer_of(module):
    """The index in LAYERS of the longest entry that is `module` or a package above it."""
    best = None
    for index, entries in enumerate(LAYERS):
        for entry in entries:
            if module == entry or module.startswith(entry + ".") and entry != "app":
                if best is None or len(entry) > len(best[1]):
                    best = (index, entry)
    return best


def module_name(root, path):
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(name, source, is_package, modules):
    """The modules of `modules` that `source` imports, wherever the import statement is."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                # `from app import audit` is an edge to app.audit when that is a module.
                child = f"{target}.{alias.name}"
                found.add(child if child in modules else target)
    # An import of app.x.y names app.x.y, not the packages it passes through.
    return {m for m in found if m in modules and m != name}


def read_graph(root):
    """{module: modules it imports} for app/ and cli/ under `root`."""
    files = {}
    for top in ("app", "cli"):
        for path in sorted((root / top).rglob("*.py")):
            files[module_name(root, path)] = path
    return {name: imports_of(name, path.read_text(), path.name == "__init__.py", files)
            for name, path in files.items()}


def cycles(graph):
    """Each strongly connected set of more than one module (or a module importing itself)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            members = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                members.append(member)
                if member == node:
                    break
            if len(members) > 1 or node in graph.get(node, ()):
                found.append(sorted(members))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward_imports(graph):
    """`importer -> imported` wherever the imported module sits in a higher layer."""
    wrong = []
    for importer, imported in sorted(graph.items()):
        for target in sorted(imported):
            mine, theirs = layer_of(importer), layer_of(target)
            if mine is None or theirs is None:
                wrong.append(f"{importer if mine is None else target} is in no layer")
            elif theirs[0] < mine[0]:
                wrong.append(f"{importer} ({mine[1]}) imports {target} ({theirs[1]})")
    return sorted(set(wrong))


def test_app_and_cli_import_in_no_circle():
    assert cycles(read_graph(REPO)) == []


def test_app_and_cli_import_only_downwards():
    assert upward_imports(read_graph(REPO)) == []


def test_app_keeps_its_modules_in_packages():
    loose = sorted(path.name for path in (REPO / "app").glob("*.py"))
    assert len(loose) <= MOST_MODULES_IN_APP, loose


def test_each_package_init_only_says_what_the_package_owns():
    for init in sorted((REPO / "app").glob("*/__init__.py")):
        if init.parent.name in ("routes", "ui"):
            continue  # blueprints and the dashboard's helpers register themselves here
        tree = ast.parse(init.read_text())
        assert len(tree.body) == 1 and ast.get_docstring(tree), init
        assert "May import" in ast.get_docstring(tree), init


def test_gunicorns_master_loads_no_database_layer():
    """The master imports the conf (old name and new) and the worker module before forking."""
    probe = ("import sys, app.gunicorn_conf, app.serving.gunicorn_conf, app.serving.worker\n"
             "print(' '.join(sorted(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.split()
    heavy = ("app.store", "app.admission", "app.accounting", "app.proxy", "app.keys",
             "app.webhooks", "app.upstreams", "peewee", "psycopg2", "requests", "flask")
    assert [m for m in loaded if m.startswith(heavy)] == []


def write_tree(root, files):
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for package in ("app", "cli"):
        (root / package).mkdir(exist_ok=True)
        (root / package / "__init__.py").touch()


def test_the_checker_finds_a_circle_through_an_import_inside_a_function(tmp_path):
    write_tree(tmp_path, {
        "app/store/__init__.py": "",
        "app/store/db.py": "def later():\n    from app.store import audit\n",
        "app/store/audit.py": "from app.store.db import later\n",
    })
    assert cycles(read_graph(tmp_path)) == [["app.store.audit", "app.store.db"]]
    assert upward_imports(read_graph(tmp_path)) == []


def test_the_checker_finds_an_upward_import_written_relative_or_from_app(tmp_path):
    write_tree(tmp_path, {
        "app/errors.py": "from app.store import db\n",
        "app/store/__init__.py": "",
        "app/store/db.py": "from ..proxy.relay import CHUNK_SIZE\n",
        "app/proxy/__init__.py": "",
        "app/proxy/relay.py": "CHUNK_SIZE = 1\n",
    })
    graph = read_graph(tmp_path)
    assert graph["app.errors"] == {"app.store.db"}
    assert graph["app.store.db"] == {"app.proxy.relay"}
    assert upward_imports(graph) == [
        "app.errors (app.errors) imports app.store.db (app.store)",
        "app.store.db (app.store) imports app.proxy.relay (app.proxy)",
    ]
    assert cycles(graph) == []


def test_the_checker_places_every_module_in_a_layer(tmp_path):
    write_tree(tmp_path, {"app/newcomer.py": "", "cli/x.py": "from app import newcomer\n"})
    assert upward_imports(read_graph(tmp_path)) == ["app.newcomer is in no layer"]


@pytest.mark.parametrize("module, layer", [
    ("app", "app"), ("app.proxy.gateway", "app.proxy"), ("app.config", "app.config"),
    ("app.gunicorn_conf", "app.gunicorn_conf"), ("cli.serve", "cli"),
])
def test_layer_of_takes_the_longest_entry(module, layer):
    assert layer_of(module)[1] == layer


def test_the_suite_records_every_key_it_creates_for_its_log_check(make_key):
    from tests import leak_check

    secret, _ = make_key()
    assert secret in leak_check.SECRETS


def test_the_log_check_finds_a_created_key_in_a_log_line(make_key):
    """The check conftest runs at the session's end (log_recorder) sees a key in a line."""
    from tests import leak_check

    secret, _ = make_key()
    assert leak_check.leaks(["fine", f"GET / Authorization: Bearer {secret}"]) == [
        ("in-process log", secret[:12])]
