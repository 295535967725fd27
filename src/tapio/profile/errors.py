"""ProfileError: one error, located by a dotted path, so an operator can fix the exact line."""

from __future__ import annotations


class ProfileError(ValueError):
    """A profile that cannot be served. ``path`` is dotted (``overrides.network.rtt_spike.ratio``),
    with ``[i]`` for list elements, and empty for document-level problems."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)
