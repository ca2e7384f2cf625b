"""Arithmetic energy of a forward pass from operation counts, and measured energy (RAPL).

The BitNet b1.58 paper (Ma et al., "The Era of 1-bit LLMs", arXiv:2402.17764, §3 "Energy",
Figure 3) estimates the arithmetic energy of matrix multiplication with the per-operation
energies of [Hor14, ZZL22] at 7 nm: a full-precision matmul does one FP16 multiply and one FP16
add per multiply-accumulate, a ternary one (weights in {-1, 0, 1}, int8 activations) only an
INT8 add, hence 71.4x less (`matmul_ratio()`). The per-operation energies below are the table
the BitNet papers use (Wang et al., "BitNet: Scaling 1-bit Transformers for Large Language
Models", arXiv:2310.11453, Table 2, "ADD and MUL energy consumption [Hor14, ZZL22]"):
- [Hor14] M. Horowitz, "1.1 Computing's energy problem (and what we can do about it)",
  ISSCC 2014, pp. 10-14 (the 45 nm column);
- [ZZL22] Y. Zhang, Z. Zhang, L. Lew, "PokeBNN: A Binary Pursuit of Lightweight Accuracy",
  CVPR 2022 (the 7 nm column, scaled from [Hor14]).

`forward_energy` extends the count to a whole decode step, as the paper's Figure 3 (right)
does across model sizes: the ternary projections (INT8 adds; per-token activation
quantization and the dequantizing multiply per output in FP16), the attention products and
the output layer (FP16 in both models: BitNet keeps them in high precision).

Measured energy: `EnergyCounter` reads the RAPL package counters Linux exposes under
/sys/class/powercap (intel-rapl, also used for AMD Zen), or `perf stat -e power/energy-pkg/`.
Virtual machines usually expose neither; `energy_counter_status()` says which, if any, works.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import ModelConfig

# Energy per operation in picojoules: [Hor14] at 45 nm, [ZZL22] at 7 nm, as tabulated in
# arXiv:2310.11453 Table 2.
ENERGY_PJ: dict[str, dict[str, float]] = {
    "45nm": {
        "fp32_add": 0.9,
        "fp32_mul": 3.7,
        "fp16_add": 0.4,
        "fp16_mul": 1.1,
        "int8_add": 0.03,
        "int8_mul": 0.2,
    },
    "7nm": {
        "fp32_add": 0.38,
        "fp32_mul": 1.31,
        "fp16_add": 0.16,
        "fp16_mul": 0.34,
        "int8_add": 0.007,
        "int8_mul": 0.07,
    },
}
ENERGY_SOURCE = (
    "per-operation energies of [Hor14] Horowitz, ISSCC 2014 (45 nm) and [ZZL22] Zhang, Zhang & "
    "Lew, CVPR 2022 (7 nm), as tabulated in Wang et al., arXiv:2310.11453, Table 2; used by "
    "Ma et al., arXiv:2402.17764, Figure 3"
)
POWERCAP = Path("/sys/class/powercap")


def matmul_energy_per_mac(kind: str, node: str = "7nm") -> float:
    """pJ per multiply-accumulate of a matmul: "fp16" (FP16 mul + add) or "ternary" (INT8 add)."""
    e = ENERGY_PJ[node]
    if kind == "fp16":
        return e["fp16_mul"] + e["fp16_add"]
    if kind == "ternary":
        return e["int8_add"]
    raise ValueError(f"kind must be 'fp16' or 'ternary', got {kind!r}")


def matmul_ratio(node: str = "7nm") -> float:
    """How much less arithmetic energy a ternary matmul needs: 71.4x at 7 nm (the paper)."""
    return matmul_energy_per_mac("fp16", node) / matmul_energy_per_mac("ternary", node)


@dataclass
class OpCounts:
    """Arithmetic operations of one token's forward pass, by kind."""

    fp16_add: float = 0.0
    fp16_mul: float = 0.0
    int8_add: float = 0.0

    def joules(self, node: str = "7nm") -> float:
        e = ENERGY_PJ[node]
        return sum(getattr(self, k) * e[k] for k in ("fp16_add", "fp16_mul", "int8_add")) * 1e-12


def projection_macs(cfg: ModelConfig) -> int:
    """Multiply-accumulates of the seven projections of all layers, per token."""
    H, inter, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    per_layer = H * q + 2 * H * kv + q * H + 2 * H * inter + inter * H
    return per_layer * cfg.num_layers


