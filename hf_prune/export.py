"""ONNX export of pruned models through Optimum: verified, optimised, quantized, written atomically.

    from hf_prune import export_onnx
    result = export_onnx("outputs/default/pruned", "outputs/onnx", optimize="O2", quantize="dynamic")
    print(result.max_abs_diff, result.sizes_bytes, result.notes)

One call does, in order:
1. load the checkpoint with `load_pruned` (per-layer head counts and FFN sizes rebuilt) or copy the given model, fold
   any mask into its weights (`make_permanent`) and, when asked, physically remove heads/neurons left all-zero;
2. export with Optimum's exporter (`onnx_export_from_model`) to `model.onnx`;
3. graph optimisation with `ORTOptimizer` to `model_optimized.onnx`, checked against PyTorch; a level whose graph
   is wrong or fails falls back to the next lower one (O3 -> O2 -> O1 -> none) and the report says so;
4. INT8 dynamic quantization (per-channel weights) with `ORTQuantizer` to `model_quantized.onnx`, from the plain
   graph (ONNX Runtime fuses the quantized graph at load);
5. every weight that is mostly zeros is stored as an ONNX sparse initializer when that makes the file smaller.
   ONNX Runtime expands sparse initializers to dense tensors when it loads them: this shrinks the file, never the
   latency; only structural removal and INT8 make inference faster on CPU.

Encoder-decoder generation models (BART, T5, Whisper, ...) are written as Optimum writes them, an
`encoder_model.onnx` and a `decoder_model.onnx` (without the key/value cache), and every step above runs on each
graph: the decoder is checked on what the PyTorch encoder gives. `create_session` serves the two together as an
`ORTModelForSeq2SeqLM` / `ORTModelForSpeechSeq2Seq`; the report's per-graph entries are keyed "<graph>/<variant>".

Everything is written to a staging directory next to `output_dir` and moved into place only when every step and
check passed, so a failed export never leaves a directory that looks valid, and never replaces a good one.
`hf_prune_export.json` records what was done and measured.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import platform
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
import torch
from torch import nn
from transformers.utils import logging

from .files import staged_directory
from .finalize import make_permanent
from .structure import load_pruned, remove_empty_structures, structure_summary

logger = logging.get_logger(__name__)

EXPORT_REPORT_NAME = "hf_prune_export.json"
ONNX_FILE = "model.onnx"
OPTIMIZED_FILE = "model_optimized.onnx"
QUANTIZED_FILE = "model_quantized.onnx"
OPTIMIZATION_LEVELS = ("O1", "O2", "O3")
QUANTIZATION_MODES = ("dynamic",)
SPARSE_INITIALIZER_MODES = ("auto", "never")
# Checkpoint files worth carrying next to the ONNX graphs: they say what was pruned and how.
_PROVENANCE_FILES = ("pruning_config.json", "sparsity_report.json", "hf_prune_structure.json")
# Files one of which a folder with a saved tokenizer holds; without them no tokenizer load is attempted.
_TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "vocab.txt", "vocab.json", "tokenizer.model")
_FUSED_ATTENTION_OPS = ("Attention", "MultiHeadAttention", "QAttention")
_SAMPLE_TEXTS = (
    "The service was quick and the staff were friendly.",
    "I waited two hours and nobody answered my calls, never again!",
    "ok",
    "Prices went up again this month; not sure how I feel about the new plan yet.",
)


class ExportError(RuntimeError):
    """An export step failed; nothing was written to the output directory."""


class ExportVerificationError(ExportError):
    """ONNX Runtime outputs differ from PyTorch by more than the allowed tolerance."""


def is_onnx_available() -> bool:
    try:
        return all(importlib.util.find_spec(name) is not None
                   for name in ("onnx", "onnxruntime", "optimum.exporters.onnx", "optimum.onnxruntime"))
    except ModuleNotFoundError:  # `optimum` itself missing
        return False


def require_onnx() -> None:
    if not is_onnx_available():
        raise ImportError(
            "hf_prune's ONNX export and runtime need the `onnx` extra: pip install 'hf_prune[onnx]' "
            "(optimum-onnx with onnxruntime; it requires transformers<4.58)."
        )


@dataclass
class ExportResult:
    """What `export_onnx` wrote and measured; also saved as `hf_prune_export.json` in the output directory."""

    output_dir: str
    task: str
    files: dict = field(default_factory=dict)  # variant ("fp32", "optimized", "int8") -> file name
    max_abs_diff: dict = field(default_factory=dict)  # variant -> max |ORT - PyTorch| on the sample inputs
    tolerance: dict = field(default_factory=dict)  # variant -> the tolerance it was checked against
    argmax_agreement: dict = field(default_factory=dict)  # variant -> share of equal argmax (logits outputs)
    sizes_bytes: dict = field(default_factory=dict)  # variant -> file size on disk
    optimization: dict = field(default_factory=dict)
    quantization: dict = field(default_factory=dict)
    sparse_initializers: dict = field(default_factory=dict)  # variant -> conversion summary
    structure: dict = field(default_factory=dict)
    removed_structures: dict = field(default_factory=dict)
    notes: list = field(default_factory=list)
    # The graphs written: ["model"], or ["encoder_model", "decoder_model"] for an encoder-decoder generation model,
    # whose per-graph entries above are keyed "<graph>/<variant>" (e.g. "decoder_model/int8").
    graphs: list = field(default_factory=lambda: ["model"])

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def best_file(self) -> str:
        """The file `create_session` serves by default: INT8 if made, else the plain fp32 graph.

        ONNX Runtime applies its own CPU fusions to the plain graph at load. On the pruned MiniLM that ran faster
        than ORTOptimizer's O2 graph (80 against 98 ms at batch 32 with 70% of heads and neurons removed; equal on
        the dense model), whose contrib kernels suit uniform shapes. The O2 graph stays one `variant=` away.
        """
        if len(self.graphs) > 1:
            raise ExportError(
                f"this export holds {len(self.graphs)} graphs ({', '.join(self.graphs)}), not one file; load it with "
                "hf_prune.create_session, which serves them together"
            )
        for variant in ("int8", "fp32", "optimized"):
            if variant in self.files:
                return self.files[variant]
        raise ExportError("the export produced no ONNX file")

    def graph_files(self, variant: str) -> dict[str, str]:
        """Graph name -> file name of `variant` ("fp32", "optimized", "int8"); empty if a graph lacks it."""
        if self.graphs == ["model"]:
            return {"model": self.files[variant]} if variant in self.files else {}
        found = {graph: self.files.get(f"{graph}/{variant}") for graph in self.graphs}
        return found if all(found.values()) else {}

    @classmethod
    def from_dir(cls, directory: Union[str, os.PathLike]) -> "ExportResult":
        path = Path(directory) / EXPORT_REPORT_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{str(directory)!r} has no {EXPORT_REPORT_NAME}: it was not written by hf_prune.export_onnx."
            )
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(**{k: v for k, v in data.items() if k in cls.__dataclass_fields__})


# ----------------------------------------------------------------------------------------------------------------
# Atomic output
# ----------------------------------------------------------------------------------------------------------------


@contextmanager
def _staged_output(output_dir: Path, overwrite: bool) -> Iterator[Path]:
    """Yield an empty staging directory beside `output_dir`; move it into place only if the block succeeds.

    The previous `output_dir` is moved aside, not deleted, until the new one is in place, so a crash at any point
    leaves either the old export or the new one, never a mixture; leftovers of killed exports are cleaned first
    (`hf_prune.files.staged_directory`).
    """
    if output_dir.exists():
        if not output_dir.is_dir():
            raise FileExistsError(f"output_dir={str(output_dir)!r} exists and is not a directory.")
        looks_ours = (output_dir / EXPORT_REPORT_NAME).is_file()
        if any(output_dir.iterdir()) and not (looks_ours or overwrite):
            raise FileExistsError(
                f"output_dir={str(output_dir)!r} exists, is not empty and holds no earlier hf_prune export "
                f"({EXPORT_REPORT_NAME}); choose an empty or new directory, or pass overwrite=True to replace it."
            )
    with staged_directory(str(output_dir)) as staging:
        yield Path(staging)


# ----------------------------------------------------------------------------------------------------------------
# Model preparation
# ----------------------------------------------------------------------------------------------------------------


def _safe_summary(model: nn.Module) -> dict:
    try:
        return structure_summary(model)
    except (ValueError, AttributeError, TypeError):
        return {}  # an architecture hf_prune cannot restructure: exported as it is


def _prepare_model(
    model_or_path: Union[str, os.PathLike, nn.Module], remove_structures: bool, tokenizer: Any
) -> tuple[nn.Module, Any, Optional[Path], dict]:
    source_dir = None
    if isinstance(model_or_path, nn.Module):
        # Work on a copy: folding masks and removing units must not change the caller's model. A model that went
        # through a mixed-precision Trainer has its forward wrapped (accelerate's ConvertOutputsToFp32), which the
        # ONNX tracer cannot read: unwrap it.
        from accelerate.utils import extract_model_from_parallel

        model = extract_model_from_parallel(copy.deepcopy(model_or_path), keep_fp32_wrapper=False)
    elif isinstance(model_or_path, (str, os.PathLike)):
        source_dir = Path(model_or_path)
        if not source_dir.is_dir():
            raise FileNotFoundError(f"model_or_path={str(model_or_path)!r} is not a directory with a saved model.")
        model = load_pruned(str(source_dir))
        if tokenizer is None and any((source_dir / name).is_file() for name in _TOKENIZER_FILES):
            from transformers import AutoTokenizer

            try:
                tokenizer = AutoTokenizer.from_pretrained(str(source_dir))
            except (OSError, ValueError, TypeError, AttributeError, KeyError):
                tokenizer = None  # optional: only for the sample inputs and to travel with the export
    else:
        raise TypeError(
            f"model_or_path must be a transformers model or a checkpoint directory, got {type(model_or_path).__name__}."
        )
    make_permanent(model)
    if next(model.parameters()).dtype != torch.float32:
        # ONNX Runtime's CPU kernels are fp32 (INT8 after quantization); bf16/fp16 graphs would not load there.
        model = model.float()
    model.eval()
    removed = remove_empty_structures(model) if remove_structures else {}
    return model, tokenizer, source_dir, removed


def _resolve_task(model: nn.Module, task: Optional[str], summary: dict, notes: list) -> str:
    from optimum.exporters.tasks import TasksManager

    importlib.import_module("optimum.exporters.onnx.model_configs")  # registers the ONNX configs with TasksManager

    inferred = task is None
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    if task is None and encoder_decoder and type(model).__name__.endswith("ForConditionalGeneration"):
        # Optimum's class-based inference maps these to fill-mask; what they are trained and served for is generation.
        speech = getattr(model, "main_input_name", "") == "input_features"
        task = "automatic-speech-recognition" if speech else "text2text-generation"
    if task is None:
        try:
            task = TasksManager._infer_task_from_model_or_model_class(model=model)
        except (ValueError, KeyError) as err:
            raise ValueError(
                f"task=None: the export task could not be inferred for {type(model).__name__} ({err}); pass task=, "
                f"e.g. 'text-classification', 'feature-extraction', 'text-generation'."
            ) from None
    task = TasksManager.map_from_synonym(task)
    model_type = getattr(model.config, "export_model_type", model.config.model_type)
    try:
        supported = TasksManager.get_supported_tasks_for_model_type(model_type, "onnx", library_name="transformers")
    except KeyError:
        raise ValueError(f"Optimum's ONNX exporter does not support model_type={model_type!r}.") from None
    if task not in supported:
        raise ValueError(f"task={task!r} is not supported for {model_type} by Optimum's exporter; allowed: {sorted(supported)}.")
    if encoder_decoder and task.endswith("-with-past"):
        raise ValueError(
            f"task={task!r}: export_onnx writes encoder-decoder models without the decoder's key/value cache (an "
            f"encoder graph and a decoder graph, both verified); pass task={task[: -len('-with-past')]!r}."
        )
    if encoder_decoder and f"{task}-with-past" in supported:
        notes.append(
            f"exported {task} as an encoder graph and a decoder graph without the key/value cache: each generated "
            "token reruns the decoder over the prefix, and pruned head counts never meet Optimum's cache shapes."
        )
        return task
    # Optimum builds the past key/value inputs from config.num_attention_heads for every layer; a pruned layer has
    # fewer heads, so a graph with a KV cache would be traced with the wrong shapes.
    # Removed hidden channels break the same assumption another way: Optimum derives the head size of the cache
    # inputs as hidden_size / num_attention_heads.
    reshaped = summary.get("pruned_heads") or summary.get("pruned_hidden")
    if reshaped and (task.endswith("-with-past") or (inferred and f"{task}-with-past" in supported)):
        task = task[: -len("-with-past")] if task.endswith("-with-past") else task
        reason = (f"every layer keeps all {summary.get('num_attention_heads')} heads, and heads were pruned"
                  if summary.get("pruned_heads") else
                  "head_dim = hidden_size / num_attention_heads, and hidden channels were removed")
        notes.append(f"exported {task} without the key/value cache: the cache inputs assume {reason}.")
    elif inferred and f"{task}-with-past" in supported:
        task = f"{task}-with-past"  # Optimum's default for decoders: generation reuses the cache
    return task


# ----------------------------------------------------------------------------------------------------------------
# Verification
# ----------------------------------------------------------------------------------------------------------------


def _sample_inputs(model: nn.Module, tokenizer: Any, inputs: dict[str, list]) -> dict[str, np.ndarray]:
    """A padded batch of real sentences when a tokenizer is known, else a seeded random batch with padding."""
    if tokenizer is not None:
        tok = copy.copy(tokenizer)
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        encoded = tok(list(_SAMPLE_TEXTS), padding=True, truncation=True, max_length=64, return_tensors="np")
        input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    else:
        generator = np.random.default_rng(0)
        vocab = int(getattr(model.config, "vocab_size", 100))
        input_ids = generator.integers(3, vocab, size=(3, 16))
        attention_mask = np.ones_like(input_ids)
        attention_mask[1, 10:] = 0
        attention_mask[2, 4:] = 0
        eos = getattr(model.config, "eos_token_id", None)
        if isinstance(eos, int) and 0 <= eos < vocab:
            # Each row ends in the end-of-sequence token, as tokenizers write it: BART-style classifiers read their
            # sentence representation there and refuse rows without one.
            input_ids[np.arange(3), attention_mask.sum(axis=1) - 1] = eos
    feed: dict[str, np.ndarray] = {}
    for name, dims in inputs.items():
        if name.startswith("past_key_values"):
            # An empty cache (length 0) makes the graph compute exactly what PyTorch computes without one.
            shape = [input_ids.shape[0] if i == 0 else (d if isinstance(d, int) else 0) for i, d in enumerate(dims)]
            feed[name] = np.zeros(shape, dtype=np.float32)
        elif name == "input_ids":
            feed[name] = input_ids.astype(np.int64)
        elif name == "attention_mask":
            feed[name] = attention_mask.astype(np.int64)
        elif name == "token_type_ids":
            feed[name] = np.zeros_like(input_ids, dtype=np.int64)
        elif name == "position_ids":
            feed[name] = np.clip(np.cumsum(attention_mask, axis=1) - 1, 0, None).astype(np.int64)
        elif name == "input_values":
            # Speech encoders on raw audio (wav2vec2 and its relatives): one second of seeded noise at 16 kHz.
            feed[name] = np.random.default_rng(0).standard_normal((2, 16000)).astype(np.float32)
        elif name == "input_features" and len(dims) == 3 and all(isinstance(d, int) for d in dims[1:]):
            # Speech encoder-decoders on log-mel features (Whisper): the fixed bins x frames the graph was traced at.
            feed[name] = np.random.default_rng(0).standard_normal((2, *dims[1:])).astype(np.float32)
        elif name == "pixel_values" and isinstance(getattr(model.config, "image_size", None), int):
            # Vision encoders (ViT and its relatives): seeded images at the size the config was trained for.
            size, channels = model.config.image_size, int(getattr(model.config, "num_channels", 3))
            feed[name] = np.random.default_rng(0).standard_normal((2, channels, size, size)).astype(np.float32)
        else:
            raise ExportError(f"the exported graph expects an input {name!r} that hf_prune cannot build for verification")
    return feed


@torch.no_grad()
def _graph_reference(model: nn.Module, tokenizer: Any, staging: Path, graph: str) -> tuple[dict, dict]:
    """The feed for one exported graph and what PyTorch computes from it.

    An encoder-decoder model's decoder graph takes the encoder's output: it is fed what the PyTorch encoder gives on
    the encoder graph's sample inputs, with decoder tokens starting from the decoder start token, and compared with
    the whole model's logits on the same tokens.
    """
    inputs, output_names = _graph_io(staging / f"{graph}.onnx")
    if graph == "model":
        feed = _sample_inputs(model, tokenizer, inputs)
        return feed, _torch_outputs(model, feed, output_names)
    encoder_feed = _sample_inputs(model, tokenizer, _graph_io(staging / "encoder_model.onnx")[0])
    hidden = model.get_encoder()(**{k: torch.from_numpy(v) for k, v in encoder_feed.items()})[0]
    if graph == "encoder_model":
        return encoder_feed, {"last_hidden_state": hidden.float().numpy()}
    if graph != "decoder_model":
        raise ExportError(f"Optimum wrote a graph {graph!r} that hf_prune cannot verify")
    decoder_ids = np.random.default_rng(1).integers(3, int(model.config.vocab_size), size=(hidden.shape[0], 5))
    decoder_ids[:, 0] = getattr(model.config, "decoder_start_token_id", None) or 0
    mask = encoder_feed.get("attention_mask")
    sources = {"input_ids": decoder_ids, "encoder_hidden_states": hidden.numpy(), "encoder_attention_mask": mask}
    missing = [name for name in inputs if sources.get(name) is None]
    if missing:
        raise ExportError(f"the decoder graph expects inputs {missing} that hf_prune cannot build for verification")
    extra = {"attention_mask": torch.from_numpy(mask)} if "encoder_attention_mask" in inputs else {}
    logits = model(encoder_outputs=(hidden,), decoder_input_ids=torch.from_numpy(decoder_ids), **extra).logits
    return {name: sources[name] for name in inputs}, {"logits": logits.float().numpy()}


def _checker(result: "ExportResult", key: str, feed: dict, reference: dict, verify: bool,
             quantized_tolerance: float) -> Any:
    """`check(variant, path, limit)`: run `path` in ONNX Runtime on `feed`, record the difference from `reference`
    under `key.format(variant)` and say whether it is within `limit` (INT8: `quantized_tolerance` x output scale)."""
    scale = max(float(np.max(np.abs(v))) for v in reference.values()) if reference else 1.0

    def check(variant: str, path: Path, limit: float) -> bool:
        if not verify:
            return True
        name = key.format(variant)
        if variant == "int8":
            limit = quantized_tolerance * max(scale, 1.0)
        diff, agreement = _compare(reference, _ort_outputs(path, feed))
        result.max_abs_diff[name] = diff
        result.tolerance[name] = limit
        if agreement is not None:
            result.argmax_agreement[name] = agreement
        return diff <= limit

    return check


@torch.no_grad()
def _torch_outputs(model: nn.Module, feed: dict[str, np.ndarray], output_names: list[str]) -> dict[str, np.ndarray]:
    outputs = model(**{k: torch.from_numpy(v) for k, v in feed.items() if not k.startswith("past_key_values")})
    return {name: outputs[name].float().numpy() for name in output_names if name in outputs}


def _ort_outputs(path: Path, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feed)))


def _compare(reference: dict[str, np.ndarray], actual: dict[str, np.ndarray]) -> tuple[float, Optional[float]]:
    diffs, agreement = [], None
    for name, expected in reference.items():
        if name not in actual:
            continue
        got = actual[name]
        if got.shape != expected.shape:
            raise ExportVerificationError(
                f"output {name!r}: ONNX Runtime shape {got.shape} differs from PyTorch shape {expected.shape}"
            )
        diffs.append(float(np.max(np.abs(got.astype(np.float64) - expected.astype(np.float64)))) if got.size else 0.0)
        if name == "logits" and expected.size:
            agreement = float(np.mean(np.argmax(got, axis=-1) == np.argmax(expected, axis=-1)))
    if not diffs:
        raise ExportVerificationError(f"no ONNX output matches a PyTorch output (PyTorch gave {sorted(reference)})")
    return max(diffs), agreement


def _graph_io(path: Path) -> tuple[dict[str, list], list[str]]:
    """Graph inputs with their dims (int when fixed, name when symbolic), and output names."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    initializers = {i.name for i in graph.initializer}
    inputs = {
        i.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in i.type.tensor_type.shape.dim]
        for i in graph.input
        if i.name not in initializers
    }
    return inputs, [o.name for o in graph.output]


