"""Output files of a run: results.json (everything), results.md (the table and the rules), the PNG
plots; and `compare`, the side-by-side table of two runs' results.
"""

from __future__ import annotations

import json
from pathlib import Path

from eval.figures import write_plots
from eval.tables import compare_table, markdown, rules_for
from eval.tasks import DataError


def _load_results(run: str | Path) -> dict:
    path = Path(run)
    path = path / "results.json" if path.is_dir() else path
    if not path.is_file():
        raise DataError(f"no results.json at {path}.")
    return json.loads(path.read_text(encoding="utf-8"))


def compare(run_a: str | Path, run_b: str | Path) -> str:
    """Markdown table of two runs' headline numbers, with their 95% intervals and B - A."""
    return compare_table(_load_results(run_a), _load_results(run_b), str(run_a), str(run_b))


def write_results(out: Path, results: dict) -> None:
    results["rules"] = rules_for(results)
    results["plots"] = write_plots(out, results)
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    (out / "results.md").write_text(markdown(results), encoding="utf-8")
