"""``onspec info``: what this machine gives onspec, and which compute path it takes and why.

A user whose outputs or speed surprise them needs to see, in one place, what the engine decided from the
CPU: its flags, whether onspec's kernels run (and so whether speculative output is bit-exact), the threads.
``--json`` prints the same as one JSON object for scripts and bug reports.
"""

from __future__ import annotations

import argparse
import json
import platform

from .cpu import cpu_flags


def add_arguments(p: argparse.ArgumentParser, name: str) -> None:
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32", "float16"),
                   help="the model dtype to report the compute path for")
    p.add_argument("--threads", type=int, default=0, help="torch threads to report (0: torch's default)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")


def cpu_model_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def collect(dtype: str, threads: int) -> dict:
    """Everything ``onspec info`` reports, as plain data (builds the kernels on first use: about a minute)."""
    import torch

    from . import __version__
    from .models.bf16_linear import compiled_kernel, path_for_dtype
    from .models.loader import DTYPES

    if threads > 0:
        torch.set_num_threads(threads)
    path = path_for_dtype(DTYPES[dtype])
    return {"onspec": __version__, "torch": torch.__version__, "cpu": cpu_model_name(),
            "machine": platform.machine(), "threads": torch.get_num_threads(), "dtype": dtype,
            "kernels_built": compiled_kernel() is not None, "compute_path": path.to_dict(),
            "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))}


def run(args: argparse.Namespace) -> int:
    if args.threads < 0:
        raise ValueError("--threads must be >= 0")
    info = collect(args.dtype, args.threads)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    path = info["compute_path"]
    print(f"onspec {info['onspec']} (torch {info['torch']}) on {info['cpu']} ({info['machine']}), "
          f"{info['threads']} threads")
    print(f"CPU flags: {' '.join(info['cpu_flags']) or '(none of avx/amx/fma)'}")
    print(f"kernels built: {'yes' if info['kernels_built'] else 'no'}; ONSPEC_BF16_KERNEL={path['mode']}")
    print(f"compute path ({info['dtype']}): {path['name']}")
    print(f"bit-exact across batches (speculative output == plain output): {'yes' if path['exact'] else 'NO'}")
    print(f"why: {path['reason']}")
    return 0
