"""The fuzz targets: each turns the bytes libFuzzer made into a model file, a checkpoint
directory or an HTTP request, and uses it the way a user would.

The property every target checks: bad data ends in one of our documented errors
(`FormatError`, `ConfigError`, `GenerationError`) or, for the server, a 2xx/4xx answer with a
well-formed body. Any other exception (IndexError, struct.error, UnicodeDecodeError, a
MemoryError from a declared size, a 500) escapes the target, and atheris reports it as a
crash with the input that caused it; a fault in native code kills the process, which
libFuzzer reports too.

Inputs (what the seed corpora of fuzz_corpus.py hold):

- gguf:   byte 0 even: the rest is a whole GGUF file. Odd: the rest is a GGUF header
          (everything before the tensor data) followed here by the tensor data of the shipped
          model's GGUF, so mutations land in the metadata and tensor table.
- native: byte 0 even: the rest is a whole bitnet158 .safetensors file. Odd: the rest is the
          JSON header, given its length prefix here and followed by the shipped model's tensors.
- hf:     a checkpoint directory as records (name byte, u32 little-endian length, content);
          a record running past the end is cut short, as a truncated file is.
- serve:  byte 0 picks the route (/v1/completions or /v1/chat/completions); the rest is the
          request body.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
for helpers in ("serve", "formats"):  # serve_fixtures, hf_builders: imported by bare name
    if str(TESTS / helpers) not in sys.path:
        sys.path.append(str(TESTS / helpers))

# The readers that bitnet158 imports on first use are imported now, so that run_fuzz.py
# instruments them for coverage.
import bitnet158  # noqa: E402
import bitnet158.formats.gguf  # noqa: E402, F401
import bitnet158.formats.hf  # noqa: E402, F401
from bitnet158.errors import ConfigError, FormatError, GenerationError  # noqa: E402
from bitnet158.formats.convert import SHIPPED_PATH, convert, describe  # noqa: E402
from bitnet158.formats.tokenizer import Tokenizer  # noqa: E402

ALLOWED = (FormatError, ConfigError, GenerationError)
TARGETS = ("gguf", "native", "hf", "serve")

HF_FILES = (
    "config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "chat_template.jinja",
)
SERVE_ROUTES = ("/v1/completions", "/v1/chat/completions")
GGUF_ALIGNMENT = 32


def pack_files(files: dict[str, bytes]) -> bytes:
    """A checkpoint directory as one hf fuzz input."""
    out = bytearray()
    for name, content in files.items():
        out += bytes([HF_FILES.index(name)]) + len(content).to_bytes(4, "little") + content
    return bytes(out)


def unpack_files(data: bytes) -> dict[str, bytes]:
    """Inverse of pack_files, lenient: any bytes decode to some set of files."""
    files: dict[str, bytes] = {}
    pos = 0
    while pos + 5 <= len(data):
        name = HF_FILES[data[pos] % len(HF_FILES)]
        n = int.from_bytes(data[pos + 1 : pos + 5], "little")
        files[name] = data[pos + 5 : pos + 5 + n]
        pos += 5 + n
    return files


def shipped_gguf(directory: Path) -> Path:
    """The shipped model written by our GGUF writer (TQ2_0; deterministic bytes)."""
    path = directory / "shipped-b158.gguf"
    if not path.exists():
        convert(SHIPPED_PATH, path, to="gguf-tq2_0")
    return path


def gguf_split(path: Path) -> tuple[bytes, bytes]:
    """(header, tensor data) of a GGUF file: the data starts at its first tensor."""
    from bitnet158.formats.gguf import read_gguf

    start = min(t.begin for t in read_gguf(path).tensors.values())
    data = path.read_bytes()
    return data[:start], data[start:]


def native_split(path: Path) -> tuple[bytes, bytes]:
    """(JSON header, tensor payload) of a safetensors file."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return data[8 : 8 + n], data[8 + n :]


def use_model(path: Path) -> None:
    """What `bitnet158 info`, `generate` and `chat` do with a model path."""
    describe(path)
    model = bitnet158.load(path, threads=1)
    model.generate("RO", max_new_tokens=2, temperature=0)
    model.generate("ROMEO:", max_new_tokens=2, temperature=1.0, top_p=0.9, seed=0)
    model.chat([{"role": "user", "content": "Who art thou?"}], max_new_tokens=1, temperature=0)


