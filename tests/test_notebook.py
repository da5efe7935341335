"""notebooks/continuum.ipynb runs top to bottom on a fresh machine (quick setting, tiny models)."""

import re
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "notebooks" / "continuum.ipynb"
sys.path.insert(0, str(ROOT))  # benchmarks/ is importable from the repository root


def _kernel_name() -> str:
    """``python3``: the venv's ipykernel spec, or (none installed) ipykernel's built-in one, which
    jupyter_client resolves itself. Either runs ``sys.executable`` (checked below); nothing is registered."""
    spec = KernelSpecManager().get_kernel_spec("python3")
    assert spec.language == "python"
    return "python3"


def _text(outputs) -> str:
    parts = []
    for out in outputs:
        if out.get("output_type") == "stream":
            parts.append(out.get("text", ""))
        elif "data" in out and "text/plain" in out["data"]:
            parts.append(out["data"]["text/plain"])
    return "".join(parts)


@pytest.mark.slow
def test_notebook_runs_top_to_bottom(monkeypatch):
    for name in ("BNLL_RUN_DIR", "BNLL_CONTINUUM_CSV"):  # the fresh-machine path: run the quick fits itself
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(
        nb, timeout=180, kernel_name=_kernel_name(), resources={"metadata": {"path": str(NOTEBOOK.parent)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    text = "\n".join(_text(cell.get("outputs", [])) for cell in nb.cells if cell.cell_type == "code")
    # The kernel is this interpreter, in this venv (a realpath would hide a system python).
    assert re.search(r"kernel python: (\S+) \(prefix (\S+)\)", text).groups() == (sys.executable, sys.prefix)
    # 1. the family's weights peak at alpha / (alpha + 1): 0 for NLL, 1/2 for -p, 10/11 for alpha = 10
    peaks = dict(re.findall(r"^(.+?)\s+W peaks at p = ([0-9.]+)", text, re.M))
    assert float(peaks["NLL (α = 0)"]) < 0.01 and abs(float(peaks["−p (α = 1)"]) - 0.5) < 1e-3
    assert abs(float(peaks["α = 10"]) - 10 / 11) < 1e-3
    # 2. a trajectory of every optimizer step, read from the event files, along which alpha moved
    trajectory = r"alpha trajectory: (\d+) steps, alpha ([0-9.]+) -> ([0-9.]+) \(max ([0-9.]+)\)"
    steps, start, end, top = re.search(trajectory, text).groups()
    assert int(steps) == 30 and float(top) > float(start)
    # 3. the quick study: every run of its tasks x objectives x seeds, plus one base model per task
    from benchmarks import continuum

    quick = continuum.QUICK
    runs = len(quick["tasks"]) * (1 + len(continuum.OBJECTIVE_KEYS) * quick["seeds"])
    assert f"benchmark rows: {runs} from" in text
    images = sum("image/png" in out.get("data", {}) for cell in nb.cells for out in cell.get("outputs", []))
    assert images == 3
