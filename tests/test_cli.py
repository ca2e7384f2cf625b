"""The `bitnet158` command, run as a user runs it (a subprocess), on the shipped model."""

import json
import subprocess
import sys

import pytest

from bitnet158.formats.convert import SHIPPED_PATH


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bitnet158.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize("command", [[], ["generate"], ["chat"], ["info"], ["convert"]])
def test_help_everywhere(command):
    result = run(*command, "--help")
    assert result.returncode == 0
    assert "usage: bitnet158" in result.stdout


def test_generate_json_is_reproducible_with_a_seed():
    args = ["generate", "ROMEO:", "-n", "24", "--seed", "3", "--json"]
    first, second = run(*args), run(*args)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert out["prompt"] == "ROMEO:" and out["text"] and out["new_tokens"] > 0
    assert out["tokens_per_second"] > 0
    assert json.loads(second.stdout)["text"] == out["text"]


def test_generate_streams_and_reports_speed():
    result = run("generate", "KING:", "-n", "16", "--temperature", "0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("KING:") and len(result.stdout) > len("KING:")
    assert "tokens/s" in result.stderr


def test_chat_reads_turns_from_stdin():
    result = run("chat", "-n", "8", "--seed", "0", stdin="Good morrow\n\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()


def test_info_describes_the_shipped_model():
    result = run("info", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["path"] == str(SHIPPED_PATH)
    assert info["family"] == "llama-b158"
    # 2 bits per ternary weight plus the padding of our layout (K to 256, rows to 4)
    assert 2.0 <= info["ternary_bits_per_weight"] < 2.2


def test_convert_refuses_to_overwrite(tmp_path):
    dst = tmp_path / "copy.safetensors"
    assert run("convert", str(SHIPPED_PATH), str(dst)).returncode == 0
    again = run("convert", str(SHIPPED_PATH), str(dst))
    assert again.returncode == 1 and "--force" in again.stderr
    assert run("convert", str(SHIPPED_PATH), str(dst), "--force").returncode == 0
    assert dst.read_bytes() == SHIPPED_PATH.read_bytes()  # a native file converts to itself


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "x", "--model", "/no/such/model"],
        ["info", "/no/such/model"],
        ["generate", "x", "--top-p", "1.5"],
    ],
)
def test_errors_are_one_line_without_traceback(args, tmp_path):
    result = run(*args)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("bitnet158: error:")


def test_corrupt_model_file_is_a_clear_error(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(SHIPPED_PATH.read_bytes()[:1000])
    result = run("info", str(bad))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert str(bad) in result.stderr
