"""The README's tour runs as written, and its commented results are what the code returns."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def _tour() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "the README has no python block"
    return blocks[0]


def test_the_tour_runs_and_its_comments_are_true(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    source = _tour()
    checked = 0
    lines = []
    for line in source.splitlines():
        match = re.match(r"^(\s*)(events\.\w+\(.*\))\s*# -> (.*)$", line)
        if match and match.group(3)[0].isdigit() and match.group(3).split()[0].isdigit():
            indent, call, expected = match.groups()
            lines.append(f"{indent}assert {call} == {expected.split()[0]}, {call!r}")
            checked += 1
        elif match and match.group(3).startswith("Totals("):
            indent, call, expected = match.groups()
            lines.append(f"{indent}assert repr({call}) == {expected!r}")
            checked += 1
        else:
            lines.append(line)
    namespace: dict[str, object] = {}
    exec(compile("\n".join(lines), str(README), "exec"), namespace)
    assert checked >= 3
    assert (tmp_path / "stats.tt").is_dir()
    namespace["db"].close()  # type: ignore[attr-defined]