def _count_ops(path: Path, op_types: tuple[str, ...]) -> int:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return sum(1 for node in graph.node if node.op_type in op_types)


# ----------------------------------------------------------------------------------------------------------------
# Optimisation, quantization, sparse initializers
# ----------------------------------------------------------------------------------------------------------------


def _optimize(staging: Path, source: Path, config: Any, level: str) -> Path:
    from optimum.onnxruntime import AutoOptimizationConfig, ORTOptimizer

    optimizer = ORTOptimizer(onnx_model_path=[source], config=config)
    optimization_config = AutoOptimizationConfig.with_optimization_level(optimization_level=level, for_gpu=False)
    work = staging / f".optimize-{source.stem}-{level}"
    optimizer.optimize(save_dir=work, optimization_config=optimization_config, file_suffix="optimized")
    produced = work / f"{source.stem}_optimized.onnx"
    if not produced.is_file():
        raise ExportError(f"ORTOptimizer at {level} wrote no {produced.name}")
    return produced


def default_quantization_config(per_channel: bool = True) -> Any:
    """Dynamic INT8 for the CPU this runs on: VNNI kernels where the CPU has them, AVX2 or ARM64 otherwise.

    Per-channel weight scales by default: on the fine-tuned MiniLM they kept 98.6% of argmax decisions against
    96.7% with one scale per tensor, at the same speed.
    """
    from optimum.onnxruntime import AutoQuantizationConfig

    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64"):
        return AutoQuantizationConfig.arm64(is_static=False, per_channel=per_channel)
    flags = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = handle.read()
    except OSError:
        pass
    if "avx512_vnni" in flags:
        return AutoQuantizationConfig.avx512_vnni(is_static=False, per_channel=per_channel)
    return AutoQuantizationConfig.avx2(is_static=False, per_channel=per_channel)


