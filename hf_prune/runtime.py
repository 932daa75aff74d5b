"""ONNX Runtime sessions for exported models: the graph, options and threads that serve them on CPU.

    from transformers import AutoTokenizer, pipeline
    from hf_prune import create_session
    model = create_session("outputs/onnx")            # an Optimum ORTModel: INT8 if exported, else the fp32 graph
    classify = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained("outputs/onnx"))

What sparsity buys at run time is decided at export: removed heads and neurons make every MatMul smaller (a dense
graph, nothing to configure), INT8 uses integer kernels. Scattered zeros buy nothing on CPU: ONNX Runtime expands
sparse initializers to dense tensors at load and has no sparse GEMM for them, so the session says so instead of
pretending.

`onnx_decode_timings` times causal-LM decoding in ONNX Runtime with the key/value cache (prefill ms, decode tokens/s
at batch 1), the numbers `decode_timings` gives for PyTorch models.
"""

from __future__ import annotations

import importlib
import os
import statistics
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Union

import torch
from transformers.utils import logging

from .export import (
    ONNX_FILE,
    OPTIMIZED_FILE,
    QUANTIZED_FILE,
    ExportResult,
    ExportVerificationError,
    require_onnx,
)
from .files import staged_directory
from .structure import CONFIG_ATTR, STRUCTURE_NAME

logger = logging.get_logger(__name__)

VARIANTS = {"fp32": ONNX_FILE, "optimized": OPTIMIZED_FILE, "int8": QUANTIZED_FILE}
GRAPH_OPTIMIZATION_LEVELS = ("disable", "basic", "extended", "all")

# Optimum task (as exported) -> the ORTModel class that serves it; "-with-past" variants use the same class.
_ORT_MODEL_FOR_TASK = {
    "text-classification": "ORTModelForSequenceClassification",
    "token-classification": "ORTModelForTokenClassification",
    "question-answering": "ORTModelForQuestionAnswering",
    "feature-extraction": "ORTModelForFeatureExtraction",
    "fill-mask": "ORTModelForMaskedLM",
    "multiple-choice": "ORTModelForMultipleChoice",
    "text-generation": "ORTModelForCausalLM",
    # Encoder-decoder exports: an encoder graph and a decoder graph, served together (see create_session).
    "text2text-generation": "ORTModelForSeq2SeqLM",
    "automatic-speech-recognition": "ORTModelForSpeechSeq2Seq",
}


