"""Torch-free inference: numpy for the glue, `bitnet158._native` for the whole decoder step.

model.py (weights handed to the native step; prefill, decode, batched decode), kv_cache.py
(slotted KV cache), sampling.py, generate.py (prefill, decode, text streaming with stop
strings), kernels.py (threads, ISA, and one ternary projection on its own, for tests and tools).
"""
