"""The native extension under AddressSanitizer + UBSan (+ LeakSanitizer): every kernel on every
ISA this CPU runs, odd shapes, threads, the whole decoder step of two model variants (prefill,
batched steps over several cache slots, float16/int8/4-bit output layers, context overflow and
other refused steps), and bad inputs, with no sanitizer report.

The extension is built with -DBITNET158_SANITIZE=ON into build/asan (incremental after the first
run) and loaded by file path in a subprocess that preloads libasan, so the installed extension and
the package import machinery are not involved.

`make test-asan` also runs this file as a script: `python tests/native/test_sanitizers.py
PYTEST_ARGS...` runs those pytest files in one sanitized process, the package's `_native` replaced
by the sanitized build (the kernel, forward-pass and generation suites).
"""

import fcntl
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD = ROOT / "build" / "asan"

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which("cmake") is None,
    reason="needs Linux and cmake",
)

SCRIPT = textwrap.dedent(
    """
    import importlib.util, sys
    import numpy as np

    def load(name, path):
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    native = load("_native", sys.argv[1])
    packing = load("packing", sys.argv[2] + "/packing.py")
    quant = load("quant", sys.argv[2] + "/quant.py")
    rng = np.random.default_rng(0)

    for isa in native.available_isas():
        for threads in (1, 2):
            native.set_num_threads(threads)
            for n, k, t in [(1, 1, 1), (3, 100, 7), (4, 256, 2), (5, 300, 16), (130, 2560, 5),
                            (37, 700, 3), (4097, 256, 1)]:
                codes = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
                packed = packing.pack_ours(codes)
                x = rng.standard_normal((t, k)).astype(np.float32)
                x_q, s = quant.quantize_activations(x)
                q2, s2 = native.quantize_activations(x, isa=isa)
                assert (q2 == x_q).all() and (s2 == s).all(), (isa, n, k, t)
                acc = native.ternary_gemm_i32(x_q, packed, n, k, isa=isa)
                assert (acc == x_q.astype(np.int64) @ codes.T.astype(np.int64)).all()
                tq1 = native.ternary_gemm_tq1_i32(x_q, packing.pack_ours_tq1(codes), n, k, isa=isa)
                assert (tq1 == acc).all(), (isa, n, k, t)
                y = native.bitlinear(x, packed, 0.5, n, k, isa=isa)
                assert np.array_equal(y, quant.ternary_linear_reference(x, codes, 0.5))
            empty = native.bitlinear(np.zeros((0, 256), np.float32), packed, 1.0, 4097, 256)
            assert empty.shape == (0, 4097)
            nan = np.full((2, 33), np.nan, np.float32)
            assert (native.quantize_activations(nan, isa=isa)[0] == -128).all()
            for n in (1, 17, 33):
                f = rng.standard_normal(n).astype(np.float32)
                assert (native.float_to_half(f, isa=isa) == f.astype(np.float16).view(np.uint16)).all()

    # concurrent callers share the pool
    import threading
    codes = rng.integers(-1, 2, size=(300, 700)).astype(np.int8)
    packed = packing.pack_ours(codes)
    x = rng.standard_normal((5, 700)).astype(np.float32)
    want = quant.ternary_linear_reference(x, codes, 0.5)
    errors = []
    def hammer():
        for _ in range(20):
            if not np.array_equal(native.bitlinear(x, packed, 0.5, 300, 700), want):
                errors.append(1)
    native.set_num_threads(2)
    callers = [threading.Thread(target=hammer) for _ in range(3)]
    for c in callers:
        c.start()
    for c in callers:
        c.join()
    assert not errors

    # the whole decoder step: GQA + ReLU^2 + subln, and SiLU + inner norm + LayerNorm (OLMo);
    # f32 and f16 caches, prefill, batched decode at the last position, the int8 output layer
    def aligned_zeros(shape, dtype):
        size = int(np.prod(shape)) * np.dtype(dtype).itemsize
        raw = np.zeros(size + 64, np.uint8)
        off = -raw.ctypes.data % 64
        return raw[off : off + size].view(dtype).reshape(shape)

    H, I, NH, KVH, D, V, L, CTX = 64, 96, 4, 2, 16, 50, 2, 32  # CTX: two tiles of keys
    shapes = [(NH * D, H), (KVH * D, H), (KVH * D, H), (H, NH * D), (I, H), (I, H), (H, I)]
    i32 = lambda *v: np.array(v, np.int32)
    for relu2, subln, inner, layernorm, layout in [(True, True, False, False, "2bit"),
                                                   (False, False, True, True, "2bit"),
                                                   (True, True, False, False, "tq1")]:
        model = native.Model(
            hidden=H, inter=I, heads=NH, kv_heads=KVH, head_dim=D, vocab=V, layers=L,
            relu2=relu2, subln=subln, inner_norm=inner, layernorm=layernorm, eps=1e-5,
            inner_eps=1e-5, inv_freq=(1.0 / 10000 ** (np.arange(0, D, 2) / D)).astype(np.float32),
            layout=layout,
        )
        pack = packing.pack_ours_tq1 if layout == "tq1" else packing.pack_ours
        w = lambda n: (1 + 0.1 * rng.standard_normal(n)).astype(np.float32)
        for layer in range(L):
            packed = [pack(rng.integers(-1, 2, size=s).astype(np.int8)) for s in shapes]
            model.set_layer(layer, w(H), w(H), w(NH * D) if subln else None,
                            w(I) if subln else None, packed, [0.3] * 7)
        embed = (0.5 * rng.standard_normal((V, H))).astype(np.float16)
        model.set_embedding(embed, False)
        model.set_output(w(H), None, False)
        for head in ("float16", "int8", "q4"):
            if head == "int8":
                model.set_output_int8(*native.quantize_rows_int8(embed))
            elif head == "q4":
                model.set_output_q4(*native.quantize_rows_q4(embed))
            assert model.head_kind == head
            for isa in native.available_isas():
                for threads in (1, 2):
                    native.set_num_threads(threads)
                    for dtype in (np.float32, np.float16):
                        k = aligned_zeros((2, L, KVH, CTX, D), dtype)
                        v = aligned_zeros((2, L, KVH, CTX, D), dtype)
                        rows = np.arange(CTX, dtype=np.int64)
                        out = model.forward(i32(*range(1, CTX)), i32(*[0] * (CTX - 1)),
                                            i32(*range(CTX - 1)), k, v, rows[:-1], isa=isa)
                        out2 = model.forward(i32(3, 4), i32(1, 1), i32(0, 1), k, v,
                                             np.array([1], np.int64), isa=isa)
                        assert out.shape == (CTX - 1, V) and out2.shape == (1, V)
                        assert np.isfinite(out).all() and np.isfinite(out2).all()
                        # batched steps: a prompt chunk of slot 1 beside a decode in slot 0 (its
                        # last free position), then slot 1 filled up to CTX
                        out3 = model.forward(i32(7, 8, 9, 10), i32(0, 1, 1, 1),
                                             i32(CTX - 1, 2, 3, 4), k, v,
                                             np.array([0, 3], np.int64), isa=isa)
                        out4 = model.forward(i32(11, 12, 13), i32(1, 1, 1), i32(5, 6, 7), k, v,
                                             np.array([0, 1, 2], np.int64), isa=isa)
                        assert out3.shape == (2, V) and out4.shape == (3, V)
                        assert np.isfinite(out3).all() and np.isfinite(out4).all()
                        refused = [  # overflow, slot, position, lengths, rows: nothing written
                            (i32(5), i32(0), i32(CTX), rows[:1]),
                            (i32(5, 6), i32(1, 0), i32(CTX, 0), rows[:1]),
                            (i32(5), i32(2), i32(0), rows[:1]),
                            (i32(5), i32(-1), i32(0), rows[:1]),
                            (i32(5), i32(0), i32(-3), rows[:1]),
                            (i32(5, 6), i32(0), i32(0), rows[:1]),
                            (i32(5), i32(0), i32(0), np.array([1], np.int64)),
                            (i32(5), i32(0), i32(0), np.array([-1], np.int64)),
                            (i32(V), i32(0), i32(0), rows[:1]),
                            (i32(-1), i32(0), i32(0), rows[:1]),
                            (i32(5, 6), i32(1, 1), i32(3, 3), rows[:1]),
                        ]
                        before = k.copy(), v.copy()
                        for step in refused:
                            try:
                                model.forward(*step[:3], k, v, step[3], isa=isa)
                            except ValueError:
                                pass
                            else:
                                raise AssertionError(f"a bad step was accepted: {step}")
                        assert np.array_equal(k, before[0]) and np.array_equal(v, before[1])

    packed = packing.pack_ours(np.zeros((3, 300), np.int8))
    x = np.zeros((2, 300), np.float32)
    bad = [
        lambda: native.bitlinear(x.astype(np.float64), packed, 1.0, 3, 300),
        lambda: native.bitlinear(x, packed[:, :256], 1.0, 3, 300),
        lambda: native.bitlinear(x, packed, 1.0, 3, 301),
        lambda: native.bitlinear(x, packed, 1.0, 9, 300),
        lambda: native.bitlinear(x, packed, 1.0, 0, 300),
        lambda: native.bitlinear(x, packed, 1.0, 3, -5),
        lambda: native.bitlinear(x, packed, 1.0, 3, 300, isa="bogus"),
        lambda: native.ternary_gemm_i32(x.astype(np.int8)[:, ::2], packed, 3, 150),
        lambda: native.quantize_activations(x[0]),
        lambda: native.set_num_threads(0),
    ]
    for call in bad:
        try:
            call()
        except (TypeError, ValueError):
            pass
        else:
            raise AssertionError("bad input accepted")
    print("SANITIZED-OK")
    """
)


