"""Packaging checks: the three import packages ship together and install cleanly, the
metadata is complete, and each extra holds what its feature imports."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import os
import re
import runpy
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("emitguard", "emitguard_adapters", "pytest_emitguard")

tomllib = pytest.importorskip("tomllib", reason="tomllib is in the standard library from 3.11")

# Environment variables that would leak the outer interpreter / coverage
# session into the child processes (build backend, fresh venv).
_LEAKY_ENV_PREFIXES = ("COV_CORE_", "COVERAGE_", "PYTHON", "VIRTUAL_ENV", "PIP_REQUIRE_VIRTUALENV")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(_LEAKY_ENV_PREFIXES)}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    return env


def _run(cmd: list[str], *, timeout: float, cwd: Path | None = None) -> str:
    proc = subprocess.run(
        cmd,
        cwd=cwd,
        env=_clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert proc.returncode == 0, (
        f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
        f"--- stdout ---\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
    )
    return proc.stdout


def _venv_bin(venv: Path) -> Path:
    return venv / ("Scripts" if os.name == "nt" else "bin")


@pytest.mark.parametrize("name", PACKAGES)
def test_package_importable_and_typed(name: str) -> None:
    module = importlib.import_module(name)
    assert module.__file__ is not None
    pkg_dir = Path(module.__file__).resolve().parent
    assert pkg_dir.name == name
    assert (pkg_dir / "py.typed").is_file(), f"{name} is missing py.typed"


def pyproject() -> dict[str, Any]:
    with (PROJECT_ROOT / "pyproject.toml").open("rb") as file:
        data: dict[str, Any] = tomllib.load(file)
    return data


def _name(requirement: str) -> str:
    """The normalized distribution name of a requirement string."""
    match = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement)
    assert match, requirement
    return re.sub(r"[-_.]+", "-", match.group()).lower()


def extra(name: str) -> set[str]:
    """The distributions an extra installs, self-references (emitguard[...]) expanded."""
    project = pyproject()["project"]
    names: set[str] = set()
    for requirement in project["optional-dependencies"][name]:
        if _name(requirement) == "emitguard":
            inner = re.search(r"\[(.*)\]", requirement)
            assert inner, requirement
            for other in inner.group(1).split(","):
                names |= extra(other.strip())
        else:
            names.add(_name(requirement))
    return names


FEATURES: dict[str, tuple[str, ...]] = {
    "src/emitguard": (),
    "src/emitguard/redis_outbox.py": ("redis",),
    "src/emitguard/instrumentation.py": ("otel-instrument",),
    "adapters/emitguard_adapters/__init__.py": (),
    "adapters/emitguard_adapters/_params.py": (),
    "adapters/emitguard_adapters/commands.py": (),
    "adapters/emitguard_adapters/manager.py": (),
    "adapters/emitguard_adapters/starlette.py": ("starlette",),
    "adapters/emitguard_adapters/fallback.py": ("starlette",),
    "adapters/emitguard_adapters/hub.py": ("starlette",),
    "adapters/emitguard_adapters/_access.py": ("starlette",),
    "adapters/emitguard_adapters/_writer.py": ("starlette",),
    # guards a python-socketio server it is handed: needs no import of it (the extra installs it)
    "adapters/emitguard_adapters/socketio.py": ("socketio",),
    "adapters/emitguard_adapters/_sio_client.py": (),
    "adapters/emitguard_adapters/_sio_patch.py": (),
    "adapters/emitguard_adapters/_sio_recovery.py": (),
    "adapters/emitguard_adapters/_sio_shared.py": (),
    "adapters/emitguard_adapters/channels.py": ("channels",),
    "adapters/emitguard_adapters/_channels_layer.py": ("channels",),
    "adapters/emitguard_adapters/socket_demo.py": ("demo",),
    "adapters/emitguard_adapters/_demo_script.py": (),
    "adapters/emitguard_adapters/workers_demo.py": ("demo", "redis"),
    "adapters/emitguard_adapters/testing.py": ("demo",),
    # docs/starlette.md: the extra, and uvicorn from `demo` to run the example app
    "docs/fastapi_app.py": ("fastapi", "demo"),
    "plugin/pytest_emitguard": ("testing",),
}
"""The extras each module (or folder) may import from, besides the core dependencies."""


def _runtime_nodes(node: ast.AST) -> list[ast.AST]:
    """Every node under ``node`` but those in ``if TYPE_CHECKING:`` blocks."""
    found: list[ast.AST] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
            found.extend(n for other in child.orelse for n in [other, *_runtime_nodes(other)])
            continue
        found.append(child)
        found.extend(_runtime_nodes(child))
    return found


def third_party_imports(path: Path) -> set[str]:
    """The top-level names of every non-stdlib, non-emitguard module a file imports at run
    time."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    roots: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            roots.add(node.module.split(".")[0])
    return {
        root
        for root in roots
        if root not in sys.stdlib_module_names and root not in (*PACKAGES, "__future__")
    }


