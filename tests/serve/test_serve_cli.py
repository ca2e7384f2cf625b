"""`bitnet158 serve` in its own process, with torch made unimportable: the inference world."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

import httpx

BLOCK_TORCH_AND_SERVE = r"""
import sys

class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test ({name})")
        return None

sys.meta_path.insert(0, BlockTorch())
from bitnet158.cli import main
sys.exit(main(sys.argv[1:]))
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_without_torch(model_path):
    port = free_port()
    args = ["serve", str(model_path), "--port", str(port), "--threads", "1", "--name", "tiny",
            "--log-level", "warning"]  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", BLOCK_TORCH_AND_SERVE, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                assert httpx.get(url + "/health").json()["status"] == "ok"
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.1)
        assert httpx.get(url + "/v1/models").json()["data"][0]["id"] == "tiny"
        reply = httpx.post(url + "/v1/completions", json={"prompt": "ROMEO:", "max_tokens": 4})
        assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] > 0
        page = httpx.get(url + "/")
        assert page.status_code == 200 and "/v1/chat/completions" in page.text
    finally:
        proc.terminate()
        proc.wait(20)
