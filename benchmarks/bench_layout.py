"""Decode GEMV per token: our 2-bit layout against our 1.6-bit layout (5 trits per byte).

The ternary weights of one microsoft/bitnet-b1.58-2B-4T decode step (30 layers of q, k, v, o,
gate, up, down: 2.08 G weights, 521 MB at 2 bits, 419 MB at 1.6 bits, far beyond the L3
cache) are held in both layouts (`packing.pack_ours` / `packing.pack_ours_tq1`), and one token's
worth of exact int8 x ternary dot products is timed with `_native.ternary_gemm_i32` and
`_native.ternary_gemm_tq1_i32`. Two ways to call them:

- stacked: all matrices of one input width as one matrix (the k = 2560 ones, 606,720 rows, and
  the k = 6912 ones, 76,800 rows): two calls per token, the kernels and memory alone;
- per-matrix: 210 calls per token (7 per layer), each with its own thread-pool job, as the
  engine's layer loop makes them (plus our Python call overhead, the same for both layouts).

The machine is shared: speed moves 2x from minute to minute. So the two layouts run in paired
rounds (2-bit then 1.6-bit, the order swapped every other round), each round timing a few
tokens per layout; the table shows medians over rounds and the per-round ratios. The memory
read bandwidth is measured in the same run (`bench.read_bandwidth`): before and after all
rounds, and before each round at its thread count (the 1.6-bit layout wins or loses with it).

Random weights: every byte is one the packer writes (valid codes), drawn at random; neither
kernel's speed depends on the values. One 2560 x 2560 matrix of real codes, packed both ways,
is checked against numpy first. Each kernel's own ceiling (weights in L3, so memory does not
limit it) is measured too: the 1.6-bit layout can only win where memory, not decoding, is the
bound.

    python benchmarks/bench_layout.py [--rounds 7] [--tokens 5] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

from bitnet158 import _native, packing
from bitnet158.bench import read_bandwidth, shape_config
from bitnet158.formats.native import projection_shapes

LAYOUTS = ("2-bit", "1.6-bit")


def valid_bytes(layout: str) -> np.ndarray:
    """Every byte value the layout's packer writes: all code tuples packed, one byte each."""
    trits = 4 if layout == "2-bit" else 5
    tuples = np.array(list(itertools.product((-1, 0, 1), repeat=trits)), dtype=np.int8)
    # row 4j of a matrix holds tuple j at k = 0, 64, ...: byte 0 of group j holds it
    codes = np.zeros((4 * len(tuples), 64 * trits), dtype=np.int8)
    codes[::4, ::64] = tuples
    packed = packing.pack_ours(codes) if layout == "2-bit" else packing.pack_ours_tq1(codes)
    return packed[:, 0].copy()