def test_every_shipped_module_has_a_feature() -> None:
    shipped = [
        path
        for folder in ("src/emitguard", "adapters/emitguard_adapters", "plugin/pytest_emitguard")
        for path in (PROJECT_ROOT / folder).glob("*.py")
    ]
    for path in shipped:
        relative = path.relative_to(PROJECT_ROOT).as_posix()
        assert relative in FEATURES or relative.rsplit("/", 1)[0] in FEATURES, relative


@pytest.mark.parametrize("where", sorted(FEATURES))
def test_each_feature_imports_only_what_its_extra_installs(where: str) -> None:
    path = PROJECT_ROOT / where
    files = sorted(path.glob("*.py")) if path.is_dir() else [path]
    files = [
        f for f in files if f == path or f.relative_to(PROJECT_ROOT).as_posix() not in FEATURES
    ]
    allowed = {_name(r) for r in pyproject()["project"]["dependencies"]}
    for name in FEATURES[where]:
        allowed |= extra(name)
    distributions = importlib.metadata.packages_distributions()
    for file in files:
        for root in sorted(third_party_imports(file)):
            provided = {_name(d) for d in distributions.get(root, [root])}
            assert provided & allowed, (
                f"{file.relative_to(PROJECT_ROOT)} imports {root} ({', '.join(sorted(provided))}), "
                f"which neither the dependencies nor {FEATURES[where] or 'no extra'} install"
            )


