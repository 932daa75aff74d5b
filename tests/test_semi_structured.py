"""2:4 semi-structured sparse weights: the pattern check everywhere, the clear error on CPU, the kernels on GPU."""

from __future__ import annotations

import pytest
import torch

from conftest import tiny_causal_lm
from hf_prune import is_two_four, oneshot, to_semi_structured
from hf_prune.semi_structured import semi_structured_unavailable

GPU_REASON = semi_structured_unavailable()


def test_is_two_four_checks_every_group_of_four_inputs():
    weight = torch.tensor([[1.0, 0.0, 2.0, 0.0, 0.0, 0.0, 3.0, 4.0]])
    assert is_two_four(weight)
    weight[0, 1] = 5.0  # three non-zeros in the first group
    assert not is_two_four(weight)
    assert not is_two_four(torch.zeros(2, 6))  # 6 inputs: no whole groups of 4


def test_oneshot_2_4_output_passes_the_check_and_unstructured_does_not():
    model = tiny_causal_lm("llama")
    batches = [torch.randint(0, 128, (2, 16))]
    oneshot(model, batches, method="wanda", pattern="2:4", show_progress=False)
    assert all(is_two_four(m.weight) for n, m in model.named_modules() if n.endswith("proj"))
    other = tiny_causal_lm("llama")
    oneshot(other, batches, method="wanda", sparsity=0.5, show_progress=False)
    assert not all(is_two_four(m.weight) for n, m in other.named_modules() if n.endswith("proj"))


@pytest.mark.skipif(GPU_REASON is None, reason="a CUDA GPU of capability 8.0+ is present")
def test_without_a_capable_gpu_the_error_names_the_requirement():
    model = tiny_causal_lm("llama")
    with pytest.raises(RuntimeError, match=r"needs a CUDA GPU of compute capability 8.0 or newer .*: "):
        to_semi_structured(model)


def test_bad_backend_is_refused_before_anything_else():
    with pytest.raises(ValueError, match=r"backend='fast' is invalid: choose 'auto', 'cusparselt' or 'cutlass'"):
        to_semi_structured(tiny_causal_lm("llama"), backend="fast")


@pytest.mark.skipif(GPU_REASON is not None, reason=f"needs a CUDA GPU of capability 8.0+ ({GPU_REASON})")
def test_on_a_capable_gpu_2_4_layers_become_sparse_tensors_with_the_same_outputs():
    from torch.sparse import SparseSemiStructuredTensor

    torch.manual_seed(0)
    model = stack(2)
    weight = torch.randn(128, 256)
    groups = weight.reshape(128, -1, 4)
    keep = groups.abs().topk(2, -1).indices
    two_four = torch.zeros_like(groups).scatter_(-1, keep, groups.gather(-1, keep)).reshape(128, 256)
    for block in model.layers:
        block.proj.weight.data.copy_(two_four)
    model = model.half().cuda()
    x = torch.randn(64, 256, dtype=torch.half, device="cuda")
    dense = model.layers[0].proj(x)
    with pytest.raises(ValueError, match="not 2:4 sparse"):
        to_semi_structured(stack(1).half().cuda())
    report = to_semi_structured(model)
    assert report["converted"] == ["layers.0.proj", "layers.1.proj"] and not report["skipped"]
    assert isinstance(model.layers[0].proj.weight, SparseSemiStructuredTensor)
    torch.testing.assert_close(model.layers[0].proj(x), dense, rtol=1e-2, atol=1e-2)


def stack(depth: int) -> torch.nn.Module:
    """Blocks named like a transformer's (layers.N.proj), which the default targets match."""
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList()
    for _ in range(depth):
        block = torch.nn.Module()
        block.proj = torch.nn.Linear(256, 128)
        model.layers.append(block)
    return model
