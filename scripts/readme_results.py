"""Fill the README's result tables from ``benchmarks/results/*.md`` (which the benchmarks write from their JSON).

A block in the README::

    <!-- results: mobilenet table 1 -->
    ...anything...
    <!-- /results -->

is replaced by table 1 (counting from 1, in file order) of ``benchmarks/results/mobilenet.md``, followed by
the table's provenance line (results file and the machine/date line of the benchmark).  ``--check`` changes
nothing and exits 1, naming the block, when the README differs from what the files give (``make test`` runs
it through ``tests/test_readme.py``); without it the README is rewritten in place (``make results``).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- results: (?P<name>[\w-]+) table (?P<n>\d+) -->\n)(?P<body>.*?)(<!-- /results -->)", re.S)


def tables(md: str) -> list[str]:
    """The markdown tables of ``md`` (runs of lines starting with ``|``), in order."""
    out, cur = [], []
    for line in md.splitlines():
        if line.startswith("|"):
            cur.append(line)
        elif cur:
            out.append("\n".join(cur))
            cur = []
    if cur:
        out.append("\n".join(cur))
    return out


def machine_line(md: str) -> str:
    """The benchmark's ``Machine: ...; <date>`` line, shortened to the date (ISO, UTC) if present."""
    m = re.search(r"^Machine: .*?(\d{4}-\d{2}-\d{2})T", md, re.M)
    return m.group(1) if m else "?"


def render_block(name: str, n: int, results: Path = RESULTS) -> str:
    path = results / f"{name}.md"
    if not path.is_file():
        raise SystemExit(f"readme_results: {path} not found (block 'results: {name} table {n}')")
    md = path.read_text()
    ts = tables(md)
    if not 1 <= n <= len(ts):
        raise SystemExit(f"readme_results: {path} has {len(ts)} tables, the README asks for table {n}")
    rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return f"{ts[n - 1]}\n\n<sub>Rendered from `{rel}` (measured {machine_line(md)}) by `make results`.</sub>\n"


def render(readme: str, results: Path = RESULTS) -> tuple[str, list[str]]:
    """``(new_readme, names of blocks that changed)``."""
    changed = []

    def sub(m: re.Match) -> str:
        body = render_block(m["name"], int(m["n"]), results)
        if body != m["body"]:
            changed.append(f"{m['name']} table {m['n']}")
        return m.group(1) + body + m.group(5)

    return BLOCK.sub(sub, readme), changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if the README differs from the results files")
    ap.add_argument("--readme", default=str(ROOT / "README.md"))
    args = ap.parse_args(argv)
    path = Path(args.readme)
    new, changed = render(path.read_text())
    if args.check:
        if changed:
            print(f"README result tables differ from benchmarks/results: {', '.join(changed)} (run make results)",
                  file=sys.stderr)
            return 1
        return 0
    if changed:
        path.write_text(new)
        print(f"updated: {', '.join(changed)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