def available_cores() -> int:
    """CPU cores this process may run on (cgroup/affinity aware where the OS says so)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def session_options(threads: Optional[int] = None, graph_optimization_level: str = "all") -> Any:
    """`onnxruntime.SessionOptions` for low-latency CPU serving of one model per process.

    Args:
        threads: intra-op threads; default every core this process may use. One inter-op thread and sequential
            execution: transformer graphs are a chain of large ops, so parallelism belongs inside each op.
        graph_optimization_level: "disable", "basic", "extended" or "all" (default): ONNX Runtime's own fusions at
            load, on top of any offline ORTOptimizer pass.
    """
    require_onnx()
    import onnxruntime as ort

    if graph_optimization_level not in GRAPH_OPTIMIZATION_LEVELS:
        raise ValueError(
            f"graph_optimization_level={graph_optimization_level!r} is not allowed; choose one of "
            f"{list(GRAPH_OPTIMIZATION_LEVELS)}."
        )
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads={threads!r} must be a positive integer or None (all available cores).")
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[graph_optimization_level]
    options.intra_op_num_threads = threads or available_cores()
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    return options


def onnx_logits_runner(path: Union[str, os.PathLike], threads: Optional[int] = None) -> Callable[[dict], Any]:
    """A function from a feed of numpy arrays (extra keys ignored) to the `logits` output of the ONNX file at
    `path`, run by a CPU session with `session_options(threads)`: the plain call that latency is measured on."""
    require_onnx()
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), sess_options=session_options(threads), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    logits = [o.name for o in session.get_outputs()].index("logits")

    def run(feed: dict) -> Any:
        return session.run(None, {k: feed[k] for k in names})[logits]

    return run


def _ort_model_class(task: str) -> type:
    import optimum.onnxruntime as ort_models

    base = task[: -len("-with-past")] if task.endswith("-with-past") else task
    if base not in _ORT_MODEL_FOR_TASK:
        raise ValueError(f"task={task!r} has no ORTModel class in hf_prune; supported: {sorted(_ORT_MODEL_FOR_TASK)}.")
    return getattr(ort_models, _ORT_MODEL_FOR_TASK[base])


def create_session(
    onnx_dir: Union[str, os.PathLike],
    variant: Optional[str] = None,
    *,
    file_name: Optional[str] = None,
    threads: Optional[int] = None,
    graph_optimization_level: str = "all",
    provider: str = "CPUExecutionProvider",
) -> Any:
    """Load an `export_onnx` directory as an Optimum `ORTModelFor*` with serving options; usable in `pipeline`.

    Args:
        onnx_dir: a directory written by `export_onnx` (it reads `hf_prune_export.json` for the task and files).
        variant: "int8", "fp32" or "optimized"; default INT8 if exported, else the plain fp32 graph (see
            `ExportResult.best_file`).
        file_name: an explicit `.onnx` file in `onnx_dir` instead of `variant`.
        threads, graph_optimization_level: see `session_options`.
        provider: the ONNX Runtime execution provider.

    Returns:
        The ORTModel; `model.hf_prune_session` describes the file and options chosen.
    """
    require_onnx()
    onnx_dir = Path(onnx_dir)
    report = ExportResult.from_dir(onnx_dir)
    if variant is not None and file_name is not None:
        raise ValueError("pass variant= or file_name=, not both.")
    if len(report.graphs) > 1:
        return _create_encoder_decoder_session(onnx_dir, report, variant, file_name, threads,
                                               graph_optimization_level, provider)
    if variant is not None:
        if variant not in VARIANTS:
            raise ValueError(f"variant={variant!r} is not allowed; choose one of {list(VARIANTS)}.")
        if variant not in report.files:
            raise ValueError(
                f"variant={variant!r} was not exported to {str(onnx_dir)!r}; it has {sorted(report.files)}. Export "
                "again with optimize=/quantize= to produce it."
            )
        file_name = report.files[variant]
    file_name = file_name or report.best_file
    if not (onnx_dir / file_name).is_file():
        raise FileNotFoundError(f"file_name={file_name!r} is not in {str(onnx_dir)!r}.")
    variant = next((v for v, f in report.files.items() if f == file_name), "custom")

    options = session_options(threads, graph_optimization_level)
    model = _ort_model_class(report.task).from_pretrained(
        onnx_dir, file_name=file_name, provider=provider, session_options=options
    )
    sparse = report.sparse_initializers.get(variant, {})
    if sparse.get("converted"):
        logger.info(
            f"hf_prune.create_session: {file_name} stores {sparse['converted']} weights as sparse initializers; "
            "ONNX Runtime densifies them at load, so they save disk, not time."
        )
    model.hf_prune_session = {
        "file_name": file_name,
        "variant": variant,
        "task": report.task,
        "threads": options.intra_op_num_threads,
        "graph_optimization_level": graph_optimization_level,
        "provider": provider,
    }
    return model


def _create_encoder_decoder_session(onnx_dir: Path, report: ExportResult, variant: Optional[str],
                                    file_name: Optional[str], threads: Optional[int], graph_optimization_level: str,
                                    provider: str) -> Any:
    """`create_session` for an encoder-decoder export: its encoder and decoder graphs of one variant, no cache."""
    if file_name is not None:
        raise ValueError(
            f"file_name={file_name!r}: {str(onnx_dir)!r} holds an encoder graph and a decoder graph "
            f"({sorted(report.files.values())}); choose them together with variant= ({list(VARIANTS)})."
        )
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not allowed; choose one of {list(VARIANTS)}.")
    chosen = variant or next(v for v in ("int8", "fp32") if report.graph_files(v))
    files = report.graph_files(chosen)
    if not files:
        raise ValueError(
            f"variant={chosen!r} was not exported for every graph of {str(onnx_dir)!r}; it has "
            f"{sorted(report.files)}. Export again with optimize=/quantize= to produce it."
        )
    options = session_options(threads, graph_optimization_level)
    model = _ort_model_class(report.task).from_pretrained(
        onnx_dir, encoder_file_name=files["encoder_model"], decoder_file_name=files["decoder_model"],
        use_cache=False, provider=provider, session_options=options,
    )
    model.hf_prune_session = {
        "file_name": files,
        "variant": chosen,
        "task": report.task,
        "threads": options.intra_op_num_threads,
        "graph_optimization_level": graph_optimization_level,
        "provider": provider,
    }
    return model


# ------------------------------------------------------------------------------------------------ causal-LM decoding
@torch.inference_mode()
def decode_timings(models: Mapping[str, Any], prompt: torch.Tensor, new_tokens: int,
                   rounds: int) -> dict[str, dict[str, float]]:
    """Prefill latency (ms, one forward pass over `prompt`) and decode speed (tokens/s after the prefill, greedy,
    with the key/value cache) of each model at batch 1, interleaved round by round; medians over the rounds.

    `models` are anything with `__call__(input_ids=, attention_mask=)` and `generate`: PyTorch models or Optimum
    ORTModels, so both runtimes are timed by one definition. Interleaving spreads a machine's slow spells over every
    model instead of charging them to whichever ran then.
    """
    measured: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "generate": []} for name in models}
    mask = torch.ones_like(prompt)
    # pad_token_id only silences generate's warning: a batch of one prompt has no padding.
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=0)
    for model in models.values():  # warm-up: first calls allocate
        model.generate(input_ids=prompt, attention_mask=mask, **{**kwargs, "max_new_tokens": 2, "min_new_tokens": 2})
    for _ in range(rounds):
        for name, model in models.items():
            start = time.perf_counter()
            model(input_ids=prompt, attention_mask=mask)
            measured[name]["prefill"].append(time.perf_counter() - start)
            start = time.perf_counter()
            model.generate(input_ids=prompt, attention_mask=mask, **kwargs)
            measured[name]["generate"].append(time.perf_counter() - start)
    result = {}
    for name, times in measured.items():
        prefill, generate = statistics.median(times["prefill"]), statistics.median(times["generate"])
        result[name] = {"prefill_ms": prefill * 1000, "decode_tokens_per_s": new_tokens / max(generate - prefill, 1e-9)}
    return result


def check_cache_export(model_dir: Union[str, os.PathLike]) -> None:
    """Raise a ValueError naming `model_dir` unless Optimum can export the causal LM saved there with a key/value
    cache: a plain config that describes every layer, of a model type Optimum exports as text-generation-with-past.

    Optimum builds the cache inputs from the config (key/value heads and head size, the same in every layer) and
    loads the weights with plain `from_pretrained`. A model whose layers lost different numbers of heads carries
    hf_prune's structure record instead: its config still names the original shapes, so nothing can be exported
    with a cache that fits it. Checked before any export, which takes a while on a real model.
    """
    require_onnx()
    from optimum.exporters.tasks import TasksManager
    from transformers import AutoConfig

    folder = str(model_dir)
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise FileNotFoundError(f"{folder!r} has no config.json: give the folder of a saved causal LM.")
    config = AutoConfig.from_pretrained(folder)
    if getattr(config, CONFIG_ATTR, None) or os.path.isfile(os.path.join(folder, STRUCTURE_NAME)):
        raise ValueError(
            f"{folder!r} carries hf_prune's structure record ({CONFIG_ATTR}): its layers have shapes its config does "
            "not describe (e.g. different head counts per layer), and Optimum builds the key/value cache from the "
            "config. Prune every layer alike and save a plain config (hf-prune optimize --uniform_layers) to time "
            "it in ONNX Runtime with a cache."
        )
    if getattr(config, "pruned_heads", None):
        raise ValueError(f"{folder!r}: config.pruned_heads={config.pruned_heads!r}; Optimum's cache inputs assume "
                         "every layer keeps config.num_attention_heads heads.")
    importlib.import_module("optimum.exporters.onnx.model_configs")  # registers the ONNX configs with TasksManager
    try:
        tasks = TasksManager.get_supported_tasks_for_model_type(config.model_type, "onnx", library_name="transformers")
    except KeyError:
        tasks = {}
    if "text-generation-with-past" not in tasks:
        raise ValueError(f"{folder!r}: Optimum cannot export model_type={config.model_type!r} as a causal LM with a "
                         f"key/value cache (its ONNX tasks: {sorted(tasks)}).")


def export_causal_lm_with_cache(model_dir: Union[str, os.PathLike], output_dir: Union[str, os.PathLike],
                                threads: Optional[int] = None) -> Any:
    """Export the causal LM saved in `model_dir` with Optimum (fp32, key/value cache inputs and outputs), save the
    graph and configs to `output_dir` (staged: a failed export leaves an earlier folder as it was) and return the
    `ORTModelForCausalLM` that serves it with `session_options(threads)`. Call `check_cache_export` first."""
    require_onnx()
    from optimum.onnxruntime import ORTModelForCausalLM

    with warnings.catch_warnings():
        # The tracer warns that Python values in Transformers' masking code become constants of the graph; the
        # greedy-token check in onnx_decode_timings runs the graph on other lengths than the trace did.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        model = ORTModelForCausalLM.from_pretrained(str(model_dir), export=True, use_cache=True,
                                                    session_options=session_options(threads))
    with staged_directory(str(output_dir)) as staging:
        model.save_pretrained(staging)
    match_cache_head_size(model)
    return model


def match_cache_head_size(model: Any) -> None:
    """Give an ORTModelForCausalLM the head size its graph's cache inputs have.

    Optimum-ONNX 0.1.0 sizes the empty cache of the first step as hidden_size // num_attention_heads for most model
    types, ignoring config.head_dim. Once heads are pruned (SmolLM2: 9 heads of 64 on a 576-wide stream; 6 left
    gives 96) that guess is wrong and ONNX Runtime refuses the inputs, although the graph itself was traced right
    (the exporter reads head_dim). The graph's own input shape is the authority.
    """
    names = getattr(model, "key_value_input_names", None)
    if not names or not hasattr(model, "embed_size_per_head"):
        return
    shape = next(i.shape for i in model.session.get_inputs() if i.name == names[0])
    if isinstance(shape[-1], int) and shape[-1] != model.embed_size_per_head:
        model.embed_size_per_head = shape[-1]


@torch.inference_mode()
def check_greedy_tokens(onnx_model: Any, model_dir: Union[str, os.PathLike], prompt: torch.Tensor,
                        new_tokens: int) -> None:
    """Raise ExportVerificationError unless ONNX Runtime's greedy continuation of `prompt` (with the cache) is
    PyTorch's, token for token, for the model saved in `model_dir`: a timing of a graph that decodes something
    else would compare nothing."""
    from transformers import AutoModelForCausalLM

    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                  pad_token_id=0)
    mask = torch.ones_like(prompt)
    reference = AutoModelForCausalLM.from_pretrained(str(model_dir)).float().eval()  # Optimum exports fp32
    expected = reference.generate(input_ids=prompt, attention_mask=mask, **kwargs)[0, prompt.shape[1]:].tolist()
    del reference  # a real model's weights need not stay in memory while the graphs are timed
    got = onnx_model.generate(input_ids=prompt, attention_mask=mask, **kwargs)[0, prompt.shape[1]:].tolist()
    if got != expected:
        raise ExportVerificationError(f"{str(model_dir)!r}: ONNX Runtime's greedy tokens {got} differ from PyTorch's "
                                      f"{expected} for the same prompt.")


def onnx_decode_timings(model_dirs: Mapping[str, str], prompt: torch.Tensor, new_tokens: int, rounds: int,
                        export_dir: str) -> dict[str, dict]:
    """Prefill latency and decode speed of causal LMs in ONNX Runtime with the key/value cache, at batch 1.

    Each saved model (`name -> folder` of a plain `save_pretrained` checkpoint) is exported by Optimum to
    `export_dir/<name>` (kept, so the graphs can be inspected), checked to decode the same greedy tokens as PyTorch,
    then all are timed by `decode_timings` (one warm-up, interleaved rounds, medians).

    Args:
        model_dirs: model name -> folder; names become folder names under `export_dir`.
        prompt: token ids of shape (1, length).
        new_tokens: tokens generated per timed `generate` (exactly this many: min_new_tokens too).
        rounds: timed rounds; medians are reported.
        export_dir: where the ONNX exports go.

    Returns:
        {name: {"prefill_ms": ..., "decode_tokens_per_s": ...}}.

    Raises:
        ValueError: before any export, for a model that cannot be exported with a cache (`check_cache_export`).
        ExportVerificationError: when ONNX Runtime's greedy tokens differ from PyTorch's.
    """
    require_onnx()
    check_decode_arguments(model_dirs, prompt, new_tokens, rounds)
    for folder in model_dirs.values():
        check_cache_export(folder)
    # The ORT session gets as many intra-op threads as PyTorch has, and neither setting is changed: the ONNX Runtime
    # default (one per core) would compare ORT on more threads than PyTorch is timed on, and would oversubscribe
    # cores the caller chose to leave to others.
    threads = torch.get_num_threads()
    models = {}
    for name, folder in model_dirs.items():
        models[name] = export_causal_lm_with_cache(folder, os.path.join(export_dir, name), threads)
        check_greedy_tokens(models[name], folder, prompt, new_tokens)
    return decode_timings(models, prompt, new_tokens, rounds)


def check_decode_arguments(model_dirs: Mapping[str, str], prompt: torch.Tensor, new_tokens: int, rounds: int) -> None:
    if not model_dirs:
        raise ValueError("model_dirs is empty: give {name: folder of a saved causal LM}.")
    for name in model_dirs:
        if not isinstance(name, str) or name in ("", ".", "..") or os.path.basename(name) != name:
            raise ValueError(f"model_dirs name {name!r} must be a plain folder name (it names the export folder).")
    if not isinstance(prompt, torch.Tensor) or prompt.dim() != 2 or prompt.shape[0] != 1 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be token ids of shape (1, length), got "
                         f"{tuple(prompt.shape) if isinstance(prompt, torch.Tensor) else type(prompt).__name__}.")
    for option, value in (("new_tokens", new_tokens), ("rounds", rounds)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{option}={value!r} must be a positive integer.")
