"""`bitnet158 bench`: our engine against llama.cpp and transformers, in one run, same threads.

Random-weight models of real shapes (microsoft/bitnet-b1.58-2B-4T, 1bitLLM's 700M) are written
in our format (2-bit layout, and the 1.6-bit one of `convert --to bitnet158-tq1`) and, through
`formats.gguf`, as llama.cpp TQ2_0 / TQ1_0 GGUF files. Each engine
runs in its own subprocess (so load time and peak RSS are its own) and is measured as
llama-bench measures: prefill of a random prompt (pp, tokens/s) and decode of tokens one at a
time (tg, tokens/s), from an empty context or after `depth` context tokens (llama-bench's `-d`:
each step then also reads their keys and values). The machine's memory read bandwidth, measured
in the same run, gives each engine's decode roofline: bytes read per token / bandwidth; the
cores' multiply-adds per second with the instruction our prefill GEMM multiplies with
(`_native.multiply_add_rate`, in each of our workers) give its prefill ceiling: that rate /
the ternary projections' multiply-adds per token.

Peers are optional: llama.cpp needs `llama-cpp-python` (the `bench` extra), transformers needs
torch; a peer that cannot run is reported as such, never silently dropped.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .formats.convert import convert
from .formats.pages import drop_cached

# The shapes of the issue: microsoft/bitnet-b1.58-2B-4T (ReLU², GQA 20/5) and 1bitLLM's
# bitnet_b1_58-large (SwiGLU, MHA). Both tied, with sub-norms.
SHAPES = {
    "2b4t": dict(
        family="bitnet-2b4t",
        vocab_size=128256,
        hidden_size=2560,
        intermediate_size=6912,
        num_layers=30,
        num_heads=20,
        num_kv_heads=5,
        hidden_act="relu2",
        rope_theta=500000.0,
        max_position_embeddings=4096,
    ),
    "700m": dict(
        family="llama-b158",
        vocab_size=32002,
        hidden_size=1536,
        intermediate_size=4096,
        num_layers=24,
        num_heads=16,
        num_kv_heads=16,
        hidden_act="silu",
        max_position_embeddings=2048,
    ),
}
GGUF_TYPES = ("tq2_0", "tq1_0")
# Our output layers: (load's lm_head, label, dtype for the bytes per token).
HEADS = (("exact", "F16", "float16"), ("int8", "int8", "int8"), ("q4", "4-bit", "q4"))
Q4_K = 12  # ggml_type of llama-quantize's default token embedding for TQ2_0
MiB = 1 << 20


def shape_config(shape: str, **overrides) -> ModelConfig:
    """The ModelConfig of a named shape (see SHAPES)."""
    fields = dict(SHAPES[shape], subln=True, tie_word_embeddings=True, bos_token_id=0)
    fields.update(overrides)
    return ModelConfig(**fields)


# --- random models in our format and as GGUF ------------------------------------------------


def _tokenizer_json() -> str:
    """A small byte-level BPE tokenizer (the GGUF writer needs one; ids past it are padding)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(["a random-weight model for benchmarks"] * 4, trainer)
    return tok.to_str()


