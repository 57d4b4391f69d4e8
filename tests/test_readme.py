"""The README's "Quantize your own model" example runs as written (and checks itself with its asserts)."""

from __future__ import annotations

import re
import runpy
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _section_code(title: str) -> str:
    text = README.read_text()
    start = text.index(f"## {title}\n")
    body = text[start:text.index("\n## ", start + 1)]
    blocks = re.findall(r"```python\n(.*?)```", body, flags=re.S)
    assert blocks, f"no python block in README section {title!r}"
    return blocks[0]


def test_quantize_your_own_model_example_runs(tmp_path, monkeypatch):
    code = _section_code("Quantize your own model")
    script = tmp_path / "example.py"
    script.write_text(code)
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(script), run_name="__main__")
    assert (tmp_path / "net.onnx").stat().st_size > 0
    assert (tmp_path / "golden" / "manifest.json").is_file()
