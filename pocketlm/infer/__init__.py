"""Inference: the engine (prefill, decode, continuous batching, streaming), sampling, and the terminal front ends."""
