"""What structural removal can buy at best: the floating-point operations of a transformer's layers, read off the
layer shapes (kept heads, FFN neurons, hidden size and layers). Benchmarks divide a baseline's by a pruned model's
to get the FLOP-ratio limit of its speedup."""

from __future__ import annotations

from torch import nn

from .structure import structure_summary


def encoder_flops(model: nn.Module, seq_len: int) -> int:
    """Floating-point operations per example in the transformer layers (2 x multiply-accumulates).

    Projections and FFN scale with the kept heads and neurons and with the hidden size left after width pruning;
    attention scores and the weighted sum with the kept heads and seq_len^2; only the layers left after depth pruning
    count. Embeddings and the task head are left out (a lookup and a few thousand MACs).
    """
    summary = structure_summary(model)
    # Read off the model: after width pruning hidden_size // num_attention_heads no longer gives head_dim.
    hidden = summary["hidden_size"]
    head_dim = summary["head_dim"]
    total = 0
    for heads, inter in zip(summary["heads_per_layer"], summary["intermediate_sizes"]):
        width = heads * head_dim
        per_token = 2 * (3 * hidden * width + width * hidden) + 2 * 2 * hidden * inter
        attention = 2 * 2 * seq_len * seq_len * width
        total += per_token * seq_len + attention
    return total