def _random_packed(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Uniform random ternary weights in our packed layout."""
    from .packing import ROWS, ours_packed_shape, pack_ours

    if n % ROWS or k % 256:  # padding must hold zero weights: go through the definition
        return pack_ours(rng.integers(-1, 2, size=(n, k), dtype=np.int8))
    # every byte of 4 codes in {0, 1, 2} is a valid byte of the layout
    valid = np.array(
        [a | b << 2 | c << 4 | d << 6 for a in range(3) for b in range(3) for c in range(3) for d in range(3)],
        dtype=np.uint8,
    )  # fmt: skip
    return valid[rng.integers(0, 81, size=ours_packed_shape(n, k), dtype=np.uint8)]


def write_random_model(cfg: ModelConfig, path: Path, seed: int = 0) -> Path:
    """Our `.safetensors` file of a random model: F16 embedding, unit norms, ternary layers
    with scales that keep activations of order one."""
    from .formats.native import projection_shapes, save_native

    rng = np.random.default_rng(seed)
    V, H = cfg.vocab_size, cfg.hidden_size
    embed = np.empty((V, H), dtype=np.float16)
    for r0 in range(0, V, 8192):
        rows = rng.standard_normal((min(8192, V - r0), H), dtype=np.float32)
        embed[r0 : r0 + 8192] = rows * np.float32(0.02)
    tensors: dict[str, np.ndarray] = {"embed.weight": embed, "norm.weight": np.ones(H, np.float32)}
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for name, size in (("attn_norm", H), ("ffn_norm", H), ("attn_sub_norm", cfg.q_size),
                           ("ffn_sub_norm", cfg.intermediate_size)):  # fmt: skip
            tensors[p + name + ".weight"] = np.ones(size, np.float32)
        for proj, (n, k) in projection_shapes(cfg).items():
            tensors[p + proj + ".packed"] = _random_packed(rng, n, k)
            tensors[p + proj + ".scale"] = np.float32([np.sqrt(1.5 / k)])
    return save_native(path, cfg, tensors, _tokenizer_json(), source="bitnet158 bench (random)")


class _LazyCodes(Mapping):
    """Canonical tensors of a native checkpoint, unpacking one projection at a time."""

    def __init__(self, ckpt) -> None:
        self.ckpt = ckpt
        self.names = [n.replace(".packed", ".codes") for n in ckpt.tensors]

    def __getitem__(self, name: str) -> np.ndarray:
        from .formats.native import projection_shapes
        from .packing import unpack_ours

        if name.endswith(".codes"):
            n, k = projection_shapes(self.ckpt.config)[name.rsplit(".", 2)[1]]
            return unpack_ours(self.ckpt.tensors[name.replace(".codes", ".packed")], n, k)
        return self.ckpt.tensors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def write_gguf_copy(native_path: Path, path: Path, ternary_type: str) -> Path:
    """The same random weights as a llama.cpp `bitnet` GGUF (F16 embedding).

    llama.cpp's bitnet graph gates the FFN with SiLU, so a ReLU² shape is written as SiLU: the
    cost per token is the same, and the weights are random anyway.
    """
    from .formats.gguf import write_gguf
    from .formats.native import load_native

    ckpt = load_native(native_path)
    ckpt = dataclasses.replace(ckpt, config=dataclasses.replace(ckpt.config, hidden_act="silu"))
    return write_gguf(path, ckpt, _LazyCodes(ckpt), ternary_type=ternary_type)


def requantize_embedding(src: Path, dst: Path, ggml_type: int = Q4_K) -> Path:
    """A copy of a GGUF with the token embedding (= output layer) requantized, as
    `llama-quantize --token-embedding-type` does; the ternary tensors are kept."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 37  # MOSTLY_TQ2_0: tensors already of that type are copied
    params.token_embedding_type = ggml_type
    params.output_tensor_type = ggml_type
    params.nthread = os.cpu_count() or 1
    if llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params) != 0:
        raise RuntimeError(f"llama_model_quantize failed for {src}")
    return dst


# --- workers: one engine per subprocess -----------------------------------------------------


