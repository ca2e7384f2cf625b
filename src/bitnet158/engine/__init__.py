"""Torch-free inference: numpy for the glue, `bitnet158._native` for every ternary matmul.

model.py (weights + forward), kv_cache.py, sampling.py, generate.py (prefill, decode, text
streaming with stop strings), kernels.py (the call into the native extension).
"""
