"""tapio-wire/v1 controller: registry, config distribution, event ingest (aiohttp).

Imported only by ``python -m tapio controller``; the node agent never imports this package.
"""

from __future__ import annotations

from tapio.controller.app import CONTROLLER_ID, Controller

__all__ = ["CONTROLLER_ID", "Controller"]
