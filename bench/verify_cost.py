"""What verifying draft tokens costs: one target forward of B rows x k tokens each, against decoding (k = 1),
with onspec's CPU kernels and with PyTorch's bf16 ops (onspec/models/bf16_linear.py, onspec/models/fused.py).

Speculation pays only if verifying k tokens costs much less than k decoding steps. Where the CPU has a
native bf16 product (AMX, avx512_bf16) a forward of many tokens costs about as much as one; on CPUs with
AVX2 only, PyTorch's bf16 product costs time in proportion to the rows, and the kernel exists to restore
the first property; the fused elementwise ops cut the per-layer overhead that is left. Four modes:
``kernels`` (all of them), ``sdpa`` (all but the row-local attention kernel: PyTorch's attention),
``linear`` (the linear kernel alone, PyTorch's elementwise ops and attention) and ``pytorch`` (none).
For each k the bench prints each mode's forward time and its cost relative to decoding (k = 1) in the
same mode, plus the speedups of ``kernels`` over ``pytorch`` and over ``sdpa`` at the same shape (the
second: what bit-exact bf16 speculation costs or saves). All modes run in the same process, interleaved,
on the same model and cache; medians over ``--repeats``.

    python bench/verify_cost.py                       # default model, bf16, 2 rows at 300 cached tokens
    python bench/verify_cost.py --rows 1 4 --tokens 1 2 4 8 16 32 --repeats 15
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--rows", type=int, nargs="+", default=[2], help="sequences in the forward")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="tokens per sequence")
    ap.add_argument("--cached", type=int, default=300, help="tokens already in each sequence's cache")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--name", default="verify_cost")
    args = ap.parse_args(argv)
    if min(args.rows) < 1 or min(args.tokens) < 1 or args.repeats < 1 or args.cached < 0:
        ap.error("--rows, --tokens and --repeats must be >= 1, --cached >= 0")

    set_threads(args.threads)
    import torch
    import torch.nn as nn

    from onspec.engine.kv_cache import KVCache
    from onspec.engine.runner import ModelRunner, RowSpec
    from onspec.cpu import NATIVE_BF16_FLAGS, cpu_flags
    from onspec.models import fused, llama
    from onspec.models.bf16_linear import Bf16Linear, load_kernel
    from onspec.models.loader import load_model

    if load_kernel() is None:
        print("the bf16 kernel does not apply on this CPU (or could not be built): nothing to compare",
              file=sys.stderr)
        return 2
    loaded = load_model(args.model, dtype="bfloat16")
    linears = [m for m in loaded.model.modules() if type(m) is Bf16Linear]
    max_len = args.cached + max(args.tokens) + 8
    kv = KVCache(loaded.arch, max(args.rows), max_len, torch.bfloat16)
    runner = ModelRunner(loaded.model, kv)

    kernel_applies, attention_applies = fused.kernel_applies, llama.attention_kernel_applies

    def use_mode(mode: str) -> None:
        for m in linears:
            m.__class__ = Bf16Linear if mode != "pytorch" else nn.Linear
        # the fused ops take the kernel path only where ``kernel_applies`` says so; attention where the
        # layer's ``attention_kernel_applies`` does
        fused.kernel_applies = kernel_applies if mode in ("kernels", "sdpa") else (lambda *tensors: False)
        llama.attention_kernel_applies = attention_applies if mode == "kernels" else (lambda *tensors: False)

    def forward_seconds(rows: int, k: int) -> float:
        spec = [RowSpec(slot=s, cache_len=args.cached, tokens=list(range(100, 100 + k)), logits_from=0)
                for s in range(rows)]
        t0 = time.perf_counter()
        runner.run(spec)
        return time.perf_counter() - t0

    modes = ("kernels", "sdpa", "linear", "pytorch")
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
    use_mode("kernels")

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
            speedup = ms[("pytorch", rows, k)] / ms[("kernels", rows, k)]
            attention = ms[("sdpa", rows, k)] / ms[("kernels", rows, k)]
            table.append(row + [speedup, attention])
            results.append(result | {"kernels_speedup": speedup, "attention_kernel_speedup": attention})
    notes = [f"medians of {args.repeats} interleaved repeats; {args.cached} tokens cached per row; "
             f"'x k={args.tokens[0]}': the forward's cost relative to {args.tokens[0]} token(s) per row "
             f"in the same mode"]
    if (w := busy_warning(args.threads)):
        notes.append(w)
    columns = ["rows x tokens"] + [c for mode in modes for c in (f"{mode} ms", f"x k={k0}")] + ["kernels speedup",
                                                                                         "attention kernel speedup"]
    print_table(f"Target forward, {args.model} bf16, {args.threads} threads", columns, table, notes)
    flags = sorted(cpu_flags() & ({"avx2", "fma", "avx512f"} | NATIVE_BF16_FLAGS))
    payload = {"machine": {**machine_info(args.threads), "cpu_flags": flags}, "args": vars(args), "results": results}
    bars = {f"{rows} rows: ms per forward": {f"{mode} k={k}": ms[(mode, rows, k)]
                                             for k in args.tokens for mode in modes}
            for rows in args.rows}
    jpath, ppath = write_results(args.name, payload, bars, ylabel="ms")
    print(f"results: {jpath}" + (f", {ppath}" if ppath else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
