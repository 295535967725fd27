"""Operator CLI and MCP server over the file sink's occurrence directory.

Lean on purpose: only the standard library, msgspec and :mod:`tapio.occurrence` are imported, so
``python -m tapio status`` starts fast on a node and never pulls in the controller, aiohttp,
YAML or Prometheus.
"""
