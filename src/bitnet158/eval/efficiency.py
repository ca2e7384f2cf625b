"""The paper's cost comparisons on this CPU: BitNet b1.58 against an fp16 LLaMA of the same shape.

`bitnet158 bench --report DIR` writes, for the paper's sizes (700M, 1.3B, 3B, 3.9B, and 7B,
13B, 70B as far as memory allows; random weights, which cost what trained ones do):
- Table 1: weight memory, peak RSS, decode latency per token and prefill throughput of our
  engine (2-bit packed ternary layers, F16 embedding/output, F16 KV cache) and of llama.cpp
  running the F16 LLaMA twin, with the ratios;
- Table 3: the largest batch of 512-token sequences that fits a memory budget, and its decode
  throughput (the budget by default lets the fp16 model hold 16 sequences, as in the paper);
- Figure 2 (decode latency and memory against size) and Figure 3 (arithmetic energy per token
  at 7 nm, `eval.energy`) as PNG files, plus the measured RAPL energy where the machine has it;
- efficiency.md (the tables) and efficiency.json (every number) side by side.

Single-sequence prefill/decode timing and peak RSS are `bitnet158.bench`'s workers (the
llama-bench method, one subprocess per engine); the batched decode workers are here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from ..config import ModelConfig
from .energy import (
    ENERGY_PJ,
    ENERGY_SOURCE,
    EnergyCounter,
    energy_counter_status,
    forward_energy,
    forward_ops,
    matmul_ratio,
)

GiB = 1 << 30
# The paper's model sizes. 700M, 1.3B and 3B are 1bitLLM's reproductions of them
# (reference/checkpoints_and_training.md); 3.9B is the 3B shape with 32 layers [UNVERIFIED];
# 7B, 13B and 70B are LLaMA(-2)'s shapes, which the paper's Figure 2 extends to. Vocabulary:
# the LLaMA tokenizer's 32000.
SIZES: dict[str, dict] = {
    "700M": dict(hidden_size=1536, intermediate_size=4096, num_layers=24, num_heads=16),
    "1.3B": dict(hidden_size=2048, intermediate_size=5460, num_layers=24, num_heads=32),
    "3B": dict(hidden_size=3200, intermediate_size=8640, num_layers=26, num_heads=32),
    "3.9B": dict(hidden_size=3200, intermediate_size=8640, num_layers=32, num_heads=32),
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32),
    "13B": dict(hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40),
    "70B": dict(
        hidden_size=8192, intermediate_size=28672, num_layers=80, num_heads=64, num_kv_heads=8
    ),
}
DEFAULT_SIZES = ("700M", "1.3B", "3B", "3.9B", "7B", "13B", "70B")
MODELS = ("BitNet b1.58", "LLaMA fp16")


def size_config(size: str) -> ModelConfig:
    """The ModelConfig of one of the paper's sizes (llama-b158: SwiGLU, subln, tied)."""
    fields = dict(SIZES[size])
    fields.setdefault("num_kv_heads", fields["num_heads"])
    return ModelConfig(
        vocab_size=32000,
        family="llama-b158",
        hidden_act="silu",
        subln=True,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
        bos_token_id=0,
        eos_token_ids=[1],
        **fields,
    )


def parameter_count(cfg: ModelConfig) -> int:
    """All parameters of the model (tied embedding counted once)."""
    from .energy import projection_macs

    norms = cfg.num_layers * (2 * cfg.hidden_size + cfg.q_size + cfg.intermediate_size)
    return projection_macs(cfg) + cfg.vocab_size * cfg.hidden_size + norms + cfg.hidden_size


def weight_bytes(cfg: ModelConfig, model: str) -> int:
    """Bytes of the weights as the measured files hold them: BitNet b1.58 (our 2-bit packed
    layout, F16 embedding, float32 norms and scales) or LLaMA fp16 (F16 matrices, float32
    norms, no sub-norms)."""
    from ..formats.native import projection_shapes
    from ..packing import ours_packed_shape
    from .energy import projection_macs

    H, embedding = cfg.hidden_size, 2 * cfg.vocab_size * cfg.hidden_size
    if model == "LLaMA fp16":
        return 2 * projection_macs(cfg) + embedding + 4 * (2 * H * cfg.num_layers + H)
    packed = sum(math.prod(ours_packed_shape(n, k)) for n, k in projection_shapes(cfg).values())
    norms = 2 * H + cfg.q_size + cfg.intermediate_size
    scales = len(projection_shapes(cfg))
    return cfg.num_layers * (packed + 4 * (norms + scales)) + 4 * H + embedding


