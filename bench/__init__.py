"""Benchmarks: the worker against llama.cpp's llama-bench on the same GGUF file and device (see bench/README.md)."""
