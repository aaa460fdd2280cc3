"""What a fresh machine needs is declared: every third-party module the package and the tests import (and the
reference needs at run time) comes from a declared dependency; CI runs the README's commands in a new venv;
the package never imports the reference libraries."""

import ast
import re
import sys
import tomllib
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _requirements(extras=("test",)):
    """(runtime deps, what the given extras add); an extra naming `sdgen[x]` brings extra x's packages."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    optional = project["optional-dependencies"]
    names = lambda reqs: {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower().replace("_", "-") for r in reqs}

    def extra(name):
        own = re.compile(r"sdgen\[(.+)\]")
        reqs = optional[name]
        found = names(r for r in reqs if not own.fullmatch(r))
        for r in reqs:
            if m := own.fullmatch(r):
                for x in m.group(1).split(","):
                    found |= extra(x.strip())
        return found

    return names(project["dependencies"]), set().union(*(extra(x) for x in extras))


def _imports(files):
    found = set()
    for f in files:
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.Import):
                found |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
    return found


def _distributions(modules, local):
    dists = metadata.packages_distributions()
    out = {}
    for m in modules - local:
        if m in sys.stdlib_module_names or m == "sdgen":
            continue
        out[m] = {d.lower().replace("_", "-") for d in dists.get(m, [m])}
    return out


def test_package_imports_are_dependencies():
    """Runtime imports come from `dependencies`, or from an optional extra (imported only where it is used)."""
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    deps, extras = _requirements(tuple(x for x in optional if x != "test"))
    for module, dists in _distributions(_imports((ROOT / "src").rglob("*.py")), set()).items():
        assert dists & (deps | extras), f"the package imports {module} ({dists}) but pyproject does not declare it"


def test_test_imports_are_declared():
    deps, test = _requirements()
    local = {p.stem for p in (ROOT / "tests").glob("*.py")}
    for module, dists in _distributions(_imports((ROOT / "tests").glob("*.py")), local).items():
        assert dists & (deps | test), f"the tests import {module} ({dists}) but no extra installs it"


def test_reference_runtime_needs_are_declared():
    """diffusers' LMSDiscreteScheduler imports scipy when it is built: the test extra must bring it."""
    _, test = _requirements()
    assert "scipy" in test


def test_package_never_imports_the_reference():
    assert not {"diffusers", "transformers"} & _imports((ROOT / "src").rglob("*.py"))


def test_ci_runs_the_readme_commands_in_a_new_venv():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 -m venv" in ci and "README.md" in ci
    block = re.search(r"## Set-up[^\n]*\n.*?```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    commands = [c for c in (re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines()) if c]
    assert len(commands) == 2
    assert commands[0].startswith('pip install torch==2.13.0 -e ".[test]"') and commands[1] == "python -m pytest"