def test_metadata_of_a_well_kept_library() -> None:
    project = pyproject()["project"]
    assert project["license"] == "MIT"
    assert project["license-files"] == ["LICENSE"]
    assert project["readme"] == "README.md"
    assert "MIT License" in (PROJECT_ROOT / "LICENSE").read_text(encoding="utf-8")
    assert "## 0.1.0" in (PROJECT_ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert {
        "Framework :: Pytest",
        "Framework :: AsyncIO",
        "Development Status :: 4 - Beta",
        "Typing :: Typed",
    } <= set(project["classifiers"])
    assert not [c for c in project["classifiers"] if c.startswith("License ::")]  # PEP 639
    assert set(project["optional-dependencies"]) == {
        "starlette",
        "fastapi",
        "socketio",
        "channels",
        "redis",
        "otel-instrument",
        "demo",
        "testing",
        "dev",
    }


def test_extras_install_what_their_names_say() -> None:
    assert extra("fastapi") >= {"fastapi", "starlette", "sse-starlette"}
    assert extra("socketio") == {"python-socketio"}
    assert extra("channels") == {"channels", "channels-redis", "django"}
    assert extra("redis") == {"redis"}
    assert extra("otel-instrument") == {"opentelemetry-instrumentation"}
    assert extra("testing") == {"pytest", "pytest-asyncio", "anyio"}
    assert extra("demo") == {"starlette", "uvicorn", "websockets"}  # and nothing of dev's tools
    assert extra("dev") >= extra("testing") | extra("fastapi") | extra("demo")


def test_the_readme_lists_every_extra() -> None:
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    listed = set(re.findall(r"^\| `([a-z-]+)` \|", readme, re.MULTILINE))
    assert listed == set(pyproject()["project"]["optional-dependencies"])


def test_python_m_emitguard_is_the_command_line() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "emitguard", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"emitguard {importlib.metadata.version('emitguard')}"


def test_python_m_emitguard_in_process(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "argv", ["emitguard", "--version"])
    with pytest.raises(SystemExit) as caught:
        runpy.run_module("emitguard", run_name="__main__", alter_sys=True)
    assert caught.value.code == 0
    assert capsys.readouterr().out.startswith("emitguard ")


README_QUICK_START = re.compile(r"## Quick start\n\n```python\n(.*?)```", re.DOTALL)


@pytest.mark.slow
def test_wheel_builds_and_installs_in_fresh_venv(tmp_path: Path) -> None:
    """What a new user does from a checkout: build the wheel, install it in a new venv, run the
    README's quick start (the engine alone), then add an extra from the same wheel file. Prints
    the time each step took."""
    timings: dict[str, float] = {}
    start = time.perf_counter()
    dist = tmp_path / "dist"
    _run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(PROJECT_ROOT)],
        timeout=180,
    )
    wheels = sorted(dist.glob("emitguard-*.whl"))
    assert len(wheels) == 1, wheels
    wheel = wheels[0]
    timings["build"] = time.perf_counter() - start

    # Wheel layout: three top-level packages, each with py.typed, no src/ prefixes.
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    top_level = {n.split("/", 1)[0] for n in names if "/" in n and ".dist-info/" not in n}
    assert top_level == set(PACKAGES), top_level
    for pkg in PACKAGES:
        assert f"{pkg}/__init__.py" in names
        assert f"{pkg}/py.typed" in names
    assert "emitguard/__main__.py" in names
    assert f"{wheel.name.split('-py3')[0]}.dist-info/licenses/LICENSE" in names
    entry_points_txt = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as zf:
        entry_points = zf.read(entry_points_txt).decode()
    assert "[pytest11]\nemitguard = pytest_emitguard.plugin" in entry_points

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    bindir = _venv_bin(venv)
    py = bindir / ("python.exe" if os.name == "nt" else "python")
    start = time.perf_counter()
    _run([str(py), "-m", "pip", "install", "--quiet", str(wheel)], timeout=300)
    timings["install"] = time.perf_counter() - start

    # Run from tmp_path so the source tree cannot shadow the installed wheel.
    check = (
        "import importlib.metadata as md, emitguard, emitguard_adapters, pytest_emitguard\n"
        "import pathlib, sys\n"
        "for m in (emitguard, emitguard_adapters, pytest_emitguard):\n"
        "    p = pathlib.Path(m.__file__).resolve()\n"
        "    assert pathlib.Path(sys.prefix).resolve() in p.parents, p\n"
        "eps = md.entry_points(group='emitguard')\n"
        "assert 'manager' in eps.names, eps\n"
        "assert eps['manager'].value == 'emitguard_adapters.manager', eps['manager']\n"
        "assert md.version('emitguard') == '0.1.0'\n"
        "assert md.metadata('emitguard')['License-Expression'] == 'MIT'\n"
        "print('ok')\n"
    )
    out = _run([str(py), "-I", "-c", check], timeout=60, cwd=tmp_path)
    assert out.strip() == "ok"
    script = bindir / ("emitguard.exe" if os.name == "nt" else "emitguard")
    assert script.is_file(), f"console script missing: {script}"
    assert "emitguard 0.1.0" in _run([str(py), "-I", "-m", "emitguard", "--version"], timeout=60)

    match = README_QUICK_START.search((PROJECT_ROOT / "README.md").read_text(encoding="utf-8"))
    assert match, "README.md has no python block under '## Quick start'"
    quick_start = tmp_path / "quick_start.py"
    quick_start.write_text(match.group(1), encoding="utf-8")
    start = time.perf_counter()
    _run([str(py), "-I", "-W", "error", str(quick_start)], timeout=60, cwd=tmp_path)
    timings["quick start"] = time.perf_counter() - start

    # The docs' form for an extra, from the wheel file: its feature then imports.
    start = time.perf_counter()
    _run([str(py), "-m", "pip", "install", "--quiet", f"{wheel}[starlette]"], timeout=300)
    timings["install [starlette]"] = time.perf_counter() - start
    _run(
        [str(py), "-I", "-c", "import emitguard_adapters.starlette, emitguard_adapters.fallback"],
        timeout=60,
        cwd=tmp_path,
    )
    print("wheel timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