def random_packed(layout: str, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Packed weights [n, k] of random valid bytes, filled a slab at a time (bounded memory)."""
    shape = packing.ours_packed_shape(n, k) if layout == "2-bit" else packing.ours_tq1_packed_shape(n, k)  # fmt: skip
    table = valid_bytes(layout)
    out = np.empty(shape, dtype=np.uint8)
    slab = max(1, (64 << 20) // shape[1])
    for g in range(0, shape[0], slab):
        idx = rng.integers(0, len(table), size=(min(slab, shape[0] - g), shape[1]), dtype=np.uint8)
        np.take(table, idx, out=out[g : g + slab])
    return out


def gemm(layout: str):
    return _native.ternary_gemm_i32 if layout == "2-bit" else _native.ternary_gemm_tq1_i32


def check_kernels(rng: np.random.Generator) -> None:
    """Both layouts' kernels give numpy's exact product on real codes (or the run stops)."""
    codes = rng.integers(-1, 2, size=(2560, 2560)).astype(np.int8)
    x_q = rng.integers(-128, 128, size=(1, 2560)).astype(np.int8)
    expected = (x_q.astype(np.float64) @ codes.T.astype(np.float64)).astype(np.int32)
    for layout, pack in zip(LAYOUTS, (packing.pack_ours, packing.pack_ours_tq1), strict=True):
        got = gemm(layout)(x_q, pack(codes), 2560, 2560)
        if not np.array_equal(got, expected):
            raise SystemExit(f"{layout} kernel disagrees with numpy: not benchmarking it")


class DecodeWeights:
    """All ternary weights of a 2B-4T decode step in one layout, stacked by input width."""

    def __init__(self, layout: str, seed: int) -> None:
        cfg = shape_config("2b4t")
        shapes = projection_shapes(cfg)
        self.layout = layout
        self.layers = cfg.num_layers
        rng = np.random.default_rng(seed)
        self.stacks: dict[int, np.ndarray] = {}  # k -> packed weights of every matrix of width k
        self.rows: dict[int, int] = {}
        self.matrices: list[tuple[np.ndarray, int, int]] = []  # (packed view, n, k), engine order
        offsets: dict[int, int] = {}
        for _ in range(self.layers):
            for n, k in shapes.values():
                offsets[k] = offsets.get(k, 0) + n
        for k, rows in offsets.items():
            self.stacks[k] = random_packed(layout, rows, k, rng)
            self.rows[k] = rows
        seen = dict.fromkeys(offsets, 0)
        for _ in range(self.layers):
            for n, k in shapes.values():  # all n are multiples of 4: whole row groups
                g0 = seen[k] // 4
                self.matrices.append((self.stacks[k][g0 : g0 + n // 4], n, k))
                seen[k] += n
        self.x = {k: rng.integers(-128, 128, size=(1, k)).astype(np.int8) for k in offsets}

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.stacks.values())

    def step(self, mode: str) -> float:
        """Seconds for one token's dot products with every weight."""
        fn = gemm(self.layout)
        t0 = time.perf_counter()
        if mode == "stacked":
            for k, packed in self.stacks.items():
                fn(self.x[k], packed, self.rows[k], k)
        else:
            for packed, n, k in self.matrices:
                fn(self.x[k], packed, n, k)
        return time.perf_counter() - t0


def paired_rounds(weights: dict[str, DecodeWeights], mode: str, threads: int, rounds: int,
                  tokens: int) -> dict:  # fmt: skip
    """Rounds of `tokens` steps per layout, alternating; per-round medians and ratios."""
    _native.set_num_threads(threads)
    for w in weights.values():  # warm-up: page the weights in, wake the thread pool
        w.step(mode)
    per_round = []
    for r in range(rounds):
        order = LAYOUTS if r % 2 == 0 else LAYOUTS[::-1]
        load = os.getloadavg()[0]
        bandwidth = read_bandwidth(threads, size=256 << 20, reps=2)  # what the host gives now
        ms = {}
        for layout in order:
            ms[layout] = 1e3 * statistics.median(weights[layout].step(mode) for _ in range(tokens))
        per_round.append({"round": r + 1, "first": order[0], "load_avg": load,
                          "read_bandwidth_bytes_per_s": bandwidth, "ms": ms,
                          "ratio": ms["2-bit"] / ms["1.6-bit"]})  # fmt: skip
    return {
        "mode": mode,
        "threads": threads,
        "rounds": per_round,
        "median_ms": {lay: statistics.median(p["ms"][lay] for p in per_round) for lay in LAYOUTS},
        "median_ratio": statistics.median(p["ratio"] for p in per_round),
    }


def cached_ceiling(threads: int, reps: int = 30) -> dict:
    """Each kernel's speed with its weights in L3 (16384 x 2560: 10.5 MB at 2 bits), where
    memory does not limit it: G weights per second, the best of `reps` calls per layout, the
    layouts alternating (a ceiling: the fastest the kernel went)."""
    _native.set_num_threads(threads)
    rng = np.random.default_rng(1)
    n, k = 16384, 2560
    codes = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    x_q = rng.integers(-128, 128, size=(1, k)).astype(np.int8)
    packed = {"2-bit": packing.pack_ours(codes), "1.6-bit": packing.pack_ours_tq1(codes)}
    best = dict.fromkeys(LAYOUTS, float("inf"))
    for _ in range(reps):
        for layout in LAYOUTS:
            t0 = time.perf_counter()
            gemm(layout)(x_q, packed[layout], n, k)
            best[layout] = min(best[layout], time.perf_counter() - t0)
    return {lay: {"gweights_per_s": codes.size / best[lay] / 1e9,
                  "packed_gb_per_s": packed[lay].nbytes / best[lay] / 1e9} for lay in LAYOUTS}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--tokens", type=int, default=5, help="decode steps per layout per round")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--modes", nargs="+", default=["stacked", "per-matrix"],
                    choices=["stacked", "per-matrix"])  # fmt: skip
    ap.add_argument("--json", type=Path, default=Path(__file__).with_suffix(".json"))
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    check_kernels(rng)
    load_before = os.getloadavg()
    weights = {lay: DecodeWeights(lay, seed=i) for i, lay in enumerate(LAYOUTS)}
    nbytes = {lay: w.nbytes for lay, w in weights.items()}
    bandwidth = {t: [read_bandwidth(t, size=512 << 20, reps=3)] for t in args.threads}
    ceilings = {t: cached_ceiling(t) for t in args.threads}
    runs = [paired_rounds(weights, m, t, args.rounds, args.tokens)
            for t in args.threads for m in args.modes]  # fmt: skip
    for t in args.threads:
        bandwidth[t].append(read_bandwidth(t, size=512 << 20, reps=3))
    load_after = os.getloadavg()

    isa = _native.isa()
    print(f"Decode GEMV of all 2B-4T ternary weights per token, ISA {isa} (1.6-bit kernel: "
          f"{_native.tq1_kernel()}); weights {nbytes['2-bit'] / 1e6:.1f} MB at 2 bits, "
          f"{nbytes['1.6-bit'] / 1e6:.1f} MB at 1.6 bits ({nbytes['1.6-bit'] / nbytes['2-bit']:.1%}); "
          f"{args.rounds} paired rounds x {args.tokens} tokens per layout; load average "
          f"{load_before[0]:.2f} before, {load_after[0]:.2f} after.")  # fmt: skip
    for t in args.threads:
        before, after = bandwidth[t]
        print(f"Read bandwidth, {t} thread(s): {before / 1e9:.1f} GB/s before, {after / 1e9:.1f} after.")  # fmt: skip
    for t in args.threads:
        c = ceilings[t]
        print(f"Kernels with the weights in L3, {t} thread(s): 2-bit {c['2-bit']['gweights_per_s']:.0f} "
              f"G weights/s ({c['2-bit']['packed_gb_per_s']:.1f} GB/s of its bytes), 1.6-bit "
              f"{c['1.6-bit']['gweights_per_s']:.0f} G weights/s ({c['1.6-bit']['packed_gb_per_s']:.1f} GB/s).")  # fmt: skip
    print()
    print("| threads | calls | 2-bit ms/token | 1.6-bit ms/token | 2-bit GB/s | 1.6-bit GB/s "
          "| 1.6-bit, 2-bit-equivalent GB/s | speed-up of 1.6-bit (median of rounds) | per round |")  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for run in runs:
        ms = run["median_ms"]
        gbs = {lay: nbytes[lay] / ms[lay] / 1e6 for lay in LAYOUTS}
        run["gb_per_s"] = gbs
        ratios = ", ".join(f"{p['ratio']:.2f}" for p in run["rounds"])
        print(f"| {run['threads']} | {run['mode']} | {ms['2-bit']:.2f} | {ms['1.6-bit']:.2f} | "
              f"{gbs['2-bit']:.1f} | {gbs['1.6-bit']:.1f} | "
              f"{nbytes['2-bit'] / ms['1.6-bit'] / 1e6:.1f} | {run['median_ratio']:.2f}× | {ratios} |")  # fmt: skip
    print("\nEvery round (read bandwidth probed just before it, at its thread count):\n")
    print("| threads | calls | round | first | load avg | read GB/s | 2-bit ms | 1.6-bit ms | 2-bit GB/s "
          "| speed-up of 1.6-bit |")  # fmt: skip
    print("|---:|---|---:|---|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        for p in run["rounds"]:
            print(f"| {run['threads']} | {run['mode']} | {p['round']} | {p['first']} | "
                  f"{p['load_avg']:.2f} | {p['read_bandwidth_bytes_per_s'] / 1e9:.1f} | "
                  f"{p['ms']['2-bit']:.2f} | {p['ms']['1.6-bit']:.2f} | "
                  f"{nbytes['2-bit'] / p['ms']['2-bit'] / 1e6:.1f} | {p['ratio']:.2f}× |")  # fmt: skip
    report = {
        "benchmark": "decode_gemv_layouts",
        "shape": "2b4t",
        "isa": isa,
        "tq1_kernel": _native.tq1_kernel(),
        "machine": platform.processor() or platform.machine(),
        "bytes": nbytes,
        "read_bandwidth_bytes_per_s": {str(t): v for t, v in bandwidth.items()},
        "cached_ceiling": {str(t): v for t, v in ceilings.items()},
        "load_avg_before": load_before,
        "load_avg_after": load_after,
        "rounds": args.rounds,
        "tokens_per_round": args.tokens,
        "runs": runs,
    }
    args.json.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