def _quantize(staging: Path, source: Path, quantization_config: Any) -> Path:
    from optimum.onnxruntime import ORTQuantizer

    work = staging / ".quantize"
    quantizer = ORTQuantizer.from_pretrained(staging, file_name=source.name)
    quantizer.quantize(save_dir=work, quantization_config=quantization_config, file_suffix="quantized")
    produced = work / f"{source.stem}_quantized.onnx"
    if not produced.is_file():
        raise ExportError(f"ORTQuantizer wrote no {produced.name}")
    return produced


def write_sparse_initializers(path: Union[str, os.PathLike], min_elements: int = 4096) -> dict:
    """Store each initializer as an ONNX sparse initializer (COO, int64 indices) where that takes fewer bytes.

    A tensor of `n` elements with `nnz` non-zeros costs `nnz * (itemsize + 8)` bytes sparse against `n * itemsize`
    dense, so fp32 weights gain above 2/3 zeros and INT8 weights above 8/9. Rewrites the file in place (through a
    temporary file) only if it gets smaller. ONNX Runtime densifies these tensors at load: no speedup follows.

    Returns:
        {"converted": tensors converted, "dense_bytes": file size before, "file_bytes": file size after}.
    """
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    model = onnx.load(str(path))
    before = path.stat().st_size
    keep, sparse = [], []
    for tensor in model.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.size < min_elements or array.dtype.kind not in "fiu":
            keep.append(tensor)
            continue
        flat = array.reshape(-1)
        nonzero = np.flatnonzero(flat)
        if nonzero.size * (flat.itemsize + 8) >= flat.size * flat.itemsize:
            keep.append(tensor)
            continue
        values = numpy_helper.from_array(flat[nonzero], name=tensor.name)
        indices = numpy_helper.from_array(nonzero.astype(np.int64), name=tensor.name + "_indices")
        sparse.append(onnx.helper.make_sparse_tensor(values, indices, list(array.shape)))
    summary = {"converted": len(sparse), "dense_bytes": before, "file_bytes": before}
    if not sparse:
        return summary
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    model.graph.sparse_initializer.extend(sparse)
    tmp = path.with_name(path.name + ".sparse.tmp")
    onnx.save(model, str(tmp))
    if tmp.stat().st_size < before:
        os.replace(tmp, path)
        summary["file_bytes"] = path.stat().st_size
    else:
        tmp.unlink()
        summary["converted"] = 0
    return summary


