"""Sinks: where occurrences leave the node. Each runs in its own task behind a bounded stream."""