def _peak_rss() -> int:
    """This process's peak resident memory in bytes. VmHWM, not ru_maxrss: Linux carries
    ru_maxrss over from the forking parent (the driver), VmHWM belongs to this image alone."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def worker_bitnet158(args: dict) -> dict:
    """Load our file, then pp and tg the llama-bench way; the fastest of `reps` runs."""
    from . import _native
    from .engine.model import EngineModel
    from .formats.native import load_native

    _native.set_num_threads(args["threads"])
    t0 = time.perf_counter()
    ckpt = load_native(args["path"])
    engine = EngineModel(ckpt.config, ckpt.tensors, lm_head=args["lm_head"], layout=ckpt.layout)
    load_s = time.perf_counter() - t0
    V = ckpt.config.vocab_size
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, V, size=args["prompt"])
    context = rng.integers(0, V, size=args.get("depth", 0))
    ctx = max(args["prompt"], len(context) + args["decode"])

    # One cache for every run, emptied before each, as llama.cpp's context keeps its KV buffer
    # (allocated and cleared at load): a new cache per run also timed the first touch of its
    # pages (1-2 % of a 512-token prefill here, 10 % on memory the VM had not used before).
    cache = engine.new_cache(ctx, args["kv_dtype"])

    def prefill() -> None:
        cache.reset()
        engine.forward(prompt, cache, last_only=True)

    def decode() -> float:
        cache.reset()
        if len(context):
            engine.forward(context, cache, last_only=True)
        token, t0 = 1, time.perf_counter()
        for _ in range(args["decode"]):
            token = int(engine.forward(np.array([token]), cache)[0].argmax())
        return time.perf_counter() - t0

    engine.forward(prompt[:16], cache)  # warm up
    # the prefill's ceiling: the faster of a probe before and one after (the best of the
    # prefills counts too; a shared machine's cores slow down by 2x some minutes)
    multiply_adds = _native.multiply_add_rate(0.3)
    pp = min(_timed(prefill) for _ in range(args["reps"]))
    multiply_adds = max(multiply_adds, _native.multiply_add_rate(0.3))
    tg = min(decode() for _ in range(args["reps"]))
    return dict(
        load_s=load_s,
        prefill_tps=args["prompt"] / pp,
        decode_tps=args["decode"] / tg,
        peak_rss=_peak_rss(),
        head=engine.head_kind,
        isa=_native.isa(),
        multiply_adds_per_s=multiply_adds,
    )


def worker_llama_cpp(args: dict) -> dict:
    """The same measurements through llama-cpp-python (llama.cpp built from source by pip)."""
    import llama_cpp
    from llama_cpp import Llama

    info = llama_cpp.llama_print_system_info().decode()
    isa = [f for f in ("AVX512_VNNI", "AVX512", "AVX2") if f"{f} = 1" in info][:1]
    depth = args.get("depth", 0)
    ctx = max(args["prompt"], depth + args["decode"]) + 16
    t0 = time.perf_counter()
    llm = Llama(
        model_path=args["path"],
        n_ctx=ctx,
        n_batch=512,
        n_ubatch=512,
        n_threads=args["threads"],
        n_threads_batch=args["threads"],
        flash_attn=args["flash_attn"],
        use_mmap=True,
        verbose=False,
    )
    load_s = time.perf_counter() - t0
    rng = np.random.default_rng(0)
    prompt = rng.integers(0, llm.n_vocab(), size=args["prompt"]).tolist()
    context = rng.integers(0, llm.n_vocab(), size=depth).tolist()

    def prefill() -> None:
        llm.reset()
        llm.eval(prompt)

    def last_logits() -> np.ndarray:
        # `llm.scores` is written only with logits_all (and holds n_batch rows): read the
        # context's logits of the last token, as greedy decoding does
        return np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)
        )

    def decode() -> float:
        llm.reset()
        if context:
            llm.eval(context)
        token, t0 = 1, time.perf_counter()
        for _ in range(args["decode"]):
            llm.eval([token])
            token = int(np.argmax(last_logits()))
        return time.perf_counter() - t0

    llm.eval(prompt[:16])  # warm up
    pp = min(_timed(prefill) for _ in range(args["reps"]))
    tg = min(decode() for _ in range(args["reps"]))
    return dict(
        load_s=load_s,
        prefill_tps=args["prompt"] / pp,
        decode_tps=args["decode"] / tg,
        peak_rss=_peak_rss(),
        isa=(isa or ["portable"])[0].lower(),
        version=llama_cpp.__version__,
    )


def worker_transformers(args: dict) -> dict:
    """transformers' BitNetForCausalLM (packed 2-bit BitLinear, bf16) with a few layers; the
    time of the decoder layers (forward hooks) is scaled to the full depth."""
    import torch
    from transformers import BitNetConfig, BitNetForCausalLM
    from transformers.integrations.bitnet import replace_with_bitnet_linear

    torch.set_num_threads(args["threads"])
    cfg = ModelConfig(**args["config"])
    few = args["layers"]
    hf_cfg = BitNetConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=few,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        hidden_act=cfg.hidden_act,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = BitNetForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"])
    for module in model.modules():  # the new BitLinears are on the meta device: fill them
        if type(module).__name__ == "BitLinear":
            shape = module.weight.shape
            codes = [torch.randint(0, 3, shape, dtype=torch.uint8) for _ in range(4)]
            module.weight = codes[0] | codes[1] << 2 | codes[2] << 4 | codes[3] << 6
            module.weight_scale = torch.ones(1, dtype=torch.bfloat16)
    layer_time = [0.0]

    def start(*_):
        layer_time.append(time.perf_counter())

    def stop(*_):
        layer_time[0] += time.perf_counter() - layer_time.pop()

    for layer in model.model.layers:
        layer.register_forward_pre_hook(start)
        layer.register_forward_hook(stop)

    def scaled(fn: Callable[[], None]) -> float:
        layer_time[0] = 0.0
        total = _timed(fn)
        return total - layer_time[0] + layer_time[0] * cfg.num_layers / few

    rng = np.random.default_rng(0)
    prompt = torch.from_numpy(rng.integers(0, cfg.vocab_size, size=(1, args["prompt"])))
    context = torch.from_numpy(rng.integers(0, cfg.vocab_size, size=(1, args.get("depth", 0))))
    steps = args["decode"]

    @torch.no_grad()
    def prefill() -> None:
        model(prompt, use_cache=True)

    @torch.no_grad()
    def decode() -> float:
        past = model(context, use_cache=True).past_key_values if context.numel() else None
        token = torch.tensor([[1]])

        def steps_from_context() -> None:
            nonlocal past, token
            for _ in range(steps):
                out = model(token, past_key_values=past, use_cache=True)
                past, token = out.past_key_values, out.logits[:, -1:].argmax(-1)

        return scaled(steps_from_context)

    prefill()  # warm up with the measured shapes: torch.compile specializes on them
    decode()
    pp = min(scaled(prefill) for _ in range(args["reps"]))
    tg = decode()
    return dict(
        prefill_tps=args["prompt"] / pp,
        decode_tps=steps / tg,
        note=f"{few} of {cfg.num_layers} layers, layer time scaled to full depth",
    )


def worker_bandwidth(args: dict) -> dict:
    return {"read_bandwidth_gbs": read_bandwidth(args["threads"], args["bytes"]) / 1e9}


def worker_requantize(args: dict) -> dict:
    requantize_embedding(Path(args["src"]), Path(args["dst"]))
    return {}


WORKERS = {
    "bitnet158": worker_bitnet158,
    "llama.cpp": worker_llama_cpp,
    "transformers": worker_transformers,
    "requantize": worker_requantize,
    "bandwidth": worker_bandwidth,
}


def run_worker(kind: str, args: dict, timeout: float = 1800) -> dict:
    """Run one worker in a fresh Python process; its result, or {"error": ...}."""
    code = "import json, sys; from bitnet158 import bench; print('RESULT' + json.dumps(bench.WORKERS[sys.argv[1]](json.loads(sys.argv[2]))))"  # noqa: E501
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}  # numpy's idle BLAS threads must not spin
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code, kind, json.dumps(args)],
            capture_output=True, text=True, timeout=timeout, env=env,
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT") :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " / ".join(tail) or f"exit status {proc.returncode}"}


# --- memory bandwidth and rooflines ----------------------------------------------------------


def read_bandwidth(threads: int, size: int = 1 << 30, reps: int = 5) -> float:
    """Read bandwidth in bytes/s over `size` bytes with `threads` threads (best of reps)."""
    from . import _native

    before = _native.get_num_threads()
    _native.set_num_threads(threads)
    try:
        buf = np.ones(size, dtype=np.uint8)  # touched: no page faults while timing
        _native.read_bytes(buf)
        best = min(_timed(lambda: _native.read_bytes(buf)) for _ in range(reps))
    finally:
        _native.set_num_threads(before)
    return size / best


def multiply_adds_per_token(cfg: ModelConfig) -> int:
    """Multiply-adds of one token through the ternary projections (attention's, which grow
    with the position, not counted): a prefill's work at its ceiling."""
    from .formats.native import projection_shapes

    return cfg.num_layers * sum(n * k for n, k in projection_shapes(cfg).values())


