"""The README's "Quantize your own model" example runs as written (and checks itself with its asserts); its result
tables are the benchmarks' own (``scripts/readme_results.py``)."""

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


def _readme_results():
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_results", README.parent / "scripts" / "readme_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_readme_result_tables_equal_the_results_files():
    """Every marked README table is the benchmark's own table (``make results`` regenerates them)."""
    mod = _readme_results()
    text = README.read_text()
    new, changed = mod.render(text)
    assert changed == [], f"README tables differ from benchmarks/results: {changed}; run make results"
    assert len(mod.BLOCK.findall(text)) >= 5


def test_readme_results_check_catches_an_edited_figure(tmp_path):
    mod = _readme_results()
    text = README.read_text()
    m = mod.BLOCK.search(text)
    row = m["body"].splitlines()[2]
    edited = text.replace(row, row.replace("|", "| 99.99 |", 1), 1)
    readme = tmp_path / "README.md"
    readme.write_text(edited)
    assert mod.main(["--check", "--readme", str(readme)]) == 1
    assert mod.main(["--readme", str(readme)]) == 0  # rewrites the block from the file
    assert readme.read_text() == text
