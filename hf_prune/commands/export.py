"""`hf-prune export`: a (pruned) checkpoint to ONNX through Optimum, verified against PyTorch, optimised and
optionally quantized to INT8, written atomically (`hf_prune.export_onnx`).

    hf-prune export outputs/default/pruned outputs/default/onnx --quantize dynamic
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence

from ..export import OPTIMIZATION_LEVELS, QUANTIZATION_MODES, SPARSE_INITIALIZER_MODES, ExportError, export_onnx
from ..files import OutputDirInUse, hold_output_dir
from .parsing import CommandParser, parse_command

NAME = "export"


@dataclass
class ExportArguments:
    """The options of `hf-prune export`; `export_onnx`'s keywords of the same names."""

    _argument_group_name = "export"

    task: Optional[str] = field(default=None, metadata={"help": "Optimum task, e.g. text-classification "
                                                                "(default: inferred)"})
    optimize: Literal[OPTIMIZATION_LEVELS + ("none",)] = field(
        default="O2", metadata={"help": "ORTOptimizer level (default O2; falls back to a lower level if a graph is "
                                        "wrong)"})
    quantize: Optional[Literal[QUANTIZATION_MODES + ("none",)]] = field(default=None,
                                                          metadata={"help": "add a dynamic INT8 graph"})
    verify: bool = field(default=True, metadata={"help": "compare ONNX Runtime with PyTorch on sample inputs "
                                                         "(--no_verify skips it)"})
    remove_structures: bool = field(
        default=False, metadata={"help": "physically remove all-zero attention heads and FFN neurons before exporting"})
    sparse_initializers: Literal[SPARSE_INITIALIZER_MODES] = field(
        default="auto", metadata={"help": "store mostly-zero weights sparsely when the file gets smaller (size only, "
                                          "no speedup)"})
    tolerance: float = field(default=1e-4, metadata={"help": "max abs diff allowed for fp32 graphs"})
    quantized_tolerance: float = field(
        default=0.5, metadata={"help": "max abs diff allowed for INT8, as a fraction of the largest |output| (at "
                                       "least 1)"})
    overwrite: bool = field(default=False,
                            metadata={"help": "replace a non-empty output_dir that is not an export"})


def make_parser() -> CommandParser:
    parser = CommandParser(
        (ExportArguments,),
        prog="hf-prune export",
        description="Export a (pruned) checkpoint to ONNX through Optimum, verified against PyTorch, optimised and "
        "optionally quantized to INT8. The output directory is written atomically.",
    )
    parser.add_argument("checkpoint", help="checkpoint folder (save_model / save_pruned / save_pretrained output)")
    parser.add_argument("output_dir", help="export folder (replaced only if it holds an earlier hf_prune export)")
    return parser


def main(argv: Sequence[str]) -> int:
    paths: dict = {}
    (args,) = parse_command(argv, (ExportArguments,), make_parser, NAME, extras=paths)
    try:
        with hold_output_dir(paths["output_dir"], option="output_dir"):
            result = export_onnx(
                paths["checkpoint"], paths["output_dir"], task=args.task,
                optimize=None if args.optimize == "none" else args.optimize,
                quantize=None if args.quantize in (None, "none") else args.quantize,
                verify=args.verify, remove_structures=args.remove_structures,
                sparse_initializers=args.sparse_initializers, tolerance=args.tolerance,
                quantized_tolerance=args.quantized_tolerance, overwrite=args.overwrite,
            )
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, ExportError, OutputDirInUse) as err:
        raise SystemExit(f"hf-prune export: {err}") from None
    print(f"Exported {paths['checkpoint']} -> {result.output_dir} (task {result.task})")
    for variant, name in result.files.items():
        diff = result.max_abs_diff.get(variant)
        checked = f", max |ORT - PyTorch| {diff:.2e}" if diff is not None else ""
        print(f"  {variant:<9} {name:<22} {result.sizes_bytes[variant] / 1e6:8.2f} MB{checked}")
    if result.optimization:
        print(f"  graph optimisation: requested {result.optimization['requested']}, applied "
              f"{result.optimization['applied']}")
    # The notes were logged once by export_onnx already (and are in hf_prune_export.json): not printed twice.
    return 0