def decode_bytes_per_token(cfg: ModelConfig, head: str, layout: str = "2bit",
                           keys: float = 0.0) -> dict[str, int]:  # fmt: skip
    """Bytes a decode step must read: packed ternary layers (ours, in `layout`), the output
    layer, and the float16 keys and values of `keys` positions (on average over the steps)."""
    from .formats.native import LAYOUTS, projection_shapes

    packed_shape = LAYOUTS[layout][0]
    ternary = sum(np.prod(packed_shape(n, k)) for n, k in projection_shapes(cfg).values())
    V, H = cfg.vocab_size, cfg.hidden_size
    k64, k256 = -(-H // 64) * 64, -(-H // 256) * 256
    head_bytes = {
        "int8": V * (k64 + 8),  # codes + row scale and sum
        "q4": V * (k256 // 2 + k256 // 16),  # nibbles + an f16 scale per 32
        "float32": V * H * 4,
    }.get(head, V * H * 2)
    kv = 2 * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * keys  # K and V, f16
    return {"ternary": int(ternary) * cfg.num_layers, "head": int(head_bytes), "kv": int(kv)}


# --- the whole benchmark ---------------------------------------------------------------------


def _llama_cpp_available() -> str | None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError as exc:
        return f"llama-cpp-python is not installed (pip install 'bitnet158[bench]'): {exc}"
    return None


def _transformers_available() -> str | None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as exc:
        return f"transformers/torch not installed: {exc}"
    return None


def _measure(runs: list, label: str, engine: str, weights: str, kind: str, args: dict,
             log: Callable[[str], None], bandwidth: float, roofline: dict | None = None,
             probe_bytes: int = 1 << 30, macs_per_token: int = 0) -> None:  # fmt: skip
    """Run one worker and append its entry (with its decode roofline and prefill ceiling when
    known) to runs."""
    log(f"[{label}] {engine} {weights} ...")
    if roofline:  # the bandwidth of this moment (a shared machine's moves by 1.5x)
        probe = run_worker("bandwidth", {"threads": args["threads"], "bytes": probe_bytes})
        bandwidth = probe.get("read_bandwidth_gbs", bandwidth / 1e9) * 1e9
    res = run_worker(kind, args)
    entry = dict(engine=engine, weights=weights, **res)
    if roofline and "decode_tps" in res:
        entry["bytes_per_token"] = per_token = sum(roofline.values())
        entry["read_bandwidth_gbs"] = bandwidth / 1e9
        entry["roofline_tps"] = bandwidth / per_token
        entry["roofline_fraction"] = res["decode_tps"] / entry["roofline_tps"]
    if macs_per_token and res.get("multiply_adds_per_s"):
        entry["prefill_ceiling_tps"] = res["multiply_adds_per_s"] / macs_per_token
        entry["prefill_ceiling_fraction"] = res["prefill_tps"] / entry["prefill_ceiling_tps"]
    runs.append(entry)
    log(f"    {json.dumps(entry)}")


def read_from_disk(path: Path) -> None:
    """Put a model file in the page cache as if read from disk (whenever and however it was
    written): its cached pages dropped, then read once in order. Every engine's file is then
    cached the same way, in the large folios a read from disk leaves, which a mapping maps in
    2 MB pages (formats.pages); a file cached as written is mapped in 4 KB pages, and the
    2B-4T decoded 10-20 % slower that way."""
    drop_cached(path)
    with open(path, "rb", buffering=0) as f:
        chunk = bytearray(8 << 20)
        while f.readinto(chunk):
            pass


def _gguf_files(ours: Path, workdir: Path, shape: str, runs: list, log) -> dict[str, Path]:
    """TQ2_0 and TQ1_0 copies of our file, and TQ2_0 with a Q4_K embedding (built once)."""
    files = {}
    for qtype in GGUF_TYPES:
        path = workdir / f"{shape}-{qtype}.gguf"
        if not path.exists():
            log(f"[{shape}] writing {path}")
            try:
                write_gguf_copy(ours, path, qtype)
            except Exception as exc:  # the GGUF writer may refuse a shape: say so in the table
                runs.append(dict(engine="llama.cpp", weights=qtype.upper(), error=str(exc)))
                continue
        files[qtype] = path
    if "tq2_0" in files:
        path = workdir / f"{shape}-tq2_0-q4k.gguf"
        if not path.exists():
            log(f"[{shape}] requantizing the embedding to Q4_K: {path}")
            res = run_worker("requantize", dict(src=str(files["tq2_0"]), dst=str(path)))
            if "error" in res:
                runs.append(dict(engine="llama.cpp", weights="TQ2_0 + Q4_K", error=res["error"]))
                return files
        files["tq2_0-q4k"] = path
    for path in files.values():
        read_from_disk(path)
    return files


GGUF_LABELS = {"tq2_0": "TQ2_0 + F16", "tq1_0": "TQ1_0 + F16", "tq2_0-q4k": "TQ2_0 + Q4_K"}


def run(
    shapes: list[str],
    workdir: Path,
    threads: int,
    prompt: int = 512,
    decode: int = 128,
    reps: int = 2,
    depth: int = 0,
    peers: bool = True,
    hf_layers: int = 2,
    log: Callable[[str], None] = print,
    probe_bytes: int = 1 << 30,
) -> dict:
    """Build the models, run every engine, return all results (see `markdown`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    common = dict(threads=threads, prompt=prompt, decode=decode, reps=reps, depth=depth)
    keys = depth + (decode + 1) / 2  # positions a decode step attends to, on average
    log(f"measuring read bandwidth on {threads} thread(s)")
    bandwidth = read_bandwidth(threads, probe_bytes)
    results: dict = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": threads,
        "prompt": prompt,
        "decode": decode,
        "depth": depth,
        "reps": reps,
        "read_bandwidth_gbs": bandwidth / 1e9,
        "load_average_before": os.getloadavg(),
        "shapes": {},
    }
    for shape in shapes:
        cfg = shape_config(shape)
        ours = workdir / f"{shape}.safetensors"
        if not ours.exists():
            log(f"[{shape}] writing a random model in our format: {ours}")
            write_random_model(cfg, ours)
        read_from_disk(ours)
        runs: list[dict] = []
        results["shapes"][shape] = {"config": cfg.to_dict(), "runs": runs}
        for head, label, bytes_kind in HEADS:
            args = dict(common, path=str(ours), lm_head=head, kv_dtype="float16")
            _measure(runs, shape, "bitnet158", f"2-bit ours + {label} head", "bitnet158", args,
                     log, bandwidth, decode_bytes_per_token(cfg, bytes_kind, keys=keys),
                     probe_bytes, multiply_adds_per_token(cfg))  # fmt: skip
        # The 1.6-bit layout (`convert --to bitnet158-tq1`) of the same model, to compare.
        ours_tq1 = workdir / f"{shape}-tq1.safetensors"
        if not ours_tq1.exists():
            log(f"[{shape}] writing its 1.6-bit layout: {ours_tq1}")
            convert(ours, ours_tq1, to="bitnet158-tq1")
        read_from_disk(ours_tq1)
        for head, label, bytes_kind in HEADS[::2]:  # F16 and 4-bit
            args = dict(common, path=str(ours_tq1), lm_head=head, kv_dtype="float16")
            _measure(runs, shape, "bitnet158", f"1.6-bit ours + {label} head", "bitnet158",
                     args, log, bandwidth, decode_bytes_per_token(cfg, bytes_kind, "tq1", keys),
                     probe_bytes, multiply_adds_per_token(cfg))  # fmt: skip
        if not peers:
            continue
        missing = _llama_cpp_available()
        if missing:
            runs.append(dict(engine="llama.cpp", weights="TQ2_0/TQ1_0", error=missing))
        else:
            for name, path in _gguf_files(ours, workdir, shape, runs, log).items():
                for fa in (False, True):
                    args = dict(common, path=str(path), flash_attn=fa)
                    weights = GGUF_LABELS[name] + (" (flash attn)" if fa else "")
                    _measure(runs, shape, "llama.cpp", weights, "llama.cpp", args, log, bandwidth)
        missing = _transformers_available()
        if missing:
            runs.append(dict(engine="transformers", weights="BitNetForCausalLM", error=missing))
        else:
            args = dict(common, config=cfg.to_dict(), layers=hf_layers, decode=min(decode, 8))
            args["reps"] = 1
            _measure(runs, shape, "transformers", "BitNetForCausalLM packed, bf16",
                     "transformers", args, log, bandwidth)  # fmt: skip
    results["load_average_after"] = os.getloadavg()
    return results


# Paired rounds: (our lm_head, GGUF file key) compared back to back, llama.cpp with flash attn.
PAIRS = (
    ("exact", "tq2_0", "F16 head vs TQ2_0 + F16"),
    ("q4", "tq2_0-q4k", "4-bit head vs TQ2_0 + Q4_K"),
)


def paired(shape: str, workdir: Path, threads: int, rounds: int, prompt: int = 512,
           decode: int = 128, log: Callable[[str], None] = print,
           depth: int = 0) -> list[dict]:  # fmt: skip
    """Rounds of bitnet158 then llama.cpp back to back (one repetition each), so that both
    see the same state of a shared machine; the models are those `run` wrote."""
    common = dict(threads=threads, prompt=prompt, decode=decode, reps=1, depth=depth)
    ours = workdir / f"{shape}.safetensors"
    if not ours.exists():
        write_random_model(shape_config(shape), ours)
    read_from_disk(ours)
    files = _gguf_files(ours, workdir, shape, [], log)
    out = []
    for head, key, label in PAIRS:
        if key not in files:
            continue
        for i in range(rounds):
            a = run_worker(
                "bitnet158", dict(common, path=str(ours), lm_head=head, kv_dtype="float16")
            )
            b = run_worker("llama.cpp", dict(common, path=str(files[key]), flash_attn=True))
            row = dict(pair=label, round=i + 1, depth=depth, load_average=os.getloadavg()[0],
                       ours=a, llama_cpp=b)  # fmt: skip
            if "prefill_tps" in a and "prefill_tps" in b:
                row["prefill_ratio"] = a["prefill_tps"] / b["prefill_tps"]
                row["decode_ratio"] = a["decode_tps"] / b["decode_tps"]
            log(json.dumps(row))
            out.append(row)
    return out


def peer_isa_warning(entries: list[dict]) -> str | None:
    """A warning when llama.cpp ran without AVX-512 where our engine used it: a llama.cpp wheel
    built for another (or a portable) CPU, which would flatter every ratio."""
    ours = {e.get("isa") for e in entries if e.get("engine") == "bitnet158"}
    peers = {e["isa"] for e in entries if e.get("engine") == "llama.cpp" and "isa" in e}
    if ours & {"avx512", "amx"} and any(not isa.startswith("avx512") for isa in peers):
        return (
            f"**Warning:** llama.cpp ran with {', '.join(sorted(peers))} kernels on a CPU with "
            "AVX-512 (a wheel built for a portable ISA): the ratios flatter bitnet158. Rebuild "
            "it for this CPU with `make install-bench`."
        )
    return None


def paired_markdown(rows: list[dict]) -> str:
    """Paired rounds as a markdown table."""
    depth = max((r.get("depth", 0) for r in rows), default=0)
    lines = [f"Decode after {depth} context tokens (llama-bench -d {depth}).", ""] if depth else []
    lines += [
        "| pair | round | load avg | prefill tok/s ours / llama.cpp | ratio | decode tok/s ours / llama.cpp | ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in rows:
        if "prefill_ratio" not in r:
            err = r["ours"].get("error") or r["llama_cpp"].get("error")
            lines.append(f"| {r['pair']} | {r['round']} | | not run: {err[:100]} | | | |")
            continue
        a, b = r["ours"], r["llama_cpp"]
        lines.append(
            f"| {r['pair']} | {r['round']} | {r['load_average']:.1f} | {a['prefill_tps']:.0f} / "
            f"{b['prefill_tps']:.0f} | {r['prefill_ratio']:.2f}× | {a['decode_tps']:.1f} / "
            f"{b['decode_tps']:.1f} | {r['decode_ratio']:.2f}× |"
        )
    entries = [dict(r["ours"], engine="bitnet158") for r in rows]
    entries += [dict(r["llama_cpp"], engine="llama.cpp") for r in rows]
    warning = peer_isa_warning(entries)
    return "\n".join(lines + ([f"\n{warning}"] if warning else [])) + "\n"


def _best(runs: list[dict], prefix: str, key: str) -> float | None:
    values = [
        r[key]
        for r in runs
        if r["weights"].startswith(prefix) and key in r and r["engine"] == "llama.cpp"
    ]
    return max(values) if values else None


def markdown(results: dict) -> str:
    """The results as a markdown table, ratios against llama.cpp TQ2_0 measured in the run."""
    bw = results["read_bandwidth_gbs"]
    depth = results.get("depth", 0)
    start = f"after {depth} context tokens" if depth else "from an empty context"
    lines = [
        f"Threads: {results['threads']}; prefill pp{results['prompt']}, decode tg{results['decode']} "
        f"({start}, as llama-bench), best of {results.get('reps', 1)}; read "
        f"bandwidth {bw:.1f} GB/s at the start (and again before each bitnet158 run, for its "
        "roofline); machine load average "
        f"{results.get('load_average_before', [0])[0]:.1f} before, "
        f"{results.get('load_average_after', [0])[0]:.1f} after. Ratios: against llama.cpp "
        "TQ2_0 with an F16 output layer (ours F16) or Q4_K (ours int8 / 4-bit), the faster of "
        "flash attention on/off. Decode roofline: bytes read per token / read bandwidth. "
        "Prefill ceiling: the cores' multiply-adds per second with the instruction our prefill "
        "GEMM multiplies with (the faster of two probes in the worker, before and after its "
        "prefills) / the ternary projections' multiply-adds per token.",
        "",
    ]
    warning = peer_isa_warning([r for d in results["shapes"].values() for r in d["runs"]])
    if warning:
        lines += [warning, ""]
    for shape, data in results["shapes"].items():
        runs = data["runs"]
        ref = {
            "F16": (_best(runs, "TQ2_0 + F16", "prefill_tps"), _best(runs, "TQ2_0 + F16", "decode_tps")),
            "Q4_K": (_best(runs, "TQ2_0 + Q4_K", "prefill_tps"), _best(runs, "TQ2_0 + Q4_K", "decode_tps")),
        }  # fmt: skip
        lines += [
            f"### {shape}",
            "",
            "| engine | weights + output layer | prefill tok/s | decode tok/s | prefill ratio | decode ratio | decode roofline | prefill ceiling | peak RSS MiB | load s |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]  # fmt: skip
        for r in runs:
            if "error" in r:
                lines.append(
                    f"| {r['engine']} | {r['weights']} | — | — | | | | | | not run: {r['error'][:120]} |"
                )
                continue
            compressed = any(h in r["weights"] for h in ("int8", "4-bit", "Q4_K"))
            key = "Q4_K" if compressed else "F16"
            pp_ref, tg_ref = ref[key]
            ratio = lambda v, base: f"{v / base:.2f}×" if base else ""  # noqa: E731
            roof = (
                f"{r['roofline_tps']:.1f} ({100 * r['roofline_fraction']:.0f} %)"
                if "roofline_tps" in r
                else ""
            )
            ceiling = (
                f"{r['prefill_ceiling_tps']:.0f} ({100 * r['prefill_ceiling_fraction']:.0f} %)"
                if "prefill_ceiling_tps" in r
                else ""
            )
            rss = f"{r['peak_rss'] / MiB:.0f}" if "peak_rss" in r else "—"
            load = f"{r['load_s']:.2f}" if "load_s" in r else r.get("note", "")
            lines.append(
                f"| {r['engine']} | {r['weights']} | {r['prefill_tps']:.1f} | {r['decode_tps']:.2f} | "
                f"{ratio(r['prefill_tps'], pp_ref)} | {ratio(r['decode_tps'], tg_ref)} | {roof} | {ceiling} | {rss} | {load} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry: `bitnet158 bench` and benchmarks/bench_engine.py."""
    import argparse

    p = argparse.ArgumentParser(prog="bitnet158 bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run_from_args(p.parse_args(argv))


def add_arguments(p) -> None:
    p.add_argument("--shapes", default="2b4t,700m", help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument(
        "--threads", type=int, default=None, help="threads for every engine (default: all cores)"
    )
    p.add_argument("--prompt", type=int, default=512, help="prefill tokens (pp)")
    p.add_argument("--decode", type=int, default=128, help="decode tokens (tg)")
    p.add_argument(
        "--depth",
        type=int,
        default=0,
        help="decode after this many context tokens (llama-bench -d; default: an empty context)",
    )
    p.add_argument("--reps", type=int, default=2, help="repetitions (the fastest counts)")
    p.add_argument("--no-peers", action="store_true", help="only bitnet158")
    p.add_argument("--workdir", type=Path, default=None, help="where models are written (kept)")
    p.add_argument("--json", type=Path, default=None, help="write all results here")
    p.add_argument(
        "--paired",
        type=int,
        default=0,
        metavar="ROUNDS",
        help="instead: ROUNDS of bitnet158 then llama.cpp back to back on the first shape "
        "(F16 heads, then our 4-bit against Q4_K): ratios that one machine state shares",
    )


def run_from_args(args) -> int:
    threads = args.threads or len(os.sched_getaffinity(0))
    workdir = args.workdir or Path(tempfile.gettempdir()) / "bitnet158-bench"
    shapes = [s for s in args.shapes.split(",") if s]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        print(f"unknown shape(s) {unknown}; choose from {list(SHAPES)}", file=sys.stderr)
        return 2
    for shape in shapes:
        longest = shape_config(shape).max_position_embeddings
        if not 0 <= args.depth <= longest - max(args.decode, 1) or args.prompt > longest:
            print(f"--depth {args.depth} + --decode {args.decode} and --prompt {args.prompt} "
                  f"must fit the {shape} shape's {longest} positions (depth >= 0)",
                  file=sys.stderr)  # fmt: skip
            return 2
    log = lambda s: print(s, file=sys.stderr)  # noqa: E731
    if getattr(args, "paired", 0):
        missing = _llama_cpp_available()
        if missing:
            print(missing, file=sys.stderr)
            return 2
        rows = paired(shapes[0], workdir, threads, args.paired, args.prompt, args.decode, log,
                      args.depth)  # fmt: skip
        print(paired_markdown(rows))
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))
        return 0
    results = run(shapes, workdir, threads, args.prompt, args.decode, args.reps, args.depth,
                  peers=not args.no_peers, log=log)  # fmt: skip
    table = markdown(results)
    results["markdown"] = table
    print(table)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0
