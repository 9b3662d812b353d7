"""The docs' examples run, and the hook reference matches the real hook specifications."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import pytest

from emitguard.hooks import HookSpecs

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"```python\n(.*?)```", re.DOTALL)


def programs() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for number, block in enumerate(FENCE.findall(path.read_text(encoding="utf-8")), 1):
            if "asyncio.run(" in block or "if __name__" in block:
                found.append((f"{path.name}#{number}", block))
    return found


@pytest.mark.parametrize(("where", "code"), programs(), ids=[w for w, _ in programs()])
def test_doc_program_runs(where: str, code: str, tmp_path: Path) -> None:
    script = tmp_path / "example.py"
    script.write_text(code, encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 0, f"{where} failed:\n{result.stdout}\n{result.stderr}"


def test_there_are_runnable_examples() -> None:
    names = {where.split("#")[0] for where, _ in programs()}
    assert {"README.md", "index.md", "legacy-managers.md"} <= names


def test_every_hook_is_documented_with_its_arguments() -> None:
    text = (ROOT / "docs" / "concepts.md").read_text(encoding="utf-8")
    for name, spec in inspect.getmembers(HookSpecs, inspect.isfunction):
        if not name.startswith("emitguard_"):
            continue
        args = [p for p in inspect.signature(spec).parameters if p != "self"]
        heading = f"### {name}({', '.join(args)})"
        assert heading in text, f"docs/concepts.md lacks the heading {heading!r}"
