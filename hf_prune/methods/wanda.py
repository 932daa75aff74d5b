"""Wanda: pruning by weights and activations (Sun et al. 2023, "A Simple and Effective Pruning Approach for Large
Language Models")."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..linear import matrix_view, stored_layout
from .base import PruningMethod, register_method


class WandaMethod(PruningMethod):
    """Score |W_ij| * ||X_j||: a weight matters as much as the inputs it multiplies are large. On LLMs a few input
    features carry outliers orders of magnitude above the rest, which magnitude alone ignores. Needs only the input
    norms from a calibration set -- no gradients, no weight update -- so one-shot pruning costs one forward pass.

    One-shot (`hf_prune.oneshot`), weights are compared within each output row, as the paper does. In gradual pruning
    (`PruningConfig(method="wanda")` in `PruningTrainer` or a callback) the norms are accumulated from the training
    batches' forward passes and the weights ranked within the config's scope.
    """

    needs_inputs = True
    comparison_group = "row"

    def attach(self, modules: dict[str, nn.Module]) -> None:
        super().attach(modules)
        # Per input feature: the sum over tokens of x_j^2, and the token count (a mean keeps the scale comparable
        # across layers and batches).
        self.squared_norms = {n: torch.zeros(matrix_view(m).shape[1], dtype=torch.float32, device=m.weight.device)
                              for n, m in modules.items()}
        self.tokens = {n: 0 for n in modules}

    @torch.no_grad()
    def observe(self, name: str, inputs: torch.Tensor) -> None:
        flat = inputs.detach().reshape(-1, inputs.shape[-1]).float()
        norms = self.squared_norms[name]
        norms += flat.pow(2).sum(dim=0).to(norms.device)
        self.tokens[name] += flat.shape[0]

    def input_norms(self, name: str) -> torch.Tensor:
        """||X_j|| per input feature, root of the mean square over the tokens seen (zeros before any)."""
        return (self.squared_norms[name] / max(self.tokens[name], 1)).sqrt()

    def scores(self, name: str, module: nn.Module) -> torch.Tensor:
        matrix = matrix_view(module).detach().abs().float()
        return stored_layout(module, matrix * self.input_norms(name).to(matrix.device).unsqueeze(0))

    def state_dict(self) -> dict[str, Any]:
        return {"squared_norms": {n: t.clone() for n, t in self.squared_norms.items()}, "tokens": dict(self.tokens)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, saved in state.get("squared_norms", {}).items():
            if name in self.squared_norms:
                self.squared_norms[name].copy_(saved)
        self.tokens.update({n: int(v) for n, v in state.get("tokens", {}).items() if n in self.tokens})

    def detach(self, name: str) -> None:
        self.squared_norms.pop(name, None)
        self.tokens.pop(name, None)


register_method("wanda", WandaMethod)
