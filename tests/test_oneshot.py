"""One-shot pruning (hf_prune.oneshot): Wanda, SparseGPT and magnitude on the decoder families, block by block."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import CAUSAL_ARCHS, tiny_causal_lm
from hf_prune import PruningConfig, Pruner, is_two_four, oneshot
from hf_prune.linear import matrix_view
from hf_prune.masks import find_target_modules
from hf_prune.methods.sparsegpt import sparsegpt_prune
from hf_prune.oneshot.blocks import decoder_blocks


def calibration(n: int = 3, batch: int = 4, length: int = 16, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(0, 128, (batch, length), generator=generator),
             "attention_mask": torch.ones(batch, length, dtype=torch.long)} for _ in range(n)]


def targeted(model):
    return find_target_modules(model, PruningConfig().targets, PruningConfig().exclude)


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_every_family_is_pruned_to_the_target_in_each_pattern(arch, method):
    for kwargs in ({"sparsity": 0.5}, {"pattern": "2:4"}):
        model = tiny_causal_lm(arch)
        lm_head = model.get_output_embeddings().weight.detach().clone()
        result = oneshot(model, calibration(), method=method, show_progress=False, **kwargs)
        modules = targeted(model)
        assert result.modules == len(modules) and result.blocks == 2
        for name, module in modules.items():
            matrix = matrix_view(module).detach()
            zeros = (matrix == 0).float().mean().item()
            assert zeros == pytest.approx(0.5, abs=1e-9 if method != "magnitude" else 0.01), name
            if "pattern" in kwargs:
                assert is_two_four(matrix), name
        assert result.sparsity == pytest.approx(0.5, abs=0.005)
        assert torch.equal(model.get_output_embeddings().weight, lm_head)  # outside the blocks: untouched
        logits = model(input_ids=torch.randint(0, 128, (1, 8))).logits
        assert torch.isfinite(logits).all()


def test_wanda_prunes_half_of_every_row_by_weight_times_input_norm():
    model = tiny_causal_lm("llama")
    reference = copy.deepcopy(model)
    data = calibration()
    oneshot(model, data, method="wanda", sparsity=0.5, show_progress=False)
    # By hand, for block 0 (its inputs come from the dense embeddings): the squared inputs of every layer.
    squares, counts = {}, {}
    modules = {n: m for n, m in targeted(reference).items() if ".layers.0." in n}

    def hook(name):
        def record(module, args):
            x = args[0].reshape(-1, args[0].shape[-1]).float()
            squares[name] = squares.get(name, 0) + x.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + x.shape[0]
        return record

    run_hooked(reference, data, {n: (m, hook(n)) for n, m in modules.items()})
    pruned = dict(model.named_modules())
    for name, module in modules.items():
        metric = module.weight.abs() * (squares[name] / counts[name]).sqrt()
        k = module.weight.shape[1] // 2
        assert torch.equal(pruned[name].weight == 0, _lowest_per_row(metric, None)), name
        assert ((pruned[name].weight == 0).sum(1) == k).all()  # per output row, exactly half


def test_later_blocks_are_calibrated_on_the_pruned_blocks_outputs():
    model = tiny_causal_lm("llama")
    data = calibration()
    dense = copy.deepcopy(model)
    oneshot(model, data, method="wanda", sparsity=0.5, show_progress=False)
    # Block 1's masks must come from the activations of the model whose block 0 is already pruned.
    partly = copy.deepcopy(dense)
    partly.model.layers[0].load_state_dict(model.model.layers[0].state_dict())
    block1 = {n: m for n, m in targeted(partly).items() if ".layers.1." in n}
    from hf_prune.methods.wanda import WandaMethod

    method = WandaMethod(PruningConfig(method="wanda", target_sparsity=0.5))
    method.attach(block1)
    run_hooked(partly, data, {n: (m, lambda mod, args, n=n: method.observe(n, args[0])) for n, m in block1.items()})
    pruned = dict(model.named_modules())
    for name, module in block1.items():
        assert torch.equal(pruned[name].weight == 0, _lowest_per_row(method.scores(name, module), None)), name


def run_hooked(model, data, hooks):
    """Run `data` through `model` with forward pre-hooks {name: (module, hook)} in place, then remove them."""
    handles = [module.register_forward_pre_hook(hook) for module, hook in hooks.values()]
    with torch.no_grad():
        for batch in data:
            model(**batch)
    for handle in handles:
        handle.remove()


def correlated_inputs(samples: int = 512, width: int = 64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(width, width, generator=generator) / width ** 0.5
    # A few large input features, as LLM activations have, spread over the inputs (and so over N:M groups).
    scales = torch.logspace(0, 1.5, width)[torch.randperm(width, generator=generator)]
    return (torch.randn(samples, width, generator=generator) @ mixing) * scales


@pytest.mark.parametrize("n_m", [None, (2, 4)])
def test_sparsegpt_reconstructs_the_layer_output_better_than_selection_alone(n_m):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 64, generator=generator)
    x = correlated_inputs()
    hessian = 2 * x.t() @ x / x.shape[0]
    pruned, mask = sparsegpt_prune(weight, hessian, 0.5, n_m)
    assert torch.equal(pruned == 0, mask) and mask.float().mean().item() == 0.5
    if n_m:
        assert is_two_four(pruned)

    def error(w):
        return ((weight - w) @ x.t()).pow(2).sum().item()

    norms = x.pow(2).mean(0).sqrt()
    wanda = weight * ~_lowest_per_row(weight.abs() * norms, n_m)
    magnitude = weight * ~_lowest_per_row(weight.abs(), n_m)
    assert error(pruned) < error(wanda) < error(magnitude)


def _lowest_per_row(metric, n_m):
    if n_m is None:
        k = metric.shape[1] // 2
        return torch.zeros_like(metric, dtype=torch.bool).scatter_(1, metric.topk(k, 1, largest=False).indices, True)
    groups = metric.reshape(metric.shape[0], -1, 4)
    lowest = groups.topk(2, -1, largest=False).indices
    return torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, lowest, True).reshape(metric.shape)


def test_sparsegpt_with_uncorrelated_inputs_is_magnitude_pruning_per_column_block():
    weight = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    pruned, mask = sparsegpt_prune(weight, torch.eye(32), 0.25, block_size=8)
    # H = I: no weight informs another, so nothing is updated and each block of 8 columns loses its smallest quarter.
    for start in range(0, 32, 8):
        block = weight[:, start:start + 8].abs().reshape(-1)
        expected = torch.zeros_like(block, dtype=torch.bool)
        expected[block.topk(32, largest=False).indices] = True
        assert torch.equal(mask[:, start:start + 8].reshape(-1), expected)
    assert torch.equal(pruned[~mask], weight[~mask])


def test_sparsegpt_beats_magnitude_on_a_model_output():
    data = calibration(n=4)
    probe = {"input_ids": torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(5))}
    dense = tiny_causal_lm("llama")
    with torch.no_grad():
        reference = dense(**probe).logits
    errors = {}
    for method in ("magnitude", "sparsegpt"):
        model = copy.deepcopy(dense)
        oneshot(model, data, method=method, sparsity=0.5, show_progress=False)
        with torch.no_grad():
            errors[method] = (model(**probe).logits - reference).pow(2).mean().item()
    assert errors["sparsegpt"] < errors["magnitude"]


def test_a_pruning_config_drives_oneshot_with_overrides_and_its_pattern():
    model = tiny_causal_lm("llama")
    config = PruningConfig(method="wanda", target_sparsity=0.5, exclude=[r"self_attn\.o_proj"],
                           sparsity_overrides={r"mlp": 0.25})
    result = oneshot(model, calibration(), config=config, show_progress=False)
    for name, module in targeted(model).items():
        zeros = (module.weight == 0).float().mean().item()
        expected = 0.0 if "o_proj" in name else 0.25 if "mlp" in name else 0.5
        assert zeros == pytest.approx(expected, abs=1e-9), name
    assert result.method == "wanda" and result.pattern == "unstructured"
    two_four = oneshot(tiny_causal_lm("qwen2"), calibration(),
                       config=PruningConfig(method="sparsegpt", granularity="n:m", n_m="2:4", target_sparsity=0.5),
                       show_progress=False)
    assert two_four.pattern == "2:4" and two_four.sparsity == 0.5


def test_blocks_return_to_where_they_were_and_tensor_batches_work():
    model = tiny_causal_lm("gpt2")
    _, blocks = decoder_blocks(model)
    assert len(blocks) == 2
    tensors = [torch.randint(0, 128, (2, 12)) for _ in range(2)]
    result = oneshot(model, tensors, method="sparsegpt", sparsity=0.5, device="cpu", max_batches=1,
                     show_progress=False)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert result.peak_device_memory_bytes is None and result.seconds > 0
    assert not model.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_cpu_model_is_pruned_on_the_gpu_one_block_at_a_time():
    model = tiny_causal_lm("llama", layers=4)
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    block = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    result = oneshot(model, calibration(), method="sparsegpt", sparsity=0.5, device="cuda", show_progress=False)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert result.sparsity == pytest.approx(0.5, abs=0.005)
    # Embeddings, the LM head and one block, with activations: well under the whole model's four blocks.
    assert result.peak_device_memory_bytes < size - 2 * block


# ------------------------------------------------------------------------------------------------ bad input
@pytest.mark.parametrize("kwargs, message", [
    ({"sparsity": 0.5, "pattern": "2:4"}, r"sparsity=0.5 or pattern='2:4', not both"),
    ({"pattern": "4:2"}, r"n_m"),
    ({"sparsity": 1.5}, r"target_sparsity"),
    ({"method": "movement"}, r"method='movement' scores weights from training"),
    ({"method": "constant"}, r"method='constant' keeps existing zeros"),
    ({"method": "nope"}, r"method='nope' is invalid"),
    ({"targets": ["lm_head"]}, r"outside the transformer blocks"),
    ({"targets": ["nothing_matches"]}, r"match no Linear"),
    ({"config": PruningConfig(method="wanda"), "sparsity": 0.5}, r"either config= or \['sparsity'\]"),
])
def test_bad_oneshot_arguments_fail_before_anything_is_pruned(kwargs, message):
    model = tiny_causal_lm("llama")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        oneshot(model, calibration(), show_progress=False, **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_empty_calibration_data_and_wrong_batches_are_refused():
    with pytest.raises(ValueError, match="yielded no batch"):
        oneshot(tiny_causal_lm("llama"), [], show_progress=False)
    with pytest.raises(TypeError, match="dicts of tensors .* got str"):
        oneshot(tiny_causal_lm("llama"), ["some text"], show_progress=False)


def test_sparsegpt_is_one_shot_only_and_the_pruner_says_where_to_go():
    with pytest.raises(ValueError, match=r"method='sparsegpt' prunes once .*hf_prune.oneshot"):
        Pruner(tiny_causal_lm("llama"), PruningConfig(method="sparsegpt", target_sparsity=0.5))


# ------------------------------------------------------------------------------------------------ hf-prune oneshot
def saved_causal_lm(root):
    from conftest import WORDS, tiny_tokenizer

    tokenizer = tiny_tokenizer(root / "lm")
    tiny_causal_lm("llama").save_pretrained(root / "lm")
    tokenizer.save_pretrained(root / "lm")  # its class in tokenizer_config.json, not the Llama one from config.json
    words = list(WORDS)
    text = lambda seed: " ".join(words[(i * 7 + seed) % len(words)] for i in range(400))  # noqa: E731
    (root / "calibration.txt").write_text(text(1))
    (root / "evaluation.txt").write_text(text(3))
    return tokenizer


def test_the_oneshot_command_prunes_measures_and_saves_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM

    from hf_prune.cli import main

    saved_causal_lm(tmp_path)
    out = tmp_path / "out"
    args = ["oneshot", "--model_name_or_path", str(tmp_path / "lm"), "--calibration_file",
            str(tmp_path / "calibration.txt"), "--evaluation_file", str(tmp_path / "evaluation.txt"), "--method",
            "sparsegpt", "--pattern", "2:4", "--calibration_samples", "4", "--calibration_length", "16",
            "--window", "32", "--eval_tokens", "200", "--output_dir", str(out), "--device", "cpu"]
    assert main(args) == 0
    report = __import__("json").loads((out / "report.json").read_text())
    assert report["sparsity"] == 0.5 and report["pattern"] == "2:4" and report["dense"]["tokens"] > 100
    assert report["pruned"]["perplexity"] != report["dense"]["perplexity"]
    model = AutoModelForCausalLM.from_pretrained(str(out / "model"))
    assert all(is_two_four(m.weight) for m in targeted(model).values())
    assert (out / "model" / "pruning_config.json").is_file() and (out / "model" / "tokenizer_config.json").is_file()
    assert "| pruned |" in (out / "report.md").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--sparsity", "0.5", "--pattern", "2:4"], r"--sparsity 0.5 and --pattern 2:4: give one"),
    (["--calibration_samples", "0"], r"--calibration_samples 0 is invalid"),
    (["--method", "movement"], r"--method 'movement' is invalid: .*without training.*'wanda'"),
])
def test_bad_oneshot_command_options_are_refused_with_the_option_named(tmp_path, extra, message):
    from hf_prune.cli import main

    saved_causal_lm(tmp_path)
    with pytest.raises(SystemExit, match=message):
        main(["oneshot", "--model_name_or_path", str(tmp_path / "lm"), "--calibration_file",
              str(tmp_path / "calibration.txt"), "--evaluation_file", str(tmp_path / "evaluation.txt"), *extra])
    with pytest.raises(SystemExit, match=r"--calibration_file and --evaluation_file go together"):
        main(["oneshot", "--model_name_or_path", str(tmp_path / "lm"), "--calibration_file",
              str(tmp_path / "calibration.txt")])
    assert not (tmp_path / "outputs").exists()


def test_the_oneshot_command_runs_a_method_the_user_registered(tmp_path):
    """--method takes any registered method that prunes without training, not a fixed list."""
    from hf_prune.cli import main
    from hf_prune.methods import get_method, register_method, unregister_method

    @register_method("oneshot-test-magnitude")
    class Mine(get_method("magnitude")):
        pass

    saved_causal_lm(tmp_path)
    try:
        assert main(["oneshot", "--model_name_or_path", str(tmp_path / "lm"), "--calibration_file",
                     str(tmp_path / "calibration.txt"), "--evaluation_file", str(tmp_path / "evaluation.txt"),
                     "--method", "oneshot-test-magnitude", "--sparsity", "0.5", "--calibration_samples", "4",
                     "--calibration_length", "16", "--window", "32", "--eval_tokens", "200", "--output_dir",
                     str(tmp_path / "out"), "--device", "cpu"]) == 0
    finally:
        unregister_method("oneshot-test-magnitude")
    report = __import__("json").loads((tmp_path / "out" / "report.json").read_text())
    assert report["sparsity"] == 0.5 and report["method"] == "oneshot-test-magnitude"


def test_owl_layer_sparsities_feed_oneshot_and_keep_the_global_target():
    from hf_prune import owl_sparsity

    model = tiny_causal_lm("llama", layers=4)
    data = calibration()
    overrides = owl_sparsity(model, data, 0.7, progress=False)
    result = oneshot(model, data, config=PruningConfig(method="wanda", target_sparsity=0.7,
                                                       sparsity_overrides=overrides), show_progress=False)
    assert result.sparsity == pytest.approx(0.7, abs=0.01)  # the mean is OWL's target (per-row rounding aside)
    per_module = {n: r["sparsity"] for n, r in result.report["modules"].items()}
    assert max(per_module.values()) - min(per_module.values()) > 0.05  # layers pruned unequally, by outlier ratio
    for pattern, sparsity in overrides.items():
        name = pattern.strip("^$").replace("\\", "")
        assert per_module[name] == pytest.approx(sparsity, abs=1 / 64)  # each layer at its own level (rows of 64)