# ----------------------------------------------------------------------------------------------------------------
# The public entry point
# ----------------------------------------------------------------------------------------------------------------


def _check_options(optimize: Optional[str], quantize: Optional[str], sparse_initializers: str, tolerance: float,
                   quantized_tolerance: float) -> None:
    if optimize is not None and optimize not in OPTIMIZATION_LEVELS:
        detail = " (O4 is fp16 for GPUs; hf_prune exports for CPU)" if optimize == "O4" else ""
        raise ValueError(f"optimize={optimize!r} is not allowed{detail}; choose one of {list(OPTIMIZATION_LEVELS)} or None.")
    if quantize is not None and quantize not in QUANTIZATION_MODES:
        raise ValueError(
            f"quantize={quantize!r} is not allowed; choose {list(QUANTIZATION_MODES)} or None (static quantization "
            "needs calibration data; use optimum.onnxruntime.ORTQuantizer directly for it)."
        )
    if sparse_initializers not in SPARSE_INITIALIZER_MODES:
        raise ValueError(
            f"sparse_initializers={sparse_initializers!r} is not allowed; choose one of {list(SPARSE_INITIALIZER_MODES)}."
        )
    for name, value in (("tolerance", tolerance), ("quantized_tolerance", quantized_tolerance)):
        if not value >= 0:
            raise ValueError(f"{name}={value!r} must be a number >= 0.")


