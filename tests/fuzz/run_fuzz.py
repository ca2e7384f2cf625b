"""Run one fuzz target under atheris (libFuzzer), coverage-guided over bitnet158's Python code.

    python tests/fuzz/run_fuzz.py TARGET [libFuzzer flags and corpus directories]
    python tests/fuzz/run_fuzz.py TARGET CRASH_FILE           # re-run one input

TARGET is one of gguf, native, hf, serve (fuzz_targets.py). libFuzzer writes new inputs into
the first corpus directory and a crashing input to `-artifact_prefix`crash-<sha1>; `make fuzz`
passes both. Half of the mutations are structure-aware (fuzz_mutators.py: JSON values and GGUF header
entries replaced by values of other types or extreme ones), half libFuzzer's byte mutations.
Native code (the extension) is not instrumented: a fault there still kills the process, and
libFuzzer reports it with the input.
"""

from __future__ import annotations

import gc
import sys
import types
import warnings
from pathlib import Path

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fuzz_mutators  # noqa: E402
import fuzz_targets  # noqa: E402

DICTIONARY = Path(__file__).resolve().parent / "fuzz.dict"


def instrument_package(prefix: str = "bitnet158") -> int:
    """Coverage instrumentation of every loaded function of the package (not of numpy & co:
    atheris.instrument_all would take a minute; instrument_imports misses the editable
    install's import hook). Returns how many functions."""
    funcs = [
        obj
        for obj in gc.get_objects()
        if isinstance(obj, types.FunctionType)
        and (getattr(obj, "__module__", None) or "").split(".")[0] == prefix
    ]
    for func in funcs:
        atheris.instrument_func(func)
    return len(funcs)


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1].startswith("-"):
        raise SystemExit(__doc__)
    warnings.simplefilter("ignore")  # numpy's overflow/NaN warnings on garbage weights: noise
    target = fuzz_targets.make(sys.argv[1])
    count = instrument_package()
    print(f"INFO: bitnet158: {count} functions instrumented", file=sys.stderr)
    flags = [f"-dict={DICTIONARY}"] if not any(a.startswith("-dict=") for a in sys.argv) else []
    # atheris.Mutate is looked up per call: atheris binds it to libFuzzer when Fuzz() starts
    mutator = fuzz_mutators.custom_mutator(sys.argv[1], lambda d, n: atheris.Mutate(d, n))
    atheris.Setup([sys.argv[0], *flags, *sys.argv[2:]], target, custom_mutator=mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
