"""Packaging checks: the three import packages ship together and install cleanly."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("emitguard", "emitguard_adapters", "pytest_emitguard")

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


@pytest.mark.slow
def test_wheel_builds_and_installs_in_fresh_venv(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    _run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(PROJECT_ROOT)],
        timeout=180,
    )
    wheels = sorted(dist.glob("emitguard-*.whl"))
    assert len(wheels) == 1, wheels
    wheel = wheels[0]

    # Wheel layout: three top-level packages, each with py.typed, no src/ prefixes.
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
    top_level = {n.split("/", 1)[0] for n in names if "/" in n and ".dist-info/" not in n}
    assert top_level == set(PACKAGES), top_level
    for pkg in PACKAGES:
        assert f"{pkg}/__init__.py" in names
        assert f"{pkg}/py.typed" in names
    entry_points_txt = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    with zipfile.ZipFile(wheel) as zf:
        entry_points = zf.read(entry_points_txt).decode()
    assert "[pytest11]\nemitguard = pytest_emitguard.plugin" in entry_points

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], timeout=120)
    bindir = _venv_bin(venv)
    py = bindir / ("python.exe" if os.name == "nt" else "python")
    _run([str(py), "-m", "pip", "install", "--quiet", str(wheel)], timeout=300)

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
        "print('ok')\n"
    )
    out = _run([str(py), "-I", "-c", check], timeout=60, cwd=tmp_path)
    assert out.strip() == "ok"

    script = bindir / ("emitguard.exe" if os.name == "nt" else "emitguard")
    assert script.is_file(), f"console script missing: {script}"
