"""The notebooks in notebooks/ run from top to bottom, offline, on the packaged MiniLM and tweet data, so they never
rot; and they are committed without outputs.

Running them needs the `notebooks` extra (nbclient, nbformat, ipykernel, matplotlib), the packaged assets, and for
notebooks 5 and 6 the `onnx` extra; without them those tests skip, so a dev install without the extra runs
`python -m pytest -q` as before. CI's Transformers 4.57 leg installs the extra and runs them (about 11 minutes on an
idle 2-core machine); its Transformers 5 leg deselects them with `-m "not onnx and not notebooks"`. Deselect them
locally the same way: `python -m pytest -q -m "not notebooks"`.

Each notebook runs in a fresh kernel of this very interpreter (a kernelspec written to a temporary folder, so no
`python3` kernel installed elsewhere on the machine, pointing at another Python, can be picked up). Its working
directory and TMPDIR (where the notebooks write models, exports and pictures) are a temporary folder, emptied when
the notebook passed and kept for a look when it failed, with the executed notebook beside it.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import sys
import time

import pytest
from conftest import requires_packaged_assets

from hf_prune.export import is_onnx_available

NOTEBOOK_DIR = pathlib.Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
# Notebooks that export to ONNX Runtime (export_onnx, run_benchmark, hf-prune optimize).
NEEDS_ONNX = {"05_onnx_int8_benchmark", "06_optimize_your_csv"}
# Seconds one cell may run; a whole notebook takes 1-3 minutes on 2 CPU cores.
CELL_TIMEOUT = 600
KERNEL_NAME = "hf-prune-notebooks"
INSTALL_HINT = "the notebooks extra is not installed: pip install -e '.[notebooks]'"


def test_the_notebooks_are_there_and_listed():
    assert len(NOTEBOOKS) == 6, [p.name for p in NOTEBOOKS]
    index = (NOTEBOOK_DIR / "README.md").read_text(encoding="utf-8")
    missing = [p.name for p in NOTEBOOKS if p.name not in index]
    assert not missing, f"notebooks/README.md does not list {missing}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(path):
    # Plain JSON, so this runs without the extra: outputs belong to whoever runs the notebook, not to git.
    notebook = json.loads(path.read_text(encoding="utf-8"))
    assert notebook["nbformat"] == 4
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    for i, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"{path.name}: cell {i} has outputs"
    assert notebook["cells"][0]["cell_type"] == "markdown", f"{path.name} should open with what it shows and why"


@pytest.fixture(scope="module")
def kernel_dirs(tmp_path_factory) -> list[str]:
    """A kernelspec folder whose only kernel is ipykernel on `sys.executable` (this venv's Python)."""
    pytest.importorskip("ipykernel", reason=INSTALL_HINT)
    root = tmp_path_factory.mktemp("kernels")
    spec = root / KERNEL_NAME
    spec.mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python {sys.version.split()[0]} ({sys.prefix})",
        "language": "python",
    }), encoding="utf-8")
    return [str(root)]


# What each notebook must print: the lines that show its point, read from the executed notebook's outputs.
PRINTS = {
    "01_two_lines": ("of the targeted weights are zero", "reloaded with plain from_pretrained:"),
    "02_movement_distillation": ("| dense | 0% |", "| movement + distillation |"),
    "03_structured_pruning": ("after recovery: test accuracy", "heads per layer after reload:"),
    "04_sensitivity_allocation": ("most sensitive at 90%:", "allocated 70%, after 20 distilled steps:"),
    "05_onnx_int8_benchmark": (" int8: ", "'variant': 'int8'"),
    "06_optimize_your_csv": ("heads per layer:", "'file_name'"),
}


def printed(notebook) -> str:
    """Everything the executed notebook's code cells wrote: streams and displayed text results."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                parts.append(output.get("text", ""))
            elif "data" in output:
                parts.append(output["data"].get("text/plain", ""))
    return "".join(parts)


def test_every_notebook_has_what_it_prints_listed():
    assert sorted(PRINTS) == [p.stem for p in NOTEBOOKS]


def _notebook_params():
    for path in NOTEBOOKS:
        marks = [pytest.mark.onnx] if path.stem in NEEDS_ONNX else []
        yield pytest.param(path, id=path.stem, marks=marks)


@pytest.mark.notebooks
@pytest.mark.slow
@requires_packaged_assets
@pytest.mark.parametrize("path", list(_notebook_params()))
def test_notebook_runs(path, kernel_dirs, tmp_path):
    nbclient = pytest.importorskip("nbclient", reason=INSTALL_HINT)
    nbformat = pytest.importorskip("nbformat", reason=INSTALL_HINT)
    pytest.importorskip("matplotlib", reason=INSTALL_HINT)
    if path.stem in NEEDS_ONNX and not is_onnx_available():
        pytest.skip("the onnx extra is not installed: pip install -e '.[onnx]'")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    notebook = nbformat.read(path, as_version=4)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    manager = AsyncKernelManager(kernel_name=KERNEL_NAME,
                                 kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs))
    client = nbclient.NotebookClient(notebook, km=manager, timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(tmp_path)}})
    start = time.perf_counter()
    try:
        # cleanup_kc: nbclient shuts down only kernels of managers it created itself; without it every notebook's
        # kernel (and the CPU its threads hold) would live until pytest exits.
        client.execute(cleanup_kc=True, env={**os.environ, "TMPDIR": str(scratch)})
    finally:
        if manager.has_kernel:
            nbclient.util.run_sync(manager.shutdown_kernel)(now=True)
        # The executed copy, outputs and all, for a look after a failure (pytest keeps the last runs' tmp folders).
        nbformat.write(notebook, str(tmp_path / path.name))
    text = printed(notebook)
    missing = [fragment for fragment in PRINTS[path.stem] if fragment not in text]
    assert not missing, f"{path.name} ran but did not print {missing}; it printed:\n{text[-3000:]}"
    shutil.rmtree(scratch)  # passed: the models and exports it wrote (hundreds of MB) are not needed
    print(f"{path.name}: {time.perf_counter() - start:.0f} s")
