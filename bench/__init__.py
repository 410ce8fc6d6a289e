"""Benchmarks: router cost by mode, TCP throughput, flow setup latency and
agent cost, measured in the built-in lab (`python -m bench`)."""
