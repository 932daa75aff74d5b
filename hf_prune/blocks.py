"""Which transformer block a module is in: from the architecture's layout when hf_prune knows it, else from the
names Transformers gives block lists (`config.BLOCK_NAMES`)."""

from __future__ import annotations

import re
from typing import Iterable, Optional

from torch import nn

from .config import BLOCK_NAMES
from .structure import find_layers

# `encoder.layer.3.attention...` -> ("encoder.layer.3", 3)
BLOCK_PATH = re.compile(rf"^(?P<path>.*?(?:^|\.){BLOCK_NAMES}\.(?P<index>\d+))\.")


def module_layers(model: nn.Module, names: Iterable[str]) -> dict[str, Optional[tuple[str, int]]]:
    """{module name: (path of its transformer block, block index)} or None for a module outside the blocks.

    Blocks come from the architecture's layout (`hf_prune.structure.find_layers`) when hf_prune knows it, else from
    the naming `PruningConfig`'s default targets match (`layer.3.`, `layers.3.`, `h.3.`, `blocks.3.`).
    """
    prefixes: list[tuple[str, int]] = []
    try:
        _, layers = find_layers(model)
        path_of = {id(module): name for name, module in model.named_modules()}
        prefixes = [(path_of[id(layer)], i) for i, layer in enumerate(layers) if id(layer) in path_of]
    except ValueError:
        pass
    result: dict[str, Optional[tuple[str, int]]] = {}
    for name in names:
        found = next(((p, i) for p, i in prefixes if name.startswith(p + ".")), None)
        if found is None:
            match = BLOCK_PATH.match(name)
            found = (match.group("path"), int(match.group("index"))) if match else None
        result[name] = found
    return result