def check_task(task: Optional[str]) -> None:
    """A task Optimum can export (None: inferred from the model), checked before any model is loaded."""
    if task is None:
        return
    from optimum.exporters.tasks import TasksManager

    known = sorted(TasksManager.get_all_tasks())
    # "-with-past" (a decoder exported with its key/value cache) is a variant of any generation task.
    if task.removesuffix("-with-past") not in known:
        raise ValueError(f"task={task!r} is not a task Optimum exports; choose one of {known}, or leave it out to "
                         "infer it from the model.")


def export_onnx(
    model_or_path: Union[str, os.PathLike, nn.Module],
    output_dir: Union[str, os.PathLike],
    task: Optional[str] = None,
    optimize: Optional[str] = "O2",
    quantize: Optional[str] = None,
    verify: bool = True,
    *,
    remove_structures: bool = False,
    sparse_initializers: str = "auto",
    tolerance: float = 1e-4,
    quantized_tolerance: float = 0.5,
    quantization_config: Any = None,
    tokenizer: Any = None,
    opset: Optional[int] = None,
    overwrite: bool = False,
) -> ExportResult:
    """Export a (pruned) Transformers model to ONNX with Optimum, check it against PyTorch, optimise and quantize it.

    Args:
        model_or_path: a model, or a directory saved by `save_model` / `save_pruned` / `save_pretrained`
            (structurally pruned checkpoints are rebuilt with `load_pruned`).
        output_dir: the export directory; written atomically. An existing directory is replaced only if it holds an
            earlier hf_prune export or `overwrite=True`.
        task: an Optimum task ("text-classification", "feature-extraction", "text-generation", ...); default inferred.
            Models with pruned heads are exported without a key/value cache.
        optimize: ORTOptimizer level, "O1", "O2" (default) or "O3", or None. A level whose graph fails or differs
            from PyTorch by more than `tolerance` falls back to the next lower level; the report says which was kept.
        quantize: "dynamic" for INT8 dynamic quantization, or None.
        verify: compare ONNX Runtime with PyTorch on sample inputs and raise `ExportVerificationError` above the
            tolerance. With verify=False nothing is measured and no optimisation level is checked.
        remove_structures: physically remove attention heads and FFN neurons whose weights are all zero first.
        sparse_initializers: "auto" stores mostly-zero weights as ONNX sparse initializers where the file gets
            smaller (size only: ONNX Runtime densifies them at load); "never" keeps every tensor dense.
        tolerance: maximum abs difference allowed between fp32 (plain and optimised) ONNX and PyTorch outputs.
        quantized_tolerance: for the INT8 graph, as a fraction of the largest |PyTorch output| (at least 1): its
            error is expected and this only catches a broken graph. Measure task accuracy with `hf-prune benchmark`.
        quantization_config: an `optimum.onnxruntime.QuantizationConfig` replacing the CPU-specific default.
        tokenizer: saved with the export and used for sample inputs; default loaded from `model_or_path`.
        opset: ONNX opset; default Optimum's for the architecture.
        overwrite: replace a non-empty `output_dir` that does not hold an hf_prune export.

    Returns:
        An `ExportResult`, also written to `output_dir/hf_prune_export.json`.
    """
    # Options and paths first: a typo is reported whether or not the onnx extra is installed.
    _check_options(optimize, quantize, sparse_initializers, tolerance, quantized_tolerance)
    if isinstance(model_or_path, (str, os.PathLike)) and not Path(model_or_path).is_dir():
        raise FileNotFoundError(f"model_or_path={str(model_or_path)!r} is not a directory with a saved model.")
    require_onnx()
    check_task(task)
    output_dir = Path(output_dir)
    model, tokenizer, source_dir, removed = _prepare_model(model_or_path, remove_structures, tokenizer)
    summary = _safe_summary(model)
    notes: list[str] = []
    task = _resolve_task(model, task, summary, notes)
    result = ExportResult(output_dir=str(output_dir), task=task, notes=notes, removed_structures=removed)
    result.structure = {k: summary[k] for k in ("heads_per_layer", "intermediate_sizes", "parameters") if k in summary}

    with _staged_output(output_dir, overwrite) as staging:
        result.graphs = _export_fp32(model, staging, task, opset)
        if tokenizer is not None:
            tokenizer.save_pretrained(staging)
        if source_dir is not None:
            for name in _PROVENANCE_FILES:
                if (source_dir / name).is_file():
                    shutil.copy2(source_dir / name, staging / name)
        checks = {
            graph: _export_graph(model, tokenizer, staging, graph, result, summary, optimize=optimize,
                                 quantize=quantize, quantization_config=quantization_config, verify=verify,
                                 tolerance=tolerance, quantized_tolerance=quantized_tolerance)
            for graph in result.graphs
        }
        for work in staging.glob(".optimize-*"):
            shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(staging / ".quantize", ignore_errors=True)

        for variant, name in result.files.items():
            if sparse_initializers == "auto":
                converted = write_sparse_initializers(staging / name)
                result.sparse_initializers[variant] = converted
                graph, _, plain = variant.rpartition("/")
                if converted["converted"] and verify:
                    # Re-read through ONNX Runtime: the sparse file must still give the same outputs.
                    if not checks[graph or "model"](plain, staging / name, tolerance):
                        raise ExportVerificationError(f"{name} with sparse initializers no longer matches PyTorch")
            result.sizes_bytes[variant] = (staging / name).stat().st_size
        if any(s.get("converted") for s in result.sparse_initializers.values()):
            notes.append(
                "mostly-zero weights are stored as ONNX sparse initializers: a smaller file only. ONNX Runtime "
                "densifies them at load, so scattered zeros give no speedup; remove heads/neurons "
                "(head_sparsity / neuron_sparsity) and quantize to INT8 for faster inference."
            )
        (staging / EXPORT_REPORT_NAME).write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    for note in notes:
        logger.warning(f"hf_prune.export_onnx: {note}")
    return result