def kv_bytes_per_token(cfg: ModelConfig, element_bytes: int = 2) -> int:
    """KV-cache bytes one token takes (keys and values of every layer)."""
    return 2 * cfg.num_layers * cfg.kv_size * element_bytes


def max_batch(budget: float, weights: float, overhead: float, kv_per_sequence: float) -> int:
    """The most sequences whose KV caches fit in `budget` bytes next to the weights."""
    return max(0, int((budget - weights - overhead) // kv_per_sequence))


# --- random fp16 LLaMA twins as llama.cpp GGUF ------------------------------------------------------


def write_fp16_llama_gguf(cfg: ModelConfig, path: Path, tokenizer_json: str, seed: int = 0) -> Path:
    """A llama.cpp `llama` GGUF of `cfg`'s shape with random F16 weights (std 0.02, unit
    norms), written tensor by tensor so that memory stays at one tensor."""
    import gguf

    from ..formats.gguf import write_metadata
    from ..formats.gguf_vocab import vocab_from_tokenizer_json

    rng = np.random.default_rng(seed)
    H, inter, q, kv = cfg.hidden_size, cfg.intermediate_size, cfg.q_size, cfg.kv_size
    shapes: list[tuple[str, tuple[int, ...]]] = [("token_embd.weight", (cfg.vocab_size, H))]
    shapes.append(("output_norm.weight", (H,)))
    for i in range(cfg.num_layers):
        b = f"blk.{i}."
        shapes += [
            (b + "attn_norm.weight", (H,)),
            (b + "attn_q.weight", (q, H)),
            (b + "attn_k.weight", (kv, H)),
            (b + "attn_v.weight", (kv, H)),
            (b + "attn_output.weight", (H, q)),
            (b + "ffn_norm.weight", (H,)),
            (b + "ffn_gate.weight", (inter, H)),
            (b + "ffn_up.weight", (inter, H)),
            (b + "ffn_down.weight", (H, inter)),
        ]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    ckpt = SimpleNamespace(path=path, chat_template=None)
    vocab = vocab_from_tokenizer_json(tokenizer_json, cfg.vocab_size)
    write_metadata(w, gguf, cfg, ckpt, vocab, file_type=1)  # 1: llama_ftype MOSTLY_F16
    for name, shape in shapes:
        dtype = np.float32 if len(shape) == 1 else np.float16
        w.add_tensor_info(name, shape, np.dtype(dtype), math.prod(shape) * np.dtype(dtype).itemsize)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    for _, shape in shapes:  # in the order of the tensor infos
        if len(shape) == 1:
            w.write_tensor_data(np.ones(shape, np.float32))
            continue
        value = np.empty(shape, np.float16)
        for r0 in range(0, shape[0], 1024):
            block = rng.standard_normal((min(1024, shape[0] - r0), shape[1]), dtype=np.float32)
            value[r0 : r0 + 1024] = block * np.float32(0.02)
        w.write_tensor_data(value)
    w.close()
    os.replace(tmp, path)
    return path


# --- workers: each runs in a fresh process (see run_isolated) --------------------------------------


def worker_bitnet158_batched(args: dict) -> dict:
    """Decode throughput of `batch` sequences of `seq` cached tokens on our engine: one
    sequence is prefilled, its KV cache copied to every slot, then batched decode steps."""
    from .. import _native
    from ..engine.model import EngineModel
    from ..formats.native import load_native

    _native.set_num_threads(args["threads"])
    ckpt = load_native(args["path"])
    engine = EngineModel(ckpt.config, ckpt.tensors, lm_head="exact", layout=ckpt.layout)
    B, seq, steps = args["batch"], args["seq"], args["steps"]
    cache = engine.new_cache(seq + steps + 1, "float16", slots=B)
    rng = np.random.default_rng(0)
    engine.forward(rng.integers(0, ckpt.config.vocab_size, size=seq), cache, last_only=True)
    cache.k[1:] = cache.k[0]
    cache.v[1:] = cache.v[0]
    cache.lengths[:] = seq
    slots = np.arange(B)
    tokens = engine.decode(rng.integers(0, ckpt.config.vocab_size, size=B), cache, slots).argmax(-1)
    with EnergyCounter() as energy:
        for _ in range(steps):
            tokens = engine.decode(tokens, cache, slots).argmax(-1)
    return dict(
        batch=B,
        seconds=energy.seconds,
        tokens_per_second=B * steps / energy.seconds,
        energy_j=energy.joules,
        kv_bytes=cache.nbytes,
    )


def worker_llama_cpp_batched(args: dict) -> dict:
    """The same through llama.cpp's C API: a unified KV cache, the prefilled sequence copied
    to every other sequence id (`llama_memory_seq_cp`), then one llama_decode per step."""
    import llama_cpp as L

    B, seq, steps = args["batch"], args["seq"], args["steps"]
    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    model = L.llama_model_load_from_file(args["path"].encode(), mparams)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {args['path']}")
    cparams = L.llama_context_default_params()
    cparams.n_ctx = seq + B * (steps + 1) + 256
    cparams.n_batch = cparams.n_ubatch = max(512, B)
    cparams.n_seq_max = B
    cparams.kv_unified = True
    cparams.n_threads = cparams.n_threads_batch = args["threads"]
    ctx = L.llama_init_from_model(model, cparams)
    if not ctx:
        raise RuntimeError("llama.cpp could not create the context")
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(max(seq, B), 0, 1)
    rng = np.random.default_rng(0)

    def run(tokens, positions, seq_ids, logits_of_all: bool) -> list[int]:
        """One llama_decode; the argmax of each token's logits (all, or the last only)."""
        n = len(tokens)
        batch.n_tokens = n
        for i, (t, p, s) in enumerate(zip(tokens, positions, seq_ids, strict=True)):
            batch.token[i], batch.pos[i], batch.n_seq_id[i] = int(t), int(p), 1
            batch.seq_id[i][0] = int(s)
            batch.logits[i] = logits_of_all or i == n - 1
        if L.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        rows = range(n) if logits_of_all else [n - 1]
        return [
            int(np.argmax(np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(vocab,))))
            for i in rows
        ]

    prompt = rng.integers(0, vocab, size=seq)
    for c0 in range(0, seq, cparams.n_batch):
        chunk = prompt[c0 : c0 + cparams.n_batch]
        run(chunk, range(c0, c0 + len(chunk)), [0] * len(chunk), False)
    memory = L.llama_get_memory(ctx)
    for s in range(1, B):
        L.llama_memory_seq_cp(memory, 0, s, -1, -1)
    tokens = run(rng.integers(0, vocab, size=B), [seq] * B, range(B), True)
    with EnergyCounter() as energy:
        for step in range(steps):
            tokens = run(tokens, [seq + 1 + step] * B, range(B), True)
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return dict(
        batch=B,
        seconds=energy.seconds,
        tokens_per_second=B * steps / energy.seconds,
        energy_j=energy.joules,
    )


def run_isolated(function: str, args: dict, timeout: float = 1800, env: dict | None = None) -> dict:
    """Run "module:function"(args) in a fresh Python process; its JSON result plus `vm_hwm`,
    the process's peak resident memory, or {"error": ...}.

    VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a child started
    from a large parent would report the parent's peak.
    """
    module, name = function.split(":")
    code = (
        "import importlib, json, sys; m = importlib.import_module(sys.argv[1]); "
        "r = getattr(m, sys.argv[2])(json.loads(sys.argv[3])); "
        "hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')]; "
        "r['vm_hwm'] = int(hwm[0].split()[1]) * 1024 if hwm else None; "
        "print('RESULT' + json.dumps(r))"
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, module, name, json.dumps(args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=None if env is None else {**os.environ, **env},
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " / ".join(tail) or f"exit status {proc.returncode}"}


# llama.cpp's OpenMP threads spin while they wait; on a shared 2-core machine a descheduled
# spinner stalls every step (measured: 1.3 instead of 152 tokens/s decoding a small model).
LLAMA_CPP_ENV = {"OMP_WAIT_POLICY": "passive"}


# --- the report ----------------------------------------------------------------------------------


@dataclasses.dataclass
class ReportOptions:
    """What `bench --report` measures; every field is a command-line option."""

    sizes: tuple[str, ...] = DEFAULT_SIZES
    threads: int | None = None  # default: all cores this process may use
    prompt: int = 512  # prefill tokens
    decode: int = 64  # decode tokens (latency = their mean time)
    reps: int = 2  # repetitions, the fastest counts
    memory_limit: float | None = None  # bytes a measured process may use (default 70 % of free)
    budget: float | None = None  # Table 3 budget in bytes (default: fp16 model + 16 sequences)
    throughput_size: str | None = None  # Table 3's size (default: the largest that fits)
    batch_seq: int = 512  # tokens per sequence in Table 3, as the paper
    batch_steps: int = 8  # batched decode steps timed
    max_batch: int = 256  # the most sequences measured (llama.cpp allows 256)
    fp16: bool = True  # measure the fp16 LLaMA twin
    workdir: Path | None = None  # where the random models are written
    keep_models: bool = False
    timeout: float = 1800  # seconds per measuring process


def available_memory() -> int:
    """MemAvailable from /proc/meminfo, in bytes (0 when unknown)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(opts: ReportOptions, log: Callable[[str], None] = print) -> dict:
    """Build the models, run every measurement, return all results (see `write_report`)."""
    threads = opts.threads or len(os.sched_getaffinity(0))
    limit = opts.memory_limit or 0.7 * available_memory()
    workdir = opts.workdir or Path(tempfile.gettempdir()) / "bitnet158-report"
    workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "threads": threads,
            "memory_available_gib": available_memory() / GiB,
            "memory_limit_gib": limit / GiB,
            "load_average_start": os.getloadavg()[0],
        },
        "settings": {
            "prompt": opts.prompt,
            "decode": opts.decode,
            "reps": opts.reps,
            "kv_cache": "F16 (both engines)",
            "peak_rss": "VmHWM of the measuring process (weights are memory-mapped and count "
            "once touched)",
            "llama_cpp_env": LLAMA_CPP_ENV,
            "energy_context": opts.batch_seq,
            "bitnet": "bitnet158 engine: 2-bit packed ternary layers, F16 embedding and output layer",
            "fp16": "llama.cpp (llama-cpp-python) F16 GGUF of the same shape",
        },
        "energy_counters": energy_counter_status(),
        "sizes": {},
        "skipped": [],
    }
    fp16_error = None
    if opts.fp16:
        try:
            import llama_cpp  # noqa: F401
        except ImportError as exc:
            fp16_error = f"llama-cpp-python is not installed ({exc}): no fp16 LLaMA measured"
            results["skipped"].append(fp16_error)

    for size in opts.sizes:
        cfg = size_config(size)
        entry: dict = {
            "config": cfg.to_dict(),
            "parameters": parameter_count(cfg),
            "energy": {
                "BitNet b1.58": forward_energy(cfg, "ternary", opts.batch_seq),
                "LLaMA fp16": forward_energy(cfg, "fp16", opts.batch_seq),
            },
            "runs": {},
        }
        results["sizes"][size] = entry
        kv = kv_bytes_per_token(cfg) * (opts.prompt + opts.decode)
        for model in MODELS:
            weights = weight_bytes(cfg, model)
            run: dict = {"weight_bytes": weights}
            entry["runs"][model] = run
            need = weights * 2.2 if model == "BitNet b1.58" else weights * 1.1  # + writing it
            need += kv + 0.5 * GiB
            if model == "LLaMA fp16" and (not opts.fp16 or fp16_error):
                run["error"] = fp16_error or "not requested (--no-peers)"
                continue
            if need > limit:
                run["error"] = (
                    f"needs about {need / GiB:.1f} GiB, more than the {limit / GiB:.1f} GiB "
                    "memory limit of this run"
                )
                results["skipped"].append(f"{model} {size}: {run['error']}")
                log(f"[{size}] {model}: skipped ({run['error']})")
                continue
            path = _model_file(cfg, size, model, workdir, log)
            run["file_bytes"] = path.stat().st_size
            args = dict(path=str(path), threads=threads, prompt=opts.prompt,
                        decode=opts.decode, reps=opts.reps)  # fmt: skip
            log(f"[{size}] {model}: prefill {opts.prompt}, decode {opts.decode} ...")
            if model == "BitNet b1.58":
                res = run_isolated(
                    "bitnet158.bench:worker_bitnet158",
                    dict(args, lm_head="exact", kv_dtype="float16"),
                    opts.timeout,
                )
            else:
                res = run_isolated(
                    "bitnet158.bench:worker_llama_cpp",
                    dict(args, flash_attn=False),
                    opts.timeout,
                    LLAMA_CPP_ENV,
                )
            run.update(res)
            if res.get("vm_hwm"):
                run["peak_rss"] = res["vm_hwm"]
            if "decode_tps" in res:
                run["latency_ms"] = 1000 / res["decode_tps"]
            log(f"    {json.dumps(run)}")
            if model == "LLaMA fp16" and not opts.keep_models:
                path.unlink(missing_ok=True)

    results["throughput"] = _measure_batched(opts, results, threads, limit, workdir, log)
    results["machine"]["load_average_end"] = os.getloadavg()[0]
    if not opts.keep_models:
        for f in workdir.glob("*.gguf"):
            f.unlink()
    return results


def _model_file(cfg: ModelConfig, size: str, model: str, workdir: Path, log) -> Path:
    """Our random BitNet file or the fp16 LLaMA GGUF of a size (written once, reused)."""
    from ..bench import write_random_model
    from ..formats.native import load_native

    ours = workdir / f"bitnet-{size}.safetensors"
    if not ours.exists():
        log(f"[{size}] writing a random BitNet b1.58 model: {ours}")
        write_random_model(cfg, ours)
    if model == "BitNet b1.58":
        return ours
    gguf_path = workdir / f"llama-f16-{size}.gguf"
    if not gguf_path.exists():
        log(f"[{size}] writing a random fp16 LLaMA GGUF: {gguf_path}")
        write_fp16_llama_gguf(cfg, gguf_path, load_native(ours).tokenizer_json)
    return gguf_path


def batch_plan(size: str, runs: dict, opts: ReportOptions) -> dict:
    """Table 3's numbers before measuring: budget, max batch and the memory each run needs.

    A model's runtime overhead (scratch, runtime, interpreter) is what its single-sequence run
    used beyond weights and KV cache; the default budget holds the fp16 model and 16 sequences.
    """
    cfg = size_config(size)
    per_token = kv_bytes_per_token(cfg)
    per_seq = per_token * opts.batch_seq
    kv_single = per_token * (opts.prompt + opts.decode)
    overhead = {
        m: max(0.0, runs[m]["peak_rss"] - runs[m]["weight_bytes"] - kv_single) for m in MODELS
    }
    budget = opts.budget or (
        runs["LLaMA fp16"]["weight_bytes"] + overhead["LLaMA fp16"] + 16 * per_seq
    )
    plan: dict = {"size": size, "budget_bytes": budget, "sequence_tokens": opts.batch_seq,
                  "kv_bytes_per_sequence": per_seq, "models": {}}  # fmt: skip
    for model in MODELS:
        fit = max_batch(budget, runs[model]["weight_bytes"], overhead[model], per_seq)
        B = min(fit, opts.max_batch)
        # our engine holds B full caches; llama.cpp's sequences share the copied prompt's cells
        cells = B * (opts.batch_seq + opts.batch_steps + 1)
        if model == "LLaMA fp16":
            cells = opts.batch_seq + B * (opts.batch_steps + 1) + 256
        need = runs[model]["weight_bytes"] + overhead[model] + cells * per_token
        plan["models"][model] = dict(
            max_batch=fit, measured_batch=B, overhead_bytes=overhead[model], run_bytes=need
        )
    return plan


def _measure_batched(opts, results, threads, limit, workdir, log) -> dict:
    """Table 3 at the largest size whose batched runs fit the memory limit (or --batch-size)."""
    measured = [
        s for s, e in results["sizes"].items() if all("latency_ms" in e["runs"][m] for m in MODELS)
    ]
    candidates = [opts.throughput_size] if opts.throughput_size else measured[::-1]
    plan = None
    for size in candidates:
        if size not in measured:
            continue
        plan = batch_plan(size, results["sizes"][size]["runs"], opts)
        if all(p["run_bytes"] <= limit for p in plan["models"].values()):
            break
        log(f"Table 3: {size} needs more than the {limit / GiB:.1f} GiB memory limit")
        plan = None
    if plan is None:
        reason = (
            "no size with both models measured whose batched runs fit the memory limit "
            f"({limit / GiB:.1f} GiB)"
        )
        log(f"Table 3: skipped, {reason}")
        return {"error": reason}
    size, cfg = plan["size"], size_config(plan["size"])
    for model, entry in plan["models"].items():
        B = entry["measured_batch"]
        if B < 1:
            entry["error"] = "not even one sequence fits the budget"
            continue
        path = _model_file(cfg, size, model, workdir, log)
        args = dict(path=str(path), threads=threads, batch=B, seq=opts.batch_seq,
                    steps=opts.batch_steps)  # fmt: skip
        log(f"[{size}] {model}: batched decode, {B} sequences of {opts.batch_seq} tokens ...")
        worker = (
            "worker_bitnet158_batched" if model == "BitNet b1.58" else "worker_llama_cpp_batched"
        )
        env = LLAMA_CPP_ENV if model == "LLaMA fp16" else None
        entry.update(run_isolated(f"bitnet158.eval.efficiency:{worker}", args, opts.timeout, env))
        if entry.get("vm_hwm"):
            entry["peak_rss"] = entry["vm_hwm"]
        log(f"    {json.dumps(entry)}")
    return plan


# --- tables and plots -----------------------------------------------------------------------------


def _ratio(base: float | None, value: float | None, higher_is_better: bool = False) -> str:
    if not base or not value:
        return ""
    return f" ({(value / base if higher_is_better else base / value):.2f}x)"


def markdown(results: dict) -> str:
    """Tables 1 and 3 and the energy estimate as markdown, ratios against LLaMA fp16."""
    m = results["machine"]
    s = results["settings"]
    lines = [
        f"Measured on {m['processor']} with {m['threads']} thread(s) "
        f"({m['memory_available_gib']:.1f} GiB memory available; 1-minute load average "
        f"{m['load_average_start']:.1f} at the start, {m.get('load_average_end', 0):.1f} at the "
        "end: other work shared the machine); random weights. "
        f"BitNet b1.58: {s['bitnet']}. LLaMA fp16: {s['fp16']}. KV cache {s['kv_cache']}. "
        f"Decode latency: mean time per token over {s['decode']} tokens from an empty context; "
        f"prefill: {s['prompt']} tokens; the fastest of {s['reps']} runs. Ratios (in brackets) "
        "are LLaMA / BitNet, as in the paper's Table 1.",
        "",
        "**Table 1 analogue: memory and latency**",
        "",
        "| Models | Size | Weights (GB) | Peak RSS (GB) | Decode latency (ms/token) | Prefill (tokens/s) |",
        "|---|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    for size, e in results["sizes"].items():
        base = e["runs"]["LLaMA fp16"]
        for model in ("LLaMA fp16", "BitNet b1.58"):
            r = e["runs"][model]
            if "error" in r and "weight_bytes" in r and "latency_ms" not in r:
                lines.append(
                    f"| {model} | {size} | {r['weight_bytes'] / 1e9:.2f} | — | — | — |"
                    if model == "LLaMA fp16"
                    else f"| {model} | {size} | {r['weight_bytes'] / 1e9:.2f}"
                    f"{_ratio(base['weight_bytes'], r['weight_bytes'])} | — | — | — |"
                )
                continue
            lines.append(
                f"| {model} | {size} "
                f"| {r['weight_bytes'] / 1e9:.2f}{_ratio(base.get('weight_bytes'), r['weight_bytes'])} "
                f"| {r['peak_rss'] / 1e9:.2f}{_ratio(base.get('peak_rss'), r['peak_rss'])} "
                f"| {r['latency_ms']:.1f}{_ratio(base.get('latency_ms'), r['latency_ms'])} "
                f"| {r['prefill_tps']:.1f}{_ratio(base.get('prefill_tps'), r['prefill_tps'], True)} |"
            )
    not_run = [
        f"{model} {size}: {e['runs'][model]['error']}"
        for size, e in results["sizes"].items()
        for model in MODELS
        if "error" in e["runs"][model]
    ]
    if not_run:
        lines += ["", "Not measured: " + "; ".join(not_run) + "."]

    t = results.get("throughput") or {}
    lines += ["", "**Table 3 analogue: the largest batch within a memory budget**", ""]
    if "error" in t:
        lines.append(f"Not measured: {t['error']}.")
    else:
        lines += [
            f"Size {t['size']}, sequences of {t['sequence_tokens']} tokens "
            f"({t['kv_bytes_per_sequence'] / 2**20:.0f} MiB of F16 KV cache each), budget "
            f"{t['budget_bytes'] / GiB:.2f} GiB = weights + the runtime's own overhead (measured "
            "above) + the KV caches. Each batch decodes after a prefilled sequence is copied to "
            "every slot.",
            "",
            "| Models | Size | Max batch size | Measured batch | Throughput (tokens/s) |",
            "|---|---|---:|---:|---:|",
        ]
        base = t["models"]["LLaMA fp16"]
        for model in ("LLaMA fp16", "BitNet b1.58"):
            r = t["models"][model]
            tps = r.get("tokens_per_second")
            lines.append(
                f"| {model} | {t['size']} | {r['max_batch']}{_ratio(base['max_batch'], r['max_batch'], True)} "
                f"| {r['measured_batch']} | "
                + (
                    f"{tps:.1f}{_ratio(base.get('tokens_per_second'), tps, True)} |"
                    if tps
                    else f"— ({r.get('error', 'not run')}) |"
                )
            )

    lines += [
        "",
        "**Energy (Figure 3 analogue): arithmetic energy per token at 7 nm**",
        "",
        f"Matrix multiplication alone: FP16 multiply + add against an INT8 add per "
        f"multiply-accumulate, {matmul_ratio('7nm'):.1f}x less energy for BitNet b1.58 (the "
        f"paper's 71.4x). A whole decode step at {s['energy_context']} cached tokens, "
        "counting the activation quantization and the FP16 attention and output layer of both "
        f"models ({ENERGY_SOURCE}):",
        "",
        "| Size | LLaMA fp16 (mJ/token) | BitNet b1.58 (mJ/token) | ratio | BitNet projections share |",
        "|---|---:|---:|---:|---:|",
    ]  # fmt: skip
    for size, e in results["sizes"].items():
        fp, bn = e["energy"]["LLaMA fp16"], e["energy"]["BitNet b1.58"]
        share = bn["components_j"]["projections"] / bn["total_j"]
        lines.append(
            f"| {size} | {fp['total_j'] * 1e3:.3f} | {bn['total_j'] * 1e3:.4f} "
            f"| {fp['total_j'] / bn['total_j']:.1f}x | {100 * share:.0f} % |"
        )
    counters = results["energy_counters"]
    lines.append("")
    if counters["source"] is None:
        lines.append(f"Measured energy: none. {counters['reason']}.")
    else:
        joules = {
            model: r.get("energy_j")
            for model, r in (results.get("throughput") or {}).get("models", {}).items()
        }
        lines.append(f"Measured energy ({counters['source']}): " + ", ".join(
            f"{model} {j:.1f} J over the batched decode" if j is not None else f"{model} not measured"
            for model, j in joules.items()
        ) + ".")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(results: dict, out_dir: Path) -> list[Path]:
    """Figure 2 (decode latency, memory against size) and Figure 3 (energy) as PNG files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = list(results["sizes"])
    params = {s: results["sizes"][s]["parameters"] / 1e9 for s in sizes}
    colors = {"LLaMA fp16": "tab:blue", "BitNet b1.58": "tab:orange"}
    written = []
    for key, label, name, scale in (
        ("latency_ms", "decode latency (ms / token)", "figure2_latency.png", 1.0),
        ("peak_rss", "peak RSS (GB)", "figure2_memory.png", 1e-9),
    ):
        fig, ax = plt.subplots(figsize=(6, 4))
        for model in MODELS:
            points = [
                (params[s], results["sizes"][s]["runs"][model][key] * scale)
                for s in sizes
                if key in results["sizes"][s]["runs"][model]
            ]
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, "o-", color=colors[model], label=model)
        for s in sizes:  # the ratio above each pair measured at one size
            runs = results["sizes"][s]["runs"]
            if all(key in runs[m] for m in MODELS):
                ratio = runs["LLaMA fp16"][key] / runs["BitNet b1.58"][key]
                y = max(runs[m][key] for m in MODELS) * scale
                ax.annotate(f"{ratio:.2f}x", (params[s], y), textcoords="offset points",
                            xytext=(0, 6), ha="center", fontsize=8)  # fmt: skip
        ax.set_xscale("log")
        shown = [s for s in sizes if key in results["sizes"][s]["runs"]["BitNet b1.58"]]
        ax.set_xticks([params[s] for s in shown], shown, rotation=45)
        ax.minorticks_off()
        ax.set_xlabel("model size")
        ax.set_ylabel(label)
        ax.set_title(
            f"{label.split(' (')[0]} against model size, {results['machine']['threads']} CPU threads"
        )
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(out_dir / name)
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    if sizes:  # the matmuls' energy by operation at the largest size, the paper's left panel
        big = sizes[-1]
        cfg = ModelConfig.from_dict(results["sizes"][big]["config"])
        ops = {
            m: forward_ops(cfg, k)["projections"]
            for m, k in zip(MODELS, ("ternary", "fp16"), strict=True)
        }
        bottom = np.zeros(2)
        for kind in ("fp16_mul", "fp16_add", "int8_add"):
            values = np.array(
                [getattr(ops[m], kind) * ENERGY_PJ["7nm"][kind] * 1e-9 for m in MODELS[::-1]]
            )
            left.bar(list(MODELS[::-1]), values, bottom=bottom, label=kind.replace("_", " "))
            bottom += values
        for i, total in enumerate(bottom):
            left.annotate(
                f"{total:.3g} mJ",
                (i, total),
                textcoords="offset points",
                xytext=(0, 3),
                ha="center",
            )
        left.set_ylim(top=bottom.max() * 1.12)
        left.set_ylabel(f"mJ / token, matrix multiplications ({big}, 7 nm)")
        left.set_title(f"projection energy by operation ({bottom[0] / bottom[1]:.1f}x)")
        left.legend()
    xs = [params[s] for s in sizes]
    for model in MODELS:
        right.plot(xs, [results["sizes"][s]["energy"][model]["total_j"] * 1e3 for s in sizes],
                   "o-", color=colors[model], label=model)  # fmt: skip
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xticks(xs, sizes, rotation=45)
    right.minorticks_off()
    right.set_xlabel("model size")
    right.set_ylabel("mJ / token (7 nm)")
    right.set_title("end-to-end arithmetic energy")
    right.grid(alpha=0.3)
    right.legend()
    fig.tight_layout()
    written.append(out_dir / "figure3_energy.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def write_report(results: dict, out_dir: Path) -> dict[str, Path]:
    """efficiency.json, efficiency.md and the PNG plots in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    results = dict(results, generated=time.strftime("%Y-%m-%d %H:%M:%S %Z"))
    paths = {"json": out_dir / "efficiency.json", "markdown": out_dir / "efficiency.md"}
    paths["json"].write_text(json.dumps(results, indent=2, default=float) + "\n")
    paths["markdown"].write_text(markdown(results))
    for png in plot(results, out_dir):
        paths[png.stem] = png
    return paths


def report(opts: ReportOptions, out_dir: Path, log: Callable[[str], None] = print) -> dict:
    """Measure and write everything; the paths written."""
    return write_report(measure(opts, log), out_dir)


def add_report_arguments(p) -> None:
    """`bench --report` options; --threads/--prompt/--decode/--reps/--workdir/--no-peers are
    `bitnet158.bench`'s and mean the same here."""
    g = p.add_argument_group(
        "efficiency report (--report DIR): BitNet b1.58 against an fp16 LLaMA of the same "
        "shape, the paper's Tables 1 and 3 and Figures 2 and 3"
    )
    g.add_argument("--report", type=Path, default=None, metavar="DIR",
                   help="write efficiency.md, efficiency.json and PNG plots to DIR")  # fmt: skip
    g.add_argument("--sizes", default=",".join(DEFAULT_SIZES),
                   help="comma-separated paper sizes: " + ", ".join(SIZES))  # fmt: skip
    g.add_argument("--memory-limit", type=float, default=None, metavar="GIB",
                   help="skip models whose run needs more (default: 70%% of available memory)")  # fmt: skip
    g.add_argument("--budget", type=float, default=None, metavar="GIB",
                   help="Table 3 memory budget (default: the fp16 model plus 16 sequences)")  # fmt: skip
    g.add_argument("--throughput-size", default=None, metavar="SIZE",
                   help="the size of Table 3 (default: the largest that fits)")  # fmt: skip
    g.add_argument("--batch-seq", type=int, default=512, help="tokens per sequence in Table 3")
    g.add_argument("--batch-steps", type=int, default=8, help="batched decode steps timed")
    g.add_argument("--max-batch", type=int, default=256, help="the most sequences measured")
    g.add_argument("--keep-models", action="store_true", help="keep the fp16 GGUF files")


def report_from_args(args, log: Callable[[str], None] | None = None) -> int:
    """`bitnet158 bench --report DIR`: measure, write the report, print the markdown."""
    sizes = tuple(s for s in args.sizes.split(",") if s)
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        raise ValueError(f"unknown size(s) {unknown}; choose from {list(SIZES)}")
    opts = ReportOptions(
        sizes=sizes,
        threads=args.threads,
        prompt=args.prompt,
        decode=args.decode,
        reps=args.reps,
        memory_limit=args.memory_limit * GiB if args.memory_limit else None,
        budget=args.budget * GiB if args.budget else None,
        throughput_size=args.throughput_size,
        batch_seq=args.batch_seq,
        batch_steps=args.batch_steps,
        max_batch=args.max_batch,
        fp16=not args.no_peers,
        workdir=args.workdir,
        keep_models=args.keep_models,
    )
    paths = report(opts, args.report, log or (lambda s: print(s, file=sys.stderr)))
    print(paths["markdown"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0
