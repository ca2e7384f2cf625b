"""BitLinear forward+backward against nn.Linear at BitNet b1.58 2B4T layer shapes.

Both layers see the same input and the same upstream gradient; the timing covers the forward
pass and the backward pass (gradients of the input and of the weight), the work one training
step does per layer. Measured interleaved (nn.Linear, BitLinear, nn.Linear, ...) and the
median is kept, so load from other processes hits both sides alike.

    python benchmarks/bench_bitlinear.py [--tokens 256 1024] [--repeats 7] [--dtype both]

What limits the ratio: besides nn.Linear's three matmuls (forward, input gradient, weight
gradient), BitLinear makes a handful of elementwise passes over the latent weight matrix
every forward (absmean scale, scale-round-clip, dequantize, the straight-through mix). They
cost O(N*K) memory traffic while the matmuls cost O(T*N*K) flops, so the ratio falls towards
1 as the tokens per step T grow.

glibc hands buffers above 32 MB (a 2560 x 6912 float32 matrix is 70 MB) straight back to the
kernel when freed, so every step page-faults its weight-sized buffers afresh, on both sides.
`--malloc-cache` raises glibc's thresholds so that they are reused (what jemalloc or tcmalloc,
commonly preloaded for CPU training, do anyway).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import platform
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from bitnet158.nn.bitlinear import BitLinear

SHAPES = [(2560, 2560), (2560, 6912), (6912, 2560)]  # (in, out): q/o, gate/up, down


def step_seconds(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> float:
    x = x.detach().requires_grad_(True)
    t0 = time.perf_counter()
    layer(x).backward(grad)
    seconds = time.perf_counter() - t0
    layer.weight.grad = None
    return seconds


def bench(k: int, n: int, tokens: int, repeats: int, dtype: str) -> dict:
    torch.manual_seed(0)
    linear = nn.Linear(k, n, bias=False)
    bit = BitLinear(k, n)
    with torch.no_grad():
        bit.weight.copy_(linear.weight)
    x, grad = torch.randn(tokens, k), torch.randn(tokens, n)
    times: dict[str, list[float]] = {"linear": [], "bitlinear": []}
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    with autocast:
        for layer in (linear, bit):  # warm-up: allocator, oneDNN primitive caches
            step_seconds(layer, x, grad)
        for _ in range(repeats):
            times["linear"].append(step_seconds(linear, x, grad))
            times["bitlinear"].append(step_seconds(bit, x, grad))
    lin, b = statistics.median(times["linear"]), statistics.median(times["bitlinear"])
    return {"in": k, "out": n, "tokens": tokens, "dtype": dtype, "linear_ms": lin * 1e3,
            "bitlinear_ms": b * 1e3, "ratio": b / lin}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 1024])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--dtype", choices=["fp32", "bf16", "both"], default="fp32")
    ap.add_argument("--json", type=Path, default=Path(__file__).with_suffix(".json"))
    ap.add_argument("--malloc-cache", action="store_true",
                    help="keep freed large buffers in glibc's heap (Linux)")  # fmt: skip
    args = ap.parse_args()
    if args.malloc_cache:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD: allocate up to 1 GiB from the heap
        libc.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD: do not give freed memory back
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = ["fp32", "bf16"] if args.dtype == "both" else [args.dtype]
    rows = [bench(k, n, t, args.repeats, d) for d in dtypes for t in args.tokens for k, n in SHAPES]
    print(f"BitLinear vs nn.Linear, forward + backward, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, median of {args.repeats}"
          f"{', glibc malloc cache' if args.malloc_cache else ''}\n")  # fmt: skip
    print("| in → out | tokens | dtype | nn.Linear ms | BitLinear ms | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['in']} → {r['out']} | {r['tokens']} | {r['dtype']} | {r['linear_ms']:.1f} | "
              f"{r['bitlinear_ms']:.1f} | {r['ratio']:.2f}× |")  # fmt: skip
    report = {
        "benchmark": "bitlinear_fwd_bwd",
        "malloc_cache": args.malloc_cache,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "machine": platform.processor() or platform.machine(),
        "rows": rows,
    }
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
