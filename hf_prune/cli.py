"""`hf-prune` command line: picks the command and hands it the rest of the arguments (`hf_prune.commands`).

    hf-prune train --config configs/default.yaml --target_sparsity 0.8 --max_steps 100
    hf-prune optimize --model_name_or_path outputs/main/dense --target_speedup 2.5 --quantize dynamic
    hf-prune export outputs/main/pruned outputs/main/onnx --quantize dynamic
    hf-prune benchmark outputs/main/dense outputs/main/pruned --test_file test.csv
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from .commands import COMMANDS, command

def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: hf-prune COMMAND [options]", "", "commands:"]
        lines += [f"  {name:<10} {summary}" for name, (_, summary) in COMMANDS.items()]
        lines += ["", "Run `hf-prune COMMAND --help` for the options of a command."]
        print("\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nhf-prune: unknown command {argv[0]!r}; choose one of {sorted(COMMANDS)}.", file=sys.stderr)
            return 2
        return 0 if argv else 2
    status = command(argv[0]).main(argv[1:])
    leave_process_group()
    return status


def leave_process_group() -> None:
    """Under torchrun, let every rank finish before any tears its process group down.

    A rank that exits while another is still saving (rank 0 writes the model, the others have nothing to do) used to
    leave a live gloo group behind at interpreter exit; once in a few runs that aborted the process ("terminate
    called without an active exception", exit -6), failing a job whose result was complete. Only reached when the
    command returned on this rank: a rank that raised leaves it to torchrun to stop the others."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
