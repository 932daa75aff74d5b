"""ONNX Runtime sessions for exported models: the graph, options and threads that serve them on CPU.

    from transformers import AutoTokenizer, pipeline
    from hf_prune import create_session
    model = create_session("outputs/onnx")            # an Optimum ORTModel: INT8 if exported, else the fp32 graph
    classify = pipeline("text-classification", model=model, tokenizer=AutoTokenizer.from_pretrained("outputs/onnx"))

What sparsity buys at run time is decided at export: removed heads and neurons make every MatMul smaller (a dense
graph, nothing to configure), INT8 uses integer kernels. Scattered zeros buy nothing on CPU: ONNX Runtime expands
sparse initializers to dense tensors at load and has no sparse GEMM for them, so the session says so instead of
pretending.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Union

from transformers.utils import logging

from .export import ONNX_FILE, OPTIMIZED_FILE, QUANTIZED_FILE, ExportResult, require_onnx

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