def build_sanitized() -> Path:
    BUILD.mkdir(parents=True, exist_ok=True)
    with open(BUILD / ".lock", "w") as lock:  # concurrent test runs share the build directory
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build()


def _build() -> Path:
    configure = [
        "cmake", "-S", str(ROOT), "-B", str(BUILD), "-DBITNET158_SANITIZE=ON",
        "-DCMAKE_BUILD_TYPE=Release", f"-DPython_EXECUTABLE={sys.executable}",
    ]  # fmt: skip
    if not (BUILD / "CMakeCache.txt").exists():
        subprocess.run(configure, check=True, capture_output=True, text=True, timeout=300)
    subprocess.run(
        ["cmake", "--build", str(BUILD), "-j", "2"],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    (module,) = BUILD.glob("_native*.so")
    return module


def runtime_library(name: str) -> str:
    cache = (BUILD / "CMakeCache.txt").read_text()
    compiler = next(
        line.split("=", 1)[1] for line in cache.splitlines()
        if line.startswith("CMAKE_CXX_COMPILER:")
    )  # fmt: skip
    path = subprocess.run(
        [compiler, f"-print-file-name={name}"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not os.path.isabs(path):
        pytest.skip(f"{compiler} does not ship {name}")
    return path


# Leaks LeakSanitizer must not report: objects the interpreter (and the tokenizers extension's
# type objects) still hold at exit. Allocation stacks are cut to the allocating function
# (malloc_context_size=2), so these match only memory that those libraries allocate themselves,
# never a leak of our extension's C++ code called from Python.
LEAK_SUPPRESSIONS = "leak:libpython3\nleak:tokenizers.abi3\n"

# Run in the sanitized process before pytest: the package's `_native` is the sanitized build, and
# the processes it starts (tests that spawn Python, cmake) run without the sanitizer preloaded.
PYTEST_BOOTSTRAP = textwrap.dedent(
    """
    import importlib.util, os, sys
    os.environ.pop("LD_PRELOAD")
    spec = importlib.util.spec_from_file_location("bitnet158._native", sys.argv[1])
    native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(native)
    sys.modules["bitnet158._native"] = native
    import pytest
    from bitnet158.engine import model
    code = pytest.main(sys.argv[2:])
    assert model._native is native and sys.modules["bitnet158._native"] is native
    sys.exit(code)
    """
)


def sanitizer_env() -> dict[str, str]:
    """The environment of a process that runs the sanitized extension."""
    suppressions = BUILD / "lsan.supp"
    suppressions.write_text(LEAK_SUPPRESSIONS)
    env = {
        **os.environ,
        # libstdc++ too: ASan resolves its __cxa_throw interceptor at start-up, before the
        # extension would load libstdc++ (else the first C++ exception aborts in a CHECK).
        "LD_PRELOAD": f"{runtime_library('libasan.so')}:{runtime_library('libstdc++.so')}",
        "ASAN_OPTIONS": "detect_leaks=1:malloc_context_size=2",
        "LSAN_OPTIONS": f"suppressions={suppressions}:print_suppressions=0",
        "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
        "PYTHONMALLOC": "malloc",  # every buffer gets redzones
        "OMP_NUM_THREADS": "2",
    }
    env.pop("BITNET158_ISA", None)
    return env


def assert_clean(result: subprocess.CompletedProcess) -> None:
    report = result.stdout + result.stderr
    assert result.returncode == 0, report[-4000:]
    for finding in ("AddressSanitizer", "LeakSanitizer", "runtime error"):
        assert finding not in report, report[-4000:]


def test_kernels_clean_under_asan_and_ubsan():
    module = build_sanitized()
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(module), str(ROOT / "src" / "bitnet158")],
        env=sanitizer_env(), capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert_clean(result)
    assert "SANITIZED-OK" in result.stdout


def test_leak_detection_reports_a_leak():
    """The leak check above can fail: memory lost by native code is reported."""
    build_sanitized()
    leak = "import ctypes; m = ctypes.CDLL(None).malloc; m.restype = ctypes.c_void_p; m(4096)"
    result = subprocess.run([sys.executable, "-c", leak], env=sanitizer_env(),
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0 and "detected memory leaks" in result.stderr
    assert "4096 byte(s) leaked in 1 allocation(s)" in result.stderr


def main(pytest_args: list[str]) -> int:
    """Run pytest on `pytest_args` in one process with the sanitized extension (make test-asan)."""
    module = build_sanitized()
    command = [sys.executable, "-c", PYTEST_BOOTSTRAP, str(module), "-p", "no:cacheprovider"]
    result = subprocess.run([*command, *pytest_args], env=sanitizer_env(), cwd=ROOT)
    return result.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
