"""Dotted module paths below a root module: the one place that reads, finds and replaces submodules by path."""

from __future__ import annotations

from typing import Any, Optional

from torch import nn


def get_module(root: nn.Module, path: str) -> Any:
    """The module at dotted `path` below `root` ("" is `root` itself)."""
    for part in path.split(".") if path else ():
        root = getattr(root, part)
    return root


def find_module(root: nn.Module, path: str) -> Optional[nn.Module]:
    """The module at `path` below `root`, or None when any part of the path is missing."""
    try:
            return get_module(root, path)
    except AttributeError:
        return None


def set_module(root: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_module(root, parent) if parent else root, name, value)


def module_path(root: nn.Module, module: nn.Module) -> str:
    """The dotted path of `module` inside `root` ("" for `root` itself)."""
    for name, candidate in root.named_modules(remove_duplicate=False):
        if candidate is module:
            return name
    raise ValueError(f"hf_prune: {type(module).__name__} is not a submodule of {type(root).__name__}.")