def forward_ops(cfg: ModelConfig, kind: str, context: int = 512) -> dict[str, OpCounts]:
    """Operation counts of one decode step at `context` cached tokens, by component.

    Components: "projections" (the linear layers: FP16 MACs, or INT8 adds plus the per-token
    activation quantization and the dequantizing multiply), "attention" (q.k and p.v products,
    FP16 in both models), "output" (the vocabulary projection, FP16 in both).
    """
    if kind not in ("fp16", "ternary"):
        raise ValueError(f"kind must be 'fp16' or 'ternary', got {kind!r}")
    H, inter, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    macs = projection_macs(cfg)
    if kind == "fp16":
        projections = OpCounts(fp16_add=macs, fp16_mul=macs)
    else:
        # one INT8 add per weight (a zero weight is skipped by a kernel that can, not counted);
        # quantization: a max and a multiply per input element of each distinct input, and the
        # dequantizing multiply per output element
        inputs = (H + q + H + inter) * cfg.num_layers  # qkv, o, gate/up, down inputs
        outputs = (q + 2 * kv + H + 2 * inter + H) * cfg.num_layers
        projections = OpCounts(int8_add=macs, fp16_add=inputs, fp16_mul=inputs + outputs)
    attn_macs = 2 * cfg.num_heads * cfg.head_dim * context * cfg.num_layers
    out_macs = cfg.vocab_size * H
    return {
        "projections": projections,
        "attention": OpCounts(fp16_add=attn_macs, fp16_mul=attn_macs),
        "output": OpCounts(fp16_add=out_macs, fp16_mul=out_macs),
    }


def forward_energy(cfg: ModelConfig, kind: str, context: int = 512, node: str = "7nm") -> dict:
    """Joules per token of one decode step, by component and by operation kind."""
    ops = forward_ops(cfg, kind, context)
    total = OpCounts(
        **{
            k: sum(getattr(o, k) for o in ops.values())
            for k in ("fp16_add", "fp16_mul", "int8_add")
        }
    )
    e = ENERGY_PJ[node]
    return {
        "node": node,
        "context": context,
        "components_j": {name: o.joules(node) for name, o in ops.items()},
        "operations_j": {k: getattr(total, k) * e[k] * 1e-12 for k in asdict(total)},
        "operations": asdict(total),
        "total_j": total.joules(node),
    }


# --- measured energy ----------------------------------------------------------------------------


def rapl_zones(root: Path = POWERCAP) -> list[Path]:
    """Readable top-level RAPL package counters (energy_uj files) under `root`."""
    if not root.is_dir():
        return []
    zones = []
    for zone in sorted(root.glob("*rapl:*")):
        counter = zone / "energy_uj"
        if zone.name.count(":") == 1 and counter.is_file() and os.access(counter, os.R_OK):
            zones.append(zone)
    return zones


def _perf_has_energy() -> bool:
    perf = shutil.which("perf")
    if not perf:
        return False
    try:
        out = subprocess.run([perf, "list", "power"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return "energy-pkg" in out.stdout


def energy_counter_status(root: Path = POWERCAP) -> dict:
    """Which energy counter this machine exposes: {"source": "powercap" | "perf" | None, ...}."""
    zones = rapl_zones(root)
    if zones:
        return {"source": "powercap", "zones": [str(z) for z in zones]}
    if _perf_has_energy():
        return {"source": "perf", "event": "power/energy-pkg/"}
    why = []
    why.append(
        f"{root} does not exist" if not root.is_dir() else f"{root} has no readable RAPL counter"
    )
    why.append(
        "perf is not installed"
        if not shutil.which("perf")
        else "perf lists no power/energy-pkg event"
    )
    return {
        "source": None,
        "reason": "; ".join(why) + " (usual in a virtual machine): no measured energy",
    }


class EnergyCounter:
    """Package energy over a block of code, from the powercap RAPL counters.

    with EnergyCounter() as e: work()
    e.joules  # None when the machine exposes no counter

    The counters are package-wide: other processes' work is included.
    """

    def __init__(self, root: Path = POWERCAP) -> None:
        self.zones = rapl_zones(root)
        self.joules: float | None = None
        self.seconds = 0.0

    def _read(self) -> list[tuple[int, int]]:
        out = []
        for zone in self.zones:
            value = int((zone / "energy_uj").read_text())
            limit_file = zone / "max_energy_range_uj"
            limit = int(limit_file.read_text()) if limit_file.is_file() else 2**32
            out.append((value, limit))
        return out

    def __enter__(self) -> EnergyCounter:
        self._start = self._read()
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
        if not self.zones:
            return
        end = self._read()
        total = 0
        for (a, limit), (b, _) in zip(self._start, end, strict=True):
            total += b - a if b >= a else b + limit - a  # the counter wrapped around
        self.joules = total * 1e-6
