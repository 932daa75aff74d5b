"""Stand-ins for what is left of a block that lost all its heads or all its FFN neurons.

A layer without heads (or without FFN neurons) contributes exactly what the fully masked block contributed: the bias
of its output projection, broadcast over the tokens. Its attention (or MLP) is replaced by modules that compute just
that, with no zero-sized weights, so the model saves with safetensors and exports like any other.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

import torch
import transformers
from torch import nn

TRANSFORMERS_MAJOR = int(transformers.__version__.split(".")[0])

# ----------------------------------------------------------------------------------------------------------------
# Stand-ins for what is left of a block without heads or neurons
# ----------------------------------------------------------------------------------------------------------------


class BiasOnly(nn.Module):
    """A projection whose inputs are all gone: returns its bias (zeros without one) for every token.

    The bias keeps the parameter name of the projection it replaces (`...o_proj.bias`), so checkpoints stay readable.
    """

    def __init__(self, bias: Optional[torch.Tensor], out_features: int) -> None:
        super().__init__()
        self.in_features = 0
        self.out_features = out_features
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=bias.requires_grad)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        out = hidden_states.new_zeros((*hidden_states.shape[:-1], self.out_features))
        # A fresh tensor, not an expanded view of the parameter, so later in-place ops cannot write into the bias.
        return out if self.bias is None else out + self.bias

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, bias={self.bias is not None}"


class ZeroWidth(nn.Module):
    """A projection with no outputs left: returns a tensor whose last dimension is 0."""

    def __init__(self, in_features: int) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = 0

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states.new_zeros((*hidden_states.shape[:-1], 0))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features=0"


def _hidden_states_of(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    for key in ("hidden_states", "query", "x"):
        if kwargs.get(key) is not None:
            return kwargs[key]
    raise TypeError("hf_prune: an attention module without heads was called without hidden states.")


def _keep_cache_length(layer_idx: Optional[int], hidden_states: torch.Tensor, kwargs: dict) -> None:
    """Write a one-head, one-channel placeholder into the KV cache for a layer without heads.

    Generation reads the number of tokens seen from the cache of layer 0 (`cache.get_seq_length()`), and an empty
    tensor counts as no tokens at all, so a layer without heads must still grow its cache entry by the tokens it saw.
    The placeholder holds ones because static caches count the non-zero slots. It costs one scalar per token.
    """
    cache = None
    for key in ("cache", "past_key_values", "past_key_value", "layer_past"):
        if kwargs.get(key) is not None:
            cache = kwargs[key]
            break
    if cache is None or layer_idx is None or not hasattr(cache, "update"):
        return
    cache = getattr(cache, "self_attention_cache", cache)
    placeholder = hidden_states.new_ones((hidden_states.shape[0], 1, hidden_states.shape[-2], 1))
    if TRANSFORMERS_MAJOR < 5:
        cache.update(placeholder, placeholder, layer_idx, {"cache_position": kwargs.get("cache_position")})
    else:
        cache.update(placeholder, placeholder, layer_idx)


class NoHeadsSelfAttention(nn.Module):
    """BERT-style `attention.self` without heads: a context of width 0 (the output projection is a `BiasOnly`)."""

    def __init__(self, head_dim: int, layer_idx: Optional[int]) -> None:
        super().__init__()
        self.num_attention_heads = 0
        self.attention_head_size = head_dim
        self.all_head_size = 0
        self.layer_idx = layer_idx

    def forward(self, *args: Any, **kwargs: Any) -> tuple:
        hidden_states = _hidden_states_of(args, kwargs)
        _keep_cache_length(self.layer_idx, hidden_states, kwargs)
        return hidden_states.new_zeros((*hidden_states.shape[:-1], 0)), None


class EmptyAttention(nn.Module):
    """A whole attention module (DistilBERT, GPT-2, Llama-style) without heads: output = output-projection bias.

    It keeps the output projection under its original name (as a `BiasOnly`), the bookkeeping attributes of the
    module it replaces (with head counts of 0), and the return convention of its Transformers version.
    """

    def __init__(
        self,
        output_name: str,
        output: BiasOnly,
        bookkeeping: Mapping[str, Any],
        pruned_heads: set[int],
        layer_idx: Optional[int],
        dropout: Optional[nn.Module] = None,
        legacy_distilbert: bool = False,
    ) -> None:
        super().__init__()
        self.output_name = output_name
        setattr(self, output_name, output)
        self.resid_dropout = dropout
        for name, value in bookkeeping.items():
            setattr(self, name, value)
        self.pruned_heads = set(pruned_heads)
        self.layer_idx = layer_idx
        # DistilBERT under Transformers 4.x returns (output,) or (output, weights); everything else (output, weights).
        self.legacy_distilbert = legacy_distilbert

    def forward(self, *args: Any, **kwargs: Any) -> tuple:
        hidden_states = _hidden_states_of(args, kwargs)
        if getattr(self, "keeps_cache", True):
            _keep_cache_length(self.layer_idx, hidden_states, kwargs)
        out = getattr(self, self.output_name)(hidden_states[..., :0])
        if self.resid_dropout is not None:
            out = self.resid_dropout(out)
        if self.legacy_distilbert and not kwargs.get("output_attentions", False):
            return (out,)
        # Forwards that return (output, weights, cache) under some versions (wav2vec2 under 4.x) get as many values.
        return (out,) + (None,) * (getattr(self, "outputs", 2) - 1)




# ----------------------------------------------------------------------------------------------------------------
# Norms that keep the statistics of the width before hidden channels were removed
# ----------------------------------------------------------------------------------------------------------------


class ExactLayerNorm(nn.Module):
    """LayerNorm over the hidden channels left, with mean and variance taken over `elements` channels.

    Removing hidden channels changes the number of elements a LayerNorm averages over, so removal is not exact even
    when the removed channels were zero. A zero channel adds 0 to the sum and (0 - mean)^2 to the squared deviations,
    so with N = `elements` (the width the norm averaged over before) and n channels left:

        mean = sum(x) / N,   var = (sum((x - mean)^2) + (N - n) * mean^2) / N

    which is exactly what the wider LayerNorm computed. The price is speed: ONNX Runtime fuses `nn.LayerNorm` into
    one kernel, this runs as a handful of element-wise ops. Minitron (Muralidharan et al. 2024) uses plain LayerNorms
    of the new width and recovers by distillation; `prune_hidden(..., exact=False)` does that.
    """

    def __init__(self, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float, elements: int) -> None:
        super().__init__()
        self.weight = None if weight is None else nn.Parameter(weight.detach().clone(), weight.requires_grad)
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), bias.requires_grad)
        self.eps = eps
        self.elements = elements

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.float()  # as nn.LayerNorm: statistics in float32 whatever the input dtype
        mean = x.sum(-1, keepdim=True) / self.elements
        centered = x - mean
        missing = self.elements - x.shape[-1]
        var = (centered.pow(2).sum(-1, keepdim=True) + missing * mean.pow(2)) / self.elements
        out = centered * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            out = out * self.weight.float()
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(dtype)

    def extra_repr(self) -> str:
        width = None if self.weight is None else self.weight.shape[0]
        return f"width={width}, elements={self.elements}, eps={self.eps}"


class ExactRMSNorm(nn.Module):
    """RMSNorm (Llama-style: float32 statistics, weight applied in the input dtype) with the mean of squares taken
    over `elements` channels, so that removing zero channels leaves the output exact; see `ExactLayerNorm`.

    `plain_class` is the RMSNorm class it replaced (built as `plain_class(width, eps=eps)`), so that pruning again
    with `exact=False` gets the model's own norm back.
    """

    def __init__(self, weight: Optional[torch.Tensor], eps: float, elements: int, plain_class: type) -> None:
        super().__init__()
        self.weight = None if weight is None else nn.Parameter(weight.detach().clone(), weight.requires_grad)
        self.eps = eps
        self.elements = elements
        self.plain_class = plain_class

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        dtype = hidden_states.dtype
        x = hidden_states.float()
        x = x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) / self.elements + self.eps)
        return x.to(dtype) if self.weight is None else self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        width = None if self.weight is None else self.weight.shape[0]
        return f"width={width}, elements={self.elements}, eps={self.eps}"