def _export_graph(model: nn.Module, tokenizer: Any, staging: Path, graph: str, result: ExportResult, summary: dict,
                  *, optimize: Optional[str], quantize: Optional[str], quantization_config: Any, verify: bool,
                  tolerance: float, quantized_tolerance: float) -> Any:
    """Verify one exported graph, then optimise and quantize it (each checked); returns its `check` function."""
    key = "{}" if result.graphs == ["model"] else f"{graph}/{{}}"
    feed, reference = _graph_reference(model, tokenizer, staging, graph)
    check = _checker(result, key, feed, reference, verify, quantized_tolerance)
    source = staging / f"{graph}.onnx"
    result.files[key.format("fp32")] = source.name
    output_dir = result.output_dir
    if not check("fp32", source, tolerance):
        raise ExportVerificationError(
            f"the exported ONNX graph {source.name} differs from PyTorch by "
            f"{result.max_abs_diff[key.format('fp32')]:.3g} (tolerance={tolerance}); nothing was written to "
            f"{output_dir!r}."
        )
    if optimize is not None:
        _optimize_with_fallback(model, staging, source, key, optimize, summary, result, check, tolerance)
    if quantize is not None:
        # From the plain graph: ORTQuantizer must know every MatMul's output type, and ONNX shape inference cannot
        # see through the contrib ops (Attention, SkipLayerNormalization) of the fused graph. ONNX Runtime applies its
        # own CPU fusions to the quantized graph when it loads it.
        quantization_config = quantization_config or default_quantization_config()
        quantized = staging / f"{graph}_quantized.onnx"
        os.replace(_quantize(staging, source, quantization_config), quantized)
        result.files[key.format("int8")] = quantized.name
        result.quantization = {"mode": quantize, "source": source.name if len(result.graphs) == 1 else
                               "the plain graph of each", "config": _describe_quantization(quantization_config)}
        if not check("int8", quantized, quantized_tolerance):
            raise ExportVerificationError(
                f"the INT8 graph {quantized.name} differs from PyTorch by {result.max_abs_diff[key.format('int8')]:.3g}, "
                f"more than quantized_tolerance={quantized_tolerance} x its output scale; nothing was written to "
                f"{output_dir!r}."
            )
    return check


