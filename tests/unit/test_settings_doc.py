"""docs/settings.md is generated from the declarations in tracecore/settings.py (`trace settings
--markdown`); this fails when someone adds or changes a setting without regenerating the page."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracecore.settings import Settings
from web.cli import main, settings_markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "settings.md"


def test_docs_settings_md_is_what_the_generator_prints(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["settings", "--markdown"]) == 0
    printed = capsys.readouterr().out
    assert printed == settings_markdown()
    assert DOC.read_text() == printed, (
        "docs/settings.md is out of date: run `.venv/bin/trace settings --markdown > docs/settings.md`")


def test_every_setting_has_one_row() -> None:
    page = settings_markdown()
    for variable, _kind, _default, _doc in Settings.describe():
        assert page.count(f"| `{variable}` |") == 1, variable
