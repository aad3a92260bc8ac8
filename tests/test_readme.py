"""The README's sample output is the real output of the command above it."""

from __future__ import annotations

import os
import re

from onnx_repvgg.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sample() -> tuple[str, list[str]]:
    """The quick-start command and the output printed under it, from the README: the indented
    block that follows the line after the command."""
    text = open(os.path.join(ROOT, "README.md")).read()
    command = re.search(r"^    pip install \. && (python -m onnx_repvgg .+)$", text, re.M).group(1)
    lines = []
    for line in text.split(command, 1)[1].splitlines()[3:]:
        if line and not line.startswith("    "):
            break
        lines.append(line[4:])
    assert len(lines) > 10
    return command, lines


def _varying(line: str) -> str:
    """A line with what varies between machines masked: times and the last digits of differences."""
    line = re.sub(r"time: .*", "time: ...", line)
    line = re.sub(r"(max (abs|rel) diff) [0-9.e+-]+", r"\1 X", line)
    return line


def test_quick_start_output_is_real(tmp_path, capsys, monkeypatch):
    command, expected = _sample()
    args = command.split()[3:]
    assert args[0].startswith("models/") and args[1] == "fused.onnx"
    monkeypatch.chdir(ROOT)
    out_path = str(tmp_path / "fused.onnx")
    assert main([args[0], out_path]) == 0
    actual = [_varying(line.replace(out_path, "fused.onnx")) for line in capsys.readouterr().out.splitlines()]
    shown = [_varying(line) for line in expected if line.strip() != "..."]
    missing = [line for line in shown if line not in actual]
    assert not missing, (missing, actual)
    assert any("blocks: 22 fused, 0 skipped" in line for line in actual)
