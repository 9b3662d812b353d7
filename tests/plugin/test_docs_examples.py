"""Every ``python`` example in docs/pytest-plugin.md runs as written, under the settings the
page gives: pytest-asyncio's ``auto`` mode from its ``toml`` block, and anyio's marker with
pytest-asyncio switched off."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

PAGE = Path(__file__).resolve().parents[2] / "docs" / "pytest-plugin.md"
FENCE = re.compile(r"```(\w*)\n(.*?)```", re.DOTALL)


def blocks(language: str) -> list[str]:
    text = PAGE.read_text(encoding="utf-8")
    return [body for lang, body in FENCE.findall(text) if lang == language]


def examples() -> list[str]:
    return [body for body in blocks("python") if "def test_" in body]


def asyncio_settings() -> str:
    [settings] = [body for body in blocks("toml") if "asyncio_mode" in body]
    return settings


def test_the_page_has_async_examples_and_settings() -> None:
    found = examples()
    assert len(found) >= 4
    assert any("pytest.mark.anyio" in body for body in found)
    assert 'asyncio_mode = "auto"' in asyncio_settings()


@pytest.mark.parametrize("number", range(len(examples())))
def test_example_runs_with_pytest_asyncio(pytester: pytest.Pytester, number: int) -> None:
    source = examples()[number]
    pytester.makepyprojecttoml(asyncio_settings())
    pytester.makepyfile(test_doc_example=source)
    result = pytester.runpytest("-W", "error")
    result.assert_outcomes(passed=source.count("\ndef test_") + source.count("async def test_"))


@pytest.mark.parametrize(
    "number", [n for n, body in enumerate(examples()) if "pytest.mark.anyio" in body]
)
def test_anyio_example_runs_without_pytest_asyncio(pytester: pytest.Pytester, number: int) -> None:
    source = examples()[number]
    pytester.makepyfile(test_doc_example=source)
    result = pytester.runpytest("-p", "no:asyncio", "-W", "error")
    result.assert_outcomes(passed=source.count("async def test_"))


def test_async_examples_fail_without_an_async_plugin(pytester: pytest.Pytester) -> None:
    """What the page says happens without pytest-asyncio's setting or anyio's marker."""
    pytester.makepyfile(test_doc_example=examples()[0])
    result = pytester.runpytest("-p", "no:asyncio", "-p", "no:anyio")
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*async def functions are not natively supported*"])
