"""The energy model: the paper's 71.4x, operation counts, and the RAPL counter reader."""

from __future__ import annotations

import pytest

from bitnet158.config import ModelConfig
from bitnet158.eval.energy import (
    ENERGY_PJ,
    EnergyCounter,
    energy_counter_status,
    forward_energy,
    forward_ops,
    matmul_energy_per_mac,
    matmul_ratio,
    projection_macs,
)
from bitnet158.formats.native import projection_shapes

CFG = ModelConfig(
    vocab_size=100, hidden_size=16, intermediate_size=24, num_layers=3, num_heads=4, num_kv_heads=2
)


def test_the_papers_71_4x_for_matrix_multiplication():
    # FP16 multiply (0.34 pJ) + add (0.16 pJ) against an INT8 add (0.007 pJ) at 7 nm
    assert matmul_energy_per_mac("fp16") == pytest.approx(0.50)
    assert matmul_energy_per_mac("ternary") == pytest.approx(0.007)
    assert round(matmul_ratio("7nm"), 1) == 71.4
    assert matmul_ratio("45nm") == pytest.approx((1.1 + 0.4) / 0.03)


def test_projection_macs_count_every_weight_once():
    per_layer = sum(n * k for n, k in projection_shapes(CFG).values())
    assert projection_macs(CFG) == per_layer * CFG.num_layers


def test_forward_ops_by_component():
    fp, tern = forward_ops(CFG, "fp16", context=10), forward_ops(CFG, "ternary", context=10)
    macs = projection_macs(CFG)
    assert fp["projections"].fp16_mul == fp["projections"].fp16_add == macs
    assert tern["projections"].int8_add == macs and tern["projections"].fp16_mul < macs / 3
    # attention: q.k and p.v over 10 positions for each head of each layer, the same in both
    assert fp["attention"] == tern["attention"]
    assert fp["attention"].fp16_mul == 2 * 4 * 4 * 10 * 3
    assert fp["output"].fp16_mul == 100 * 16 == tern["output"].fp16_mul


def test_forward_energy_totals_its_components():
    e = forward_energy(CFG, "ternary", context=10)
    assert e["total_j"] == pytest.approx(sum(e["components_j"].values()))
    assert e["total_j"] == pytest.approx(sum(e["operations_j"].values()))
    ops = e["operations"]
    want = sum(ops[k] * ENERGY_PJ["7nm"][k] for k in ops) * 1e-12
    assert e["total_j"] == pytest.approx(want)


def test_the_saving_grows_with_model_size():
    from bitnet158.eval.efficiency import SIZES, size_config

    ratios = []
    for size in SIZES:
        cfg = size_config(size)
        ratios.append(
            forward_energy(cfg, "fp16")["total_j"] / forward_energy(cfg, "ternary")["total_j"]
        )
    assert ratios == sorted(ratios) and ratios[-1] < matmul_ratio()


def _zone(root, name, value, limit=None):
    zone = root / name
    zone.mkdir(parents=True, exist_ok=True)
    (zone / "energy_uj").write_text(f"{value}\n")
    if limit is not None:
        (zone / "max_energy_range_uj").write_text(f"{limit}\n")
    return zone


def test_energy_counter_reads_package_zones_and_wraps(tmp_path):
    pkg0 = _zone(tmp_path, "intel-rapl:0", 1_000_000, limit=10_000_000)
    pkg1 = _zone(tmp_path, "intel-rapl:1", 9_500_000, limit=10_000_000)
    _zone(tmp_path, "intel-rapl:0:0", 5)  # a sub-zone (core) is inside package 0: not added
    assert energy_counter_status(tmp_path)["source"] == "powercap"
    with EnergyCounter(tmp_path) as e:
        (pkg0 / "energy_uj").write_text("3500000\n")  # +2.5 J
        (pkg1 / "energy_uj").write_text("500000\n")  # wrapped: +1.0 J
    assert e.joules == pytest.approx(3.5)


def test_no_counters_is_said_plainly(tmp_path):
    status = energy_counter_status(tmp_path / "missing")
    assert status["source"] in (None, "perf")
    if status["source"] is None:
        assert "does not exist" in status["reason"] and "no measured energy" in status["reason"]
    with EnergyCounter(tmp_path / "missing") as e:
        pass
    assert e.joules is None and e.seconds >= 0
