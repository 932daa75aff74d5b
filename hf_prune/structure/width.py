"""Width pruning: hidden (residual-stream) channels removed physically, in place, in the ORIGINAL numbering.

Minitron (Muralidharan et al. 2024, "Compact Language Models via Pruning and Knowledge Distillation") prunes the
embedding dimension of a transformer alongside heads, FFN neurons and layers. One hidden channel is one column of
every embedding table, one output row of every projection that writes the residual stream (attention output, FFN
down projection), one input column of every projection that reads it (query/key/value, FFN up/gate, the pooler and
task heads, the LM head, tied to the embeddings or not) and one element of every LayerNorm / RMSNorm over it; all of
them go together. Heads keep their `head_dim`: only the matrices' hidden side shrinks.

Norms. A LayerNorm or RMSNorm averages over the hidden channels, so removing channels changes its statistics even
when those channels were zero: plain removal is not exact. `exact=True` replaces every norm over the hidden size by
`ExactLayerNorm` / `ExactRMSNorm`, which keep the element count of the width before removal, so removing channels
that were zero everywhere (`zero_hidden_channels`) leaves the outputs unchanged. The default, `exact=False`, keeps
the model's own norms at the new width, as Minitron does (a distilled recovery fine-tune follows), because a plain
`nn.LayerNorm` is what ONNX Runtime fuses into a single kernel, and speed is what width pruning is for.

Channels are named by their index in the ORIGINAL hidden size, so repeated calls compose: naming an already removed
channel again is a no-op. The change is recorded in `config.hidden_size` (`n_embd`, `dim`) and in the structure
record; `load_pruned` rebuilds it. The pruned parameters are new tensors: build the optimizer afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Optional

import torch
from torch import nn
from transformers.utils import logging

from ..linear import is_conv1d, is_prunable_module
from .layout import (
    ADAPTED_READERS,
    BASE_ADAPTERS,
    HEAD_ADAPTERS,
    HEAD_READERS,
    HIDDEN_ATTR,
    attention_sites,
    find_layers,
    head_dim_of,
    hidden_layout,
    hidden_size_of,
    pruned_hidden_of,
)
from .paths import find_module, get_module, module_path, set_module
from .record import check_config_change, record_structure
from .slicing import check_plain
from .spec import MoeLayout
from .standins import BiasOnly, ExactLayerNorm, ExactRMSNorm, ZeroWidth

logger = logging.get_logger(__name__)


@dataclass
class HiddenSites:
    """Every module that touches the residual stream, by path from the model root."""

    width: int  # current hidden size
    original: int  # hidden size before any channel was removed
    pruned: set[int]  # ORIGINAL indices of the channels already removed
    embeddings: list[tuple[str, nn.Module]] = field(default_factory=list)
    parameters: list[tuple[str, nn.Module, str]] = field(default_factory=list)  # (path, owner, name): last dim
    # Bare tensors that read or write the stream along an axis (fused experts, a router's weight): (path, owner,
    # name, axis).
    tensor_readers: list[tuple[str, nn.Module, str, int]] = field(default_factory=list)
    tensor_writers: list[tuple[str, nn.Module, str, int]] = field(default_factory=list)
    norms: list[tuple[str, nn.Module]] = field(default_factory=list)
    readers: list[tuple[str, nn.Module]] = field(default_factory=list)  # inputs are hidden channels
    writers: list[tuple[str, nn.Module]] = field(default_factory=list)  # outputs are hidden channels
    untouched: list[tuple[str, nn.Module]] = field(default_factory=list)  # head modules after an adapter
    size_attrs: list[tuple[object, str]] = field(default_factory=list)  # (object, attribute) holding the width

    def kept(self) -> list[int]:
        """ORIGINAL indices of the channels present, in the order of their positions."""
        return [c for c in range(self.original) if c not in self.pruned]


def _join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _optional(model: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _norm_kind(module: nn.Module) -> str:
    if isinstance(module, (nn.LayerNorm, ExactLayerNorm)):
        return "layer"
    if isinstance(module, ExactRMSNorm) or type(module).__name__.endswith("RMSNorm"):
        return "rms"
    if hasattr(module, "variance_epsilon") and getattr(module, "bias", None) is None:
        return "rms"  # T5LayerNorm: a root-mean-square norm under another name
    return ""


def hidden_sites(model: nn.Module) -> HiddenSites:
    """Where `model` reads and writes its residual stream (raises a ValueError for unsupported models).

    Every parameter of the model with a dimension equal to the hidden size must belong to one of the sites found:
    a module hf_prune does not know (a cross-attention, a masked-LM transform, a summary head) raises a ValueError
    naming it instead of being left at the old width.
    """
    layout, layers = find_layers(model)
    base = getattr(model, "base_model", model)
    base_path = module_path(model, base)
    pruned = pruned_hidden_of(model)
    width = hidden_size_of(layout, layers)
    sites = HiddenSites(width=width, original=width + len(pruned), pruned=pruned)
    specs = {}
    for stack in layers.stacks:
        specs[stack.layout.name] = hidden_layout(model, stack.layout)
    spec = specs[layout.name]

    def required(path: str) -> nn.Module:
        module = _optional(model, path)
        if module is None:
            raise ValueError(f"hf_prune: width pruning expected a module at {path!r} in {type(model).__name__}.")
        return module

    # ELECTRA and DeBERTa with embedding_size != hidden_size embed in a space of their own and project it onto the
    # stream: tables and norms of another width are not on the stream.
    for path in spec.embeddings:
        module = _optional(model, _join(base_path, path))
        if module is not None and getattr(module, "embedding_dim", width) == width:
            sites.embeddings.append((_join(base_path, path), module))
    for path in spec.writers:
        module = _optional(model, _join(base_path, path))
        if module is not None:
            sites.writers.append((_join(base_path, path), module))
    projected = bool(sites.writers)
    for path in spec.readers:
        module = _optional(model, _join(base_path, path))
        if module is not None:
            sites.readers.append((_join(base_path, path), module))
    for path in spec.parameters:
        owner_path, _, name = _join(base_path, path).rpartition(".")
        owner = _optional(model, owner_path)
        if isinstance(getattr(owner, name, None), nn.Parameter) and getattr(owner, name).shape[-1] == width:
            sites.parameters.append((_join(base_path, path), owner, name))
    if not (sites.embeddings or projected) or not all(isinstance(m, nn.Embedding) for _, m in sites.embeddings):
        raise ValueError(f"hf_prune: width pruning found no embedding table at {spec.embeddings} in {type(model).__name__}.")
    for path in spec.untouched:
        module = _optional(model, _join(base_path, path))
        if module is not None:
            sites.untouched.append((_join(base_path, path), module))
    norm_paths = [_join(base_path, p) for p in spec.norms
                  if (m := _optional(model, _join(base_path, p))) is not None
                  and getattr(getattr(m, "weight", None), "shape", (width,))[0] == width]
    for i, layer in enumerate(layers):
        stack, position = layers.stack_of(i)
        layer_spec = specs[stack.layout.name]
        layer_path = _join(stack.path, str(position))
        norm_paths += [_join(layer_path, p) for p in layer_spec.layer_norms
                       if _optional(model, _join(layer_path, p)) is not None]
        inputs = [p for a in stack.layout.attentions for p in (a.query, a.key, a.value, a.qkv, *a.extra_heads)]
        outputs = [a.output for a in stack.layout.attentions if a.present(layer)]
        if stack.layout.moe is not None:
            _add_moe_sites(sites, layer, layer_path, stack.layout.moe)
        else:
            mlp = stack.layout.require_mlp()
            inputs += [*mlp.inputs, mlp.fused]
            outputs.append(mlp.output)
        for path in inputs:
            module = _optional(model, _join(layer_path, path)) if path else None
            if module is not None:  # absent when the layer lost all its heads
                sites.readers.append((_join(layer_path, path), module))
        for path in outputs:
            sites.writers.append((_join(layer_path, path), required(_join(layer_path, path))))
        for path in layer_spec.layer_untouched:
            module = _optional(model, _join(layer_path, path))
            if module is not None:
                sites.untouched.append((_join(layer_path, path), module))
        for spec_attr in layer_spec.layer_size_attrs:
            path, _, attr = spec_attr.rpartition(".")
            owner = _optional(model, _join(layer_path, path))
            if owner is not None and isinstance(getattr(owner, attr, None), int):
                sites.size_attrs.append((owner, attr))
    for path in norm_paths:
        module = required(path)
        if not any(True for _ in module.parameters(recurse=False)):
            continue  # a norm switched off (ModernBERT's first attn_norm is an nn.Identity)
        if not _norm_kind(module):
            raise ValueError(f"hf_prune: {path!r} is a {type(module).__name__}, not a LayerNorm or RMSNorm.")
        sites.norms.append((path, module))
    for spec_attr in spec.size_attrs:
        path, _, attr = spec_attr.rpartition(".")
        owner = _optional(model, _join(base_path, path))
        if owner is not None and hasattr(owner, attr):
            sites.size_attrs.append((owner, attr))

    adapters = [_join(base_path, p) for p in BASE_ADAPTERS]
    # Task heads sit on the model root, also where the root is its own base model (T5ForConditionalGeneration).
    adapters += list(HEAD_ADAPTERS)
    adapters = [p for p in dict.fromkeys(adapters) if _optional(model, p) is not None]
    sites.readers += [(p, model.get_submodule(p)) for p in adapters]
    for path in list(HEAD_READERS) + ([] if adapters else ["classifier"]):
        module = _optional(model, path)
        if module is not None and is_prunable_module(module):
            sites.readers.append((path, module))
    if adapters:
        sites.untouched += [(p, m) for p in ADAPTED_READERS if (m := _optional(model, p)) is not None]
    for path, module in sites.readers + sites.writers:
        if not (is_prunable_module(module) or _is_conv(module) or isinstance(module, (ZeroWidth, BiasOnly))):
            raise ValueError(f"hf_prune: width pruning cannot slice {path!r} ({type(module).__name__}).")
    for name in ("embeddings", "norms", "readers", "writers"):
        unique, seen = [], set()
        for path, module in getattr(sites, name):
            if id(module) not in seen:
                seen.add(id(module))
                unique.append((path, module))
        setattr(sites, name, unique)
    _check_nothing_else(model, sites)
    return sites


def _add_moe_sites(sites: HiddenSites, layer: nn.Module, layer_path: str, moe: MoeLayout) -> None:
    """A mixture-of-experts block on the stream: the router and every expert read it, every expert writes it."""
    router = get_module(layer, moe.router)
    if is_prunable_module(router):
        sites.readers.append((_join(layer_path, moe.router), router))
    else:  # Transformers 5: a router module holding a bare (experts, hidden) weight
        sites.tensor_readers.append((_join(layer_path, moe.router, "weight"), router, "weight", 1))
    experts = get_module(layer, moe.experts)
    owners = [get_module(layer, moe.block), router, experts]
    if isinstance(experts, nn.ModuleList):
        for e, expert in enumerate(experts):
            path = _join(layer_path, moe.experts, str(e))
            sites.readers += [(_join(path, p), get_module(expert, p)) for p in moe.expert_mlp.inputs]
            sites.writers.append((_join(path, moe.expert_mlp.output), get_module(expert, moe.expert_mlp.output)))
            owners.append(expert)
    else:  # (experts, 2 * size, hidden) and (experts, hidden, size)
        path = _join(layer_path, moe.experts)
        sites.tensor_readers.append((_join(path, moe.fused_gate_up), experts, moe.fused_gate_up, 2))
        sites.tensor_writers.append((_join(path, moe.fused_down), experts, moe.fused_down, 1))
    if moe.shared is not None and find_module(layer, moe.shared.output) is not None:
        sites.readers += [(_join(layer_path, p), get_module(layer, p)) for p in moe.shared.inputs]
        sites.writers.append((_join(layer_path, moe.shared.output), get_module(layer, moe.shared.output)))
        owners.append(get_module(layer, moe.shared.owner))
    if moe.shared_gate and find_module(layer, moe.shared_gate) is not None:
        sites.readers.append((_join(layer_path, moe.shared_gate), get_module(layer, moe.shared_gate)))
    sites.size_attrs += [(owner, attr) for owner in owners for attr in moe.hidden_attrs
                         if isinstance(getattr(owner, attr, None), int) and getattr(owner, attr) == sites.width]


def _check_nothing_else(model: nn.Module, sites: HiddenSites) -> None:
    claimed = set()
    for _, module in sites.embeddings + sites.norms + sites.readers + sites.writers + sites.untouched:
        claimed.update(id(p) for p in module.parameters())
    claimed.update(id(getattr(owner, name)) for _, owner, name in sites.parameters)
    claimed.update(id(getattr(owner, name)) for _, owner, name, _ in sites.tensor_readers + sites.tensor_writers)
    unknown = [
        name for name, param in model.named_parameters()
        if id(param) not in claimed and sites.width in param.shape
    ]
    if unknown:
        raise ValueError(
            f"hf_prune: width pruning does not know how {unknown[:6]} of {type(model).__name__} use the hidden size "
            f"({sites.width}); supported are the encoder/decoder stack, the pooler and the classification, "
            "token-classification, question-answering and causal-LM heads."
        )


def _check_channels(channels: Iterable[int], original: int) -> set[int]:
    requested = {int(c) for c in channels}
    bad = sorted(c for c in requested if not 0 <= c < original)
    if bad:
        raise ValueError(
            f"hf_prune.prune_hidden: channels={bad[:10]}{' ...' if len(bad) > 10 else ''} do not exist; hidden "
            f"channels are 0 to {original - 1} (original numbering)."
        )
    return requested


class _Slicer:
    """Slices parameters once each, so that tied parameters (LM head = embeddings) stay one parameter."""

    def __init__(self, index: torch.Tensor) -> None:
        self.index = index
        self.done: dict[int, tuple[int, nn.Parameter]] = {}

    def __call__(self, param: nn.Parameter, dim: int) -> nn.Parameter:
        if id(param) in self.done:
            done_dim, new = self.done[id(param)]
            if done_dim != dim:
                raise ValueError("hf_prune: a parameter tied across modules is sliced along two different axes.")
            return new
        value = param.detach().index_select(dim, self.index.to(param.device)).contiguous()
        new = nn.Parameter(value, requires_grad=param.requires_grad)
        self.done[id(param)] = (dim, new)
        return new


def _norm_eps(module: nn.Module) -> float:
    for attr in ("eps", "variance_epsilon"):
        value = getattr(module, attr, None)
        if value is not None:
            return float(value)
    return float(torch.finfo(torch.float32).eps)  # nn.RMSNorm(eps=None)


def _prune_norm(model: nn.Module, path: str, module: nn.Module, slicer: _Slicer, width: int, exact: bool) -> None:
    weight = None if getattr(module, "weight", None) is None else slicer(module.weight, 0)
    bias = None if getattr(module, "bias", None) is None else slicer(module.bias, 0)
    eps = _norm_eps(module)
    kind = _norm_kind(module)
    if exact:
        # The element count of the statistics the norm computes now: a standin's own, a plain norm's width.
        elements = module.elements if isinstance(module, (ExactLayerNorm, ExactRMSNorm)) else width
        if kind == "layer":
            new = ExactLayerNorm(weight, bias, eps, elements)
        else:
            plain_class = module.plain_class if isinstance(module, ExactRMSNorm) else type(module)
            new = ExactRMSNorm(weight, eps, elements, plain_class)
        set_module(model, path, new.train(module.training))
        return
    n = int(slicer.index.numel())
    if isinstance(module, ExactLayerNorm):
        new = nn.LayerNorm(n, eps=eps, elementwise_affine=weight is not None, bias=bias is not None)
    elif isinstance(module, ExactRMSNorm):
        new = module.plain_class(n, eps=eps)
    else:
        new = module
    # Parameters are assigned, not copied: sliced tensors keep the model's dtype and device.
    if weight is not None:
        new.weight = weight
    if bias is not None:
        new.bias = bias
    if hasattr(new, "normalized_shape"):
        new.normalized_shape = (n,)
    if new is not module:
        set_module(model, path, new.train(module.training))


def _is_conv(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == 1


def _prune_reader(module: nn.Module, slicer: _Slicer, n: int) -> None:
    if _is_conv(module):  # input channels: weight (out, in, *kernel)
        module.weight = slicer(module.weight, 1)
        module.in_channels = n
    elif isinstance(module, ZeroWidth):
        module.in_features = n
    elif is_conv1d(module):
        module.weight = slicer(module.weight, 0)
        module.nx = n
    else:
        module.weight = slicer(module.weight, 1)
        module.in_features = n


def _prune_writer(module: nn.Module, slicer: _Slicer, n: int) -> None:
    if _is_conv(module):  # output channels
        module.weight = slicer(module.weight, 0)
        if module.bias is not None:
            module.bias = slicer(module.bias, 0)
        module.out_channels = n
        return
    if not isinstance(module, BiasOnly):
        module.weight = slicer(module.weight, 1 if is_conv1d(module) else 0)
    if module.bias is not None:
        module.bias = slicer(module.bias, 0)
    if is_conv1d(module):
        module.nf = n
    else:
        module.out_features = n


@torch.no_grad()
def prune_hidden(model: nn.Module, channels: Iterable[int], exact: bool = False) -> nn.Module:
    """Remove hidden (residual-stream) channels physically, in place; returns `model`.

    Args:
        model: a Transformers model whose layout describes its hidden size (README, the family table): a base model
            or one with a task head, pruned in other ways or not.
        channels: hidden channel indices in the ORIGINAL numbering (0 to the unpruned hidden size - 1). Channels
            already removed are ignored, so calls compose; at least one channel must stay.
        exact: keep every LayerNorm / RMSNorm's statistics over the width they had before this call
            (`ExactLayerNorm` / `ExactRMSNorm`), so that removing channels that were zero everywhere
            (`zero_hidden_channels`) is exact. The default (False) keeps the model's own norms at the new width:
            not exact, but what Minitron does before its recovery distillation, and ONNX Runtime fuses those norms
            into one fast kernel while the exact standins run as several element-wise ops.

    What reads the hidden states into a space of its own (the BERT pooler, RoBERTa's classification head, DistilBERT's
    pre-classifier) loses input columns only; its output width and the classifier behind it stay. `config.hidden_size`
    (`n_embd`, `dim`) is updated; Llama-style configs get an explicit `head_dim`, since `hidden_size //
    num_attention_heads` no longer gives it. Reload with `load_pruned`.
    """
    channels = list(channels)
    if not channels:
        # Nothing to remove: no need to know where the hidden size lives (load_pruned calls this for every model).
        return model
    sites = hidden_sites(model)
    requested = _check_channels(channels, sites.original)
    new = requested - sites.pruned
    if not new:
        return model
    kept = sites.kept()
    positions = [pos for pos, c in enumerate(kept) if c not in new]
    if not positions:
        raise ValueError(
            f"hf_prune.prune_hidden: channels= would remove all {len(kept)} hidden channels left (of "
            f"{sites.original}); at least one must stay."
        )
    for path, module in sites.embeddings + sites.readers + sites.writers:
        if not isinstance(module, (ZeroWidth, BiasOnly)):
            check_plain(module, path)
    layout, layers = find_layers(model)
    site = attention_sites(model, layers)[0]
    head_dim = head_dim_of(site.spec, site.layer)
    n = len(positions)
    config = getattr(model, "config", None)
    changes = {"hidden_size": n, **{key: head_dim for key in hidden_layout(model, layout).config_changes}}
    check_config_change(config, changes, "prune_hidden")
    slicer = _Slicer(torch.tensor(positions, dtype=torch.long))
    for _, module in sites.embeddings:
        module.weight = slicer(module.weight, 1)
        module.embedding_dim = n
    for _, owner, name in sites.parameters:
        setattr(owner, name, slicer(getattr(owner, name), getattr(owner, name).dim() - 1))
    for _, owner, name, axis in sites.tensor_readers + sites.tensor_writers:
        setattr(owner, name, slicer(getattr(owner, name), axis))
    for path, module in sites.norms:
        _prune_norm(model, path, module, slicer, sites.width, exact)
    for _, module in sites.readers:
        _prune_reader(module, slicer, n)
    for _, module in sites.writers:
        _prune_writer(module, slicer, n)
    for owner, attr in sites.size_attrs:
        setattr(owner, attr, n)
    if config is not None:
        for key, value in changes.items():
            setattr(config, key, value)
    setattr(getattr(model, "base_model", model), HIDDEN_ATTR, sites.pruned | new)
    record_structure(model)
    logger.info("hf_prune: removed %d hidden channels, hidden size now %d (exact norms: %s)", len(new), n, exact)
    return model


# ----------------------------------------------------------------------------------------------------------------
# What importance scoring and masking need
# ----------------------------------------------------------------------------------------------------------------


def hidden_channel_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter, int]]:
    """(name, parameter, channel axis) of every parameter that writes the residual stream.

    Embedding columns, output rows (and biases) of the attention and FFN output projections, LayerNorm / RMSNorm
    weights and biases, each listed once (tied parameters too). Zeroing a channel's slice of all of them makes that
    channel zero everywhere in the residual stream; the first-order Taylor importance of a channel sums
    `param * grad` over the same slices (Molchanov et al. 2019, applied to Minitron's width axis).
    """
    sites = hidden_sites(model)
    found: list[tuple[str, nn.Parameter, int]] = []
    seen: set[int] = set()

    def add(name: str, param: Optional[nn.Parameter], dim: int) -> None:
        if param is not None and id(param) not in seen:
            seen.add(id(param))
            found.append((name, param, dim))

    for path, module in sites.embeddings:
        add(f"{path}.weight", module.weight, 1)
    for path, owner, name in sites.parameters:
        add(path, getattr(owner, name), getattr(owner, name).dim() - 1)
    for path, owner, name, axis in sites.tensor_writers:
        add(path, getattr(owner, name), axis)
    for path, module in sites.writers:
        if not isinstance(module, BiasOnly):
            add(f"{path}.weight", module.weight, 1 if is_conv1d(module) else 0)
        add(f"{path}.bias", module.bias, 0)
    for path, module in sites.norms:
        add(f"{path}.weight", getattr(module, "weight", None), 0)
        add(f"{path}.bias", getattr(module, "bias", None), 0)
    return found


def hidden_norms(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every LayerNorm / RMSNorm over the residual stream, in forward order."""
    return list(hidden_sites(model).norms)


def hidden_positions(model: nn.Module, channels: Iterable[int]) -> list[int]:
    """Current positions of the ORIGINAL hidden `channels` still present (removed ones are skipped)."""
    sites = hidden_sites(model)
    requested = _check_channels(channels, sites.original)
    return [pos for pos, c in enumerate(sites.kept()) if c in requested]


@torch.no_grad()
def zero_hidden_channels(model: nn.Module, channels: Iterable[int]) -> nn.Module:
    """Zero hidden `channels` (ORIGINAL numbering) in every parameter that writes them, in place; returns `model`.

    Afterwards those channels are exactly zero throughout the residual stream, and `prune_hidden(model, channels,
    exact=True)` gives the same outputs with smaller matrices. This is the masked form of width pruning (shapes
    kept), e.g. to evaluate a width before removing it.
    """
    index = hidden_positions(model, channels)
    if not index:
        return model
    for _, param, dim in hidden_channel_parameters(model):
        param.index_fill_(dim, torch.tensor(index, dtype=torch.long, device=param.device), 0.0)
    return model
