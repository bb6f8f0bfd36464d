"""Execute the analysis notebooks (jupytext py:percent scripts beside this file) and save them,
with their outputs, as .ipynb files and their figures as png.

    python notebooks/render.py                                   # the smoke results in ./mlflow.db
    python notebooks/render.py --tracking-uri sqlite:///gpu.db --out runs/notebooks-gpu \\
        --set compare_experiment=compare-gpu-small --set k_sweep_experiment=k-sweep-gpu-small

Each notebook's `parameters` cell holds its defaults; `--tracking-uri` and each `--set name=value`
(the value is read as a Python literal, else kept as a string) are injected after it, into the
notebooks whose parameters name them, as papermill does. A cell that raises stops the run with
the notebook's name and the error, and a non-zero exit status.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "runs" / "notebooks"


def notebooks(names: Sequence[str] = ()) -> list[Path]:
    """The notebook scripts: every *.py here but this one, or those named."""
    found = sorted(p for p in HERE.glob("*.py") if p.name != Path(__file__).name)
    if not names:
        return found
    by_name = {p.stem: p for p in found}
    unknown = [n for n in names if Path(n).stem not in by_name]
    if unknown:
        raise SystemExit(f"render: unknown notebook(s) {', '.join(unknown)}; there are {', '.join(by_name)}")
    return [by_name[Path(n).stem] for n in names]


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def parameter_names(notebook) -> set[str]:
    cell = next((c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])), None)
    if cell is None:
        return set()
    return {t.id for node in ast.parse(cell.source).body if isinstance(node, ast.Assign) for t in node.targets
            if isinstance(t, ast.Name)}


def inject(notebook, values: dict[str, Any]) -> None:
    """Add a cell setting `values` after the parameters cell (only the names it defines)."""
    import nbformat

    names = parameter_names(notebook)
    chosen = {k: v for k, v in values.items() if k in names}
    if not chosen:
        return
    index = next(i for i, c in enumerate(notebook.cells) if "parameters" in c.metadata.get("tags", []))
    source = "# injected by notebooks/render.py\n" + "".join(f"{k} = {v!r}\n" for k, v in chosen.items())
    notebook.cells.insert(index + 1, nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]}))


def render(path: Path, out: Path, values: dict[str, Any], timeout: int = 600) -> Path:
    """Execute one notebook script; its figures go to out/<name>/, the executed notebook to out/<name>.ipynb."""
    import jupytext
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    notebook = jupytext.read(path)
    inject(notebook, {**values, "figures_dir": str(out / path.stem)})
    client = NotebookClient(notebook, kernel_name="python3", timeout=timeout,
                            resources={"metadata": {"path": str(path.parent)}})
    target = out / f"{path.stem}.ipynb"
    out.mkdir(parents=True, exist_ok=True)
    try:
        client.execute()
    except CellExecutionError as exc:
        nbformat.write(notebook, target)  # keep what ran, for reading the failure
        raise RuntimeError(f"notebook {path.name} failed (partial output in {target}):\n{exc}") from None
    nbformat.write(notebook, target)
    return target


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI the notebooks read (default: theirs)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default: {DEFAULT_OUT})")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", help="a parameter's value")
    args = parser.parse_args(argv)
    values: dict[str, Any] = {}
    if args.tracking_uri:
        values["tracking_uri"] = args.tracking_uri
    for item in args.set:
        name, sep, value = item.partition("=")
        if not sep or not name.isidentifier():
            parser.error(f"--set {item!r}: expected NAME=VALUE")
        values[name] = _literal(value)
    out = args.out.resolve()
    try:
        for path in notebooks(args.names):
            target = render(path, out, values)
            print(f"render: {path.name} -> {target} (figures in {out / path.stem})", flush=True)
    except RuntimeError as exc:
        print(f"render: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
