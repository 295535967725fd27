"""Tapio: a small eBPF node agent that emits named kernel anomaly evidence."""

__version__ = "0.1.0"
