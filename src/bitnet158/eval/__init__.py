"""Measuring models: perplexity.py (sliding-window perplexity), harness.py (the
lm-evaluation-harness adapter, `--model bitnet158`), efficiency.py (memory, latency,
throughput and energy of BitNet b1.58 against an fp16 LLaMA, the paper's Tables 1 and 3 and
Figures 2 and 3), scoring.py (token log-probabilities on the engine or the torch reference).

The engine paths import no torch; `backend="torch"` runs the reference model.
"""
