"""Re-execute the notebooks with their own (small, stories260K) parameters and store the outputs that
nbval compares (`make test-notebooks`), without stderr noise (progress bars, library warnings).

    python scripts/store_notebooks.py [notebooks/fig1_weight_magnitudes.ipynb ...]   (default: all)
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nbformat


def store(path: Path) -> None:
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
                    str(path)], check=True)
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if not (o.output_type == "stream" and o.name == "stderr")]
    nbformat.write(nb, path)
    print("stored", path)


if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    for p in sys.argv[1:] or sorted((root / "notebooks").glob("*.ipynb")):
        store(Path(p))
