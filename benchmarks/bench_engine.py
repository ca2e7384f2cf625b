"""bitnet158's engine against llama.cpp (llama-cpp-python) and transformers, in one run.

Random-weight models of the microsoft/bitnet-b1.58-2B-4T and 1bitLLM 700M shapes, in our
format and as GGUF TQ2_0 / TQ1_0; prefill (pp) and decode (tg) tokens/s, peak RSS, load time,
the memory read bandwidth and each engine's decode roofline. Same as `bitnet158 bench`.

    python benchmarks/bench_engine.py [--shapes 2b4t,700m] [--threads 2] [--json out.json]

Needs the `bench` extra for the peers: pip install -e ".[bench]" (llama-cpp-python builds
llama.cpp from source).
"""

import sys

from bitnet158 import bench

if __name__ == "__main__":
    sys.exit(bench.main())