def _export_fp32(model: nn.Module, staging: Path, task: str, opset: Optional[int]) -> list[str]:
    """Export with Optimum; the graphs written: ["model"], or the encoder and decoder of an encoder-decoder model."""
    from optimum.exporters.onnx import onnx_export_from_model

    try:
        with warnings.catch_warnings():
            # The tracer warns that Python values in Transformers' masking code become constants of the graph. That
            # would be a problem only if the graph then failed on other shapes, and export_onnx checks exactly that:
            # the verification runs ONNX Runtime on batches of another size and length than the trace used.
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            onnx_export_from_model(model, staging, task=task, opset=opset, do_validation=False, no_post_process=True)
    except Exception as err:  # the exporter raises many types; report them as one
        raise ExportError(f"Optimum's ONNX exporter failed for task={task!r}: {type(err).__name__}: {err}") from err
    found = sorted(p.stem for p in staging.glob("*.onnx"))
    for graphs in (["model"], ["encoder_model", "decoder_model"]):
        if found == sorted(graphs):
            return graphs
    raise ExportError(f"Optimum wrote {found} for task={task!r}; hf_prune expects {ONNX_FILE}, or an encoder_model "
                      "and a decoder_model graph.")


def _optimize_with_fallback(model, staging, source, key, optimize, summary, result, check, tolerance) -> None:
    """Optimise `source` at `optimize`, falling back to lower levels; record it under `key` ("{}" for one graph)."""
    levels = list(OPTIMIZATION_LEVELS[: OPTIMIZATION_LEVELS.index(optimize) + 1])[::-1]
    single = key == "{}"
    attempts = []

    def record(entry: dict) -> None:
        if single:
            result.optimization = entry
        else:  # one entry per graph, and what each kept
            result.optimization.setdefault("requested", optimize)
            result.optimization.setdefault("applied", {})[source.stem] = entry["applied"]
            result.optimization.setdefault("graphs", {})[source.stem] = entry

    for level in levels:
        trial = key.format(f"optimized_{level}")
        try:
            produced = _optimize(staging, source, model.config, level)
        except Exception as err:  # ORT's fusion scripts raise assorted errors on graphs they do not expect
            attempts.append({"level": level, "error": f"{type(err).__name__}: {err}"})
            continue
        if check(f"optimized_{level}", produced, tolerance):
            kept, name = staging / f"{source.stem}_optimized.onnx", key.format("optimized")
            os.replace(produced, kept)
            result.max_abs_diff[name] = result.max_abs_diff.pop(trial, None)
            result.tolerance[name] = result.tolerance.pop(trial, tolerance)
            if trial in result.argmax_agreement:
                result.argmax_agreement[name] = result.argmax_agreement.pop(trial)
            result.files[name] = kept.name
            layers_with_heads = sum(1 for h in summary.get("heads_per_layer", []) if h)
            fused = _count_ops(kept, _FUSED_ATTENTION_OPS)
            record({"requested": optimize, "applied": level, "attempts": attempts, "fused_attention_nodes": fused,
                    "layers_with_heads": layers_with_heads})
            if level != optimize:
                result.notes.append(f"graph optimisation {optimize} failed or changed the outputs of {source.name}; "
                                    f"kept {level} instead ({attempts[-1].get('error', 'outputs differed')}).")
            if single and level != "O1" and summary and fused < layers_with_heads:
                why = " (pruned head counts can defeat it)" if summary.get("pruned_heads") else ""
                result.notes.append(
                    f"attention fused in {fused} of {layers_with_heads} layers; the others run unfused: ONNX "
                    f"Runtime's fusion patterns did not match them{why}. Outputs were checked either way."
                )
            return
        attempts.append({"level": level, "error": f"outputs differ by {result.max_abs_diff.pop(trial):.3g}"})
        result.tolerance.pop(trial, None)
        result.argmax_agreement.pop(trial, None)
    record({"requested": optimize, "applied": None, "attempts": attempts})
    which = "" if single else f" of {source.name}"
    result.notes.append(f"graph optimisation{which} failed at every level ({attempts}); serving the unoptimised "
                        "graph, which ONNX Runtime still optimises when it loads it.")


def _describe_quantization(config: Any) -> dict:
    keys = ("is_static", "format", "mode", "activations_dtype", "weights_dtype", "per_channel", "reduce_range",
            "operators_to_quantize")
    described = {}
    for key in keys:
        value = getattr(config, key, None)
        described[key] = value if isinstance(value, (bool, int, float, str, list, type(None))) else str(value)
    return described