class _FileTarget:
    """Writes each input to a fresh file (never over a file a previous run may still map)."""

    def __init__(self, suffix: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="bitnet158-fuzz-"))
        self.path = self.dir / f"model{suffix}"

    def write(self, content: bytes) -> Path:
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(content)
        os.replace(tmp, self.path)
        return self.path

    def frame(self, header: bytes) -> bytes:
        """A whole file around a fuzzed header (the format's framing, the real tensor data)."""
        raise NotImplementedError

    def __call__(self, data: bytes) -> None:
        # An odd first byte: the rest is a header put before real tensor data; even: a whole file.
        if not data:
            return
        content = self.frame(data[1:]) if data[0] % 2 else data[1:]
        try:
            use_model(self.write(content))
        except ALLOWED:
            pass


class GGUFTarget(_FileTarget):
    def __init__(self) -> None:
        super().__init__(".gguf")
        self.header, self.tensor_data = gguf_split(shipped_gguf(self.dir))

    def frame(self, header: bytes) -> bytes:
        return header + bytes(-len(header) % GGUF_ALIGNMENT) + self.tensor_data


class NativeTarget(_FileTarget):
    def __init__(self) -> None:
        super().__init__(".safetensors")
        _, self.payload = native_split(SHIPPED_PATH)

    def frame(self, header: bytes) -> bytes:
        return len(header).to_bytes(8, "little") + header + self.payload


class HFTarget:
    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="bitnet158-fuzz-"))
        self.count = 0

    def __call__(self, data: bytes) -> None:
        # A new directory per input: files of the last one may still be memory-mapped.
        previous = self.root / f"ckpt-{self.count}"
        self.count += 1
        directory = self.root / f"ckpt-{self.count}"
        directory.mkdir()
        for name, content in unpack_files(data).items():
            (directory / name).write_bytes(content)
        try:
            use_model(directory)
            Tokenizer.from_file(directory)
        except ALLOWED:
            pass
        finally:
            shutil.rmtree(previous, ignore_errors=True)


class ServeTarget:
    """Requests through the whole app (routing, body limits, schema, generation) in-process."""

    def __init__(self) -> None:
        from fastapi.testclient import TestClient
        from serve_fixtures import random_model

        from bitnet158.serve import Limits, create_app

        directory = Path(tempfile.mkdtemp(prefix="bitnet158-fuzz-"))
        model = bitnet158.load(random_model(directory / "fuzz-serve.safetensors"), threads=1)
        limits = Limits(max_body_bytes=16 << 10, max_tokens=4, max_n=2, max_waiting=8, slots=2)
        self.client = TestClient(create_app(model, limits=limits))  # re-raises server errors
        self.client.__enter__()  # runs the app's lifespan

    def __call__(self, data: bytes) -> None:
        if not data:
            return
        route = SERVE_ROUTES[data[0] % len(SERVE_ROUTES)]
        r = self.client.post(route, content=data[1:], headers={"content-type": "application/json"})
        check_response(r.status_code, r.headers.get("content-type", ""), r.text)


def check_response(status: int, content_type: str, text: str) -> None:
    """A 2xx with a completion (JSON, or SSE chunks ending in [DONE]) or a 4xx error object."""
    if 400 <= status < 500:
        error = json.loads(text)["error"]
        assert isinstance(error["message"], str) and error["type"], text
        return
    assert status == 200, f"HTTP {status}: {text[:500]}"
    if content_type.startswith("text/event-stream"):
        events = [line[6:] for line in text.split("\n\n") if line.startswith("data: ")]
        assert events and events[-1] == "[DONE]", text[-500:]
        for event in events[:-1]:
            chunk = json.loads(event)
            assert "error" not in chunk and "choices" in chunk, event
    else:
        assert "choices" in json.loads(text), text[:500]


def make(name: str) -> Callable[[bytes], None]:
    """The target called `name`, set up (models built, the app started)."""
    targets = {"gguf": GGUFTarget, "native": NativeTarget, "hf": HFTarget, "serve": ServeTarget}
    if name not in targets:
        raise SystemExit(f"unknown fuzz target {name!r}; one of {', '.join(TARGETS)}")
    return targets[name]()
