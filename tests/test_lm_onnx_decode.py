"""onnx_decode_timings: causal LMs exported by Optimum with the key/value cache, checked against PyTorch's greedy
tokens and timed in ONNX Runtime; a model whose layers differ in shape is refused before anything is exported."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("optimum.onnxruntime")
pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

from hf_prune.commands.optimize_lm import prune_uniformly, write_uniform_config  # noqa: E402
from hf_prune.export import ExportVerificationError  # noqa: E402
from hf_prune.runtime import check_greedy_tokens, onnx_decode_timings  # noqa: E402
from hf_prune.structure import prune_ffn_neurons, prune_heads, save_pruned, structure_summary  # noqa: E402

from conftest import tiny_causal_lm, tiny_tokenizer  # noqa: E402

pytestmark = pytest.mark.onnx

PROMPT = torch.arange(3, 11).unsqueeze(0)  # 8 token ids of the tiny vocabulary (128)


def save(model, tokenizer, folder, pruned: bool = False) -> str:
    (save_pruned(model, str(folder)) if pruned else model.save_pretrained(folder))
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A tiny grouped-query Llama (4 heads, 2 key/value heads, FFN 128, 2 layers), a copy with half of every layer's
    key/value groups and FFN neurons removed and a plain config, and one with only layer 0 pruned (structure record)."""
    root = tmp_path_factory.mktemp("lm_onnx")
    tokenizer = tiny_tokenizer(root / "vocab")
    dirs = {"dense": save(tiny_causal_lm("llama", layers=2), tokenizer, root / "dense")}

    uniform = tiny_causal_lm("llama", layers=2)
    generator = torch.Generator().manual_seed(0)
    heads = torch.rand(2, 4, generator=generator)
    neurons = {layer: torch.rand(128, generator=generator) for layer in range(2)}
    prune_uniformly(uniform, heads, neurons, 0.5)
    dirs["uniform"] = save(uniform, tokenizer, root / "uniform", pruned=True)
    write_uniform_config(dirs["uniform"], uniform)

    uneven = tiny_causal_lm("llama", layers=2)
    prune_heads(uneven, {0: [0, 1]})  # one key/value group (2 query heads) of layer 0 only
    prune_ffn_neurons(uneven, {0: list(range(32))})
    assert structure_summary(uneven)["heads_per_layer"] == [2, 4]
    dirs["uneven"] = save(uneven, tokenizer, root / "uneven", pruned=True)
    return dirs


def cache_inputs(path) -> dict[str, list]:
    """The graph's past key/value inputs and their shapes (dimension names or sizes)."""
    graph = onnx.load(str(path), load_external_data=False).graph
    return {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in graph.input if "past_key_values" in i.name}


def test_dense_and_uniformly_pruned_models_decode_with_the_cache_and_time(model_dirs, tmp_path):
    # The uniform copy has 2 heads of 16 on a 64-wide stream: Optimum's own guess of the cache's head size
    # (hidden_size // heads = 32) would make ONNX Runtime refuse its first step.
    dirs = {name: model_dirs[name] for name in ("dense", "uniform")}
    timings = onnx_decode_timings(dirs, PROMPT, new_tokens=4, rounds=1, export_dir=str(tmp_path / "onnx"))

    assert set(timings) == {"dense", "uniform"}
    for row in timings.values():
        assert set(row) == {"prefill_ms", "decode_tokens_per_s"}
        assert row["prefill_ms"] > 0 and row["decode_tokens_per_s"] > 0
    for name, kv_heads in (("dense", 2), ("uniform", 1)):
        inputs = cache_inputs(tmp_path / "onnx" / name / "model.onnx")
        assert len(inputs) == 4  # a key and a value per layer
        assert inputs["past_key_values.0.key"][1:] == [kv_heads, "past_sequence_length", 16]


def test_a_model_with_uneven_layers_is_refused_before_any_export(model_dirs, tmp_path):
    dirs = {"dense": model_dirs["dense"], "uneven": model_dirs["uneven"]}
    with pytest.raises(ValueError, match="uneven.*structure record"):
        onnx_decode_timings(dirs, PROMPT, new_tokens=4, rounds=1, export_dir=str(tmp_path / "onnx"))
    assert not (tmp_path / "onnx").exists()


class WrongTokens:
    """Stands in for an ORTModel whose graph decodes something else than the checkpoint."""

    def generate(self, input_ids, max_new_tokens, **kwargs):
        return torch.cat([input_ids, torch.full((1, max_new_tokens), -1)], dim=1)


def test_greedy_tokens_that_differ_from_pytorch_raise(model_dirs):
    with pytest.raises(ExportVerificationError, match="dense.*greedy tokens"):
        check_greedy_tokens(WrongTokens(), model_dirs["dense"], PROMPT, new_tokens=2)


@pytest.mark.parametrize("kwargs, match", [
    (dict(new_tokens=0), "new_tokens"),
    (dict(rounds=0), "rounds"),
    (dict(prompt=torch.ones(2, 4, dtype=torch.long)), "prompt"),
    (dict(model_dirs={"../x": "folder"}), "name"),
])
def test_bad_arguments_are_refused(kwargs, match, model_dirs, tmp_path):
    arguments = dict(model_dirs={"dense": model_dirs["dense"]}, prompt=PROMPT, new_tokens=4, rounds=1,
                     export_dir=str(tmp_path / "onnx"))
    with pytest.raises(ValueError, match=match):
        onnx_decode_timings(**{**arguments, **kwargs})
