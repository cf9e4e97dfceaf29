"""What verifying draft tokens costs: one target forward of B rows x k tokens each, against decoding (k = 1),
on every compute path this CPU can run (onspec/models/compute_path.py).

Speculation pays only if verifying k tokens costs much less than k decoding steps. The paths: onspec's
kernels in each variant the CPU has (``avx2``: bf16 widened to fp32 with 8-lane FMAs; ``avx512_bf16``:
vdpbf16ps dot products), both batch-invariant and so exact, and PyTorch's bf16 ops (``pytorch``, what
``ONSPEC_BF16_KERNEL=off`` runs; native avx512_bf16/AMX products where the CPU has them, not
batch-invariant). For each shape the bench prints each path's forward time, its cost relative to k = 1 in
the same path, and each kernel variant's speedup over PyTorch's ops at the same shape. All paths run in the
same process, interleaved, on the same model and cache (the path is switched with ``ONSPEC_BF16_KERNEL``,
which onspec reads on every call); medians over ``--repeats``.

    python bench/verify_cost.py                       # default model, bf16, 1 row of 1/4/16/64 tokens
    python bench/verify_cost.py --rows 1 4 --tokens 1 2 4 8 16 32 --repeats 15
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import busy_warning, machine_info, median, print_table, set_threads, write_results  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, nargs="+", default=[1], help="sequences in the forward")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 4, 16, 64], help="tokens per sequence")
    ap.add_argument("--cached", type=int, default=300, help="tokens already in each sequence's cache")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--name", default="verify_cost")
    args = ap.parse_args(argv)
    if min(args.rows) < 1 or min(args.tokens) < 1 or args.repeats < 1 or args.cached < 0:
        ap.error("--rows, --tokens and --repeats must be >= 1, --cached >= 0")

    set_threads(args.threads)
    import torch

    from onspec.engine.kv_cache import KVCache
    from onspec.engine.runner import ModelRunner, RowSpec
    from onspec.cpu import cpu_flags
    from onspec.models.bf16_linear import compiled_kernel
    from onspec.models.compute_path import DP_REQUIRES, KERNEL_ENV
    from onspec.models.loader import load_model

    if compiled_kernel() is None:
        print("onspec's kernels cannot run on this CPU (or could not be built): nothing to compare",
              file=sys.stderr)
        return 2
    loaded = load_model(args.model, dtype="bfloat16")
    max_len = args.cached + max(args.tokens) + 8
    kv = KVCache(loaded.arch, max(args.rows), max_len, torch.bfloat16)
    runner = ModelRunner(loaded.model, kv)
    variants = ["avx2"] + (["avx512_bf16"] if DP_REQUIRES <= cpu_flags() else [])
    env = {f"kernels-{v}": v for v in variants} | {"pytorch": "off"}

    def use_mode(mode: str) -> None:
        os.environ[KERNEL_ENV] = env[mode]

    def forward_seconds(rows: int, k: int) -> float:
        spec = [RowSpec(slot=s, cache_len=args.cached, tokens=list(range(100, 100 + k)), logits_from=0)
                for s in range(rows)]
        t0 = time.perf_counter()
        runner.run(spec)
        return time.perf_counter() - t0

    modes = tuple(env)
    times: dict[tuple[str, int, int], list[float]] = {}
    with torch.inference_mode():
        for rows in args.rows:
            for k in args.tokens:
                for mode in modes:                      # warm-up: oneDNN primitives, packed weights
                    use_mode(mode)
                    forward_seconds(rows, k)
        for _ in range(args.repeats):
            for rows in args.rows:
                for k in args.tokens:
                    for mode in modes:
                        use_mode(mode)
                        times.setdefault((mode, rows, k), []).append(forward_seconds(rows, k))
    os.environ.pop(KERNEL_ENV, None)

    ms = {key: median(v) * 1e3 for key, v in times.items()}
    table, results = [], []
    k0 = args.tokens[0]
    for rows in args.rows:
        for k in args.tokens:
            row: list[object] = [f"{rows} x {k}"]
            result: dict[str, object] = {"rows": rows, "tokens_per_row": k}
            for mode in modes:
                rel = ms[(mode, rows, k)] / ms[(mode, rows, k0)]
                row += [ms[(mode, rows, k)], rel]
                result |= {f"{mode}_ms": ms[(mode, rows, k)], f"{mode}_vs_k1": rel,
                           f"{mode}_samples_ms": [t * 1e3 for t in times[(mode, rows, k)]]}
            speedups = {v: ms[("pytorch", rows, k)] / ms[(f"kernels-{v}", rows, k)] for v in variants}
            table.append(row + list(speedups.values()))
            results.append(result | {f"kernels_{v}_speedup": x for v, x in speedups.items()})
    notes = [f"medians of {args.repeats} interleaved repeats; {args.cached} tokens cached per row; "
             f"'x k={args.tokens[0]}': the forward's cost relative to {args.tokens[0]} token(s) per row "
             f"in the same mode"]
    if (w := busy_warning(args.threads)):
        notes.append(w)
    columns = (["rows x tokens"] + [c for mode in modes for c in (f"{mode} ms", f"x k={k0}")]
               + [f"{v} over pytorch" for v in variants])
    print_table(f"Target forward, {args.model} bf16, {args.threads} threads", columns, table, notes)
    payload = {"machine": machine_info(args.threads), "args": vars(args), "results": results}
    bars = {f"{rows} rows: ms per forward": {f"{mode} k={k}": ms[(mode, rows, k)]
                                             for k in args.tokens for mode in modes}
            for rows in args.rows}
    jpath, ppath = write_results(args.name, payload, bars, ylabel="ms")
    print(f"results: {jpath}" + (f", {ppath}" if ppath else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
