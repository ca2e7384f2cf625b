"""The inference world runs with torch unimportable, and `import bitnet158` stays light."""

from __future__ import annotations

import subprocess
import sys

BLOCK_TORCH = r"""
import sys

class BlockTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test ({name})")
        return None

sys.meta_path.insert(0, BlockTorch())
"""

GENERATE = r"""
import bitnet158
model = bitnet158.load(sys.argv[1], threads=1)
text = model.generate("ROMEO:", max_new_tokens=5, temperature=0.8, seed=0)
assert isinstance(text, str) and model.last_stats.new_tokens > 0
streamed = "".join(model.generate("ROMEO:", max_new_tokens=5, temperature=0.8, seed=0, stream=True))
assert streamed == text
assert model.logits([3, 4, 5]).shape == (3, model.config.vocab_size)
loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
assert not loaded, loaded
print("ok")
"""

LIGHT_IMPORT = r"""
import bitnet158
heavy = sorted(m for m in ("numpy", "tokenizers", "jinja2", "torch") if m in sys.modules)
assert not heavy, heavy
assert callable(bitnet158.load)
print("ok")
"""


def run(code: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", BLOCK_TORCH + code, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_generate_without_torch(tiny_path):
    result = run(GENERATE, str(tiny_path))
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_import_is_light():
    result = run(LIGHT_IMPORT)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
