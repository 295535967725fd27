"""Controller mode loads aiohttp's client (and yarl) only when it opens a session.

``import aiohttp`` builds the client's default TLS contexts, a few hundred milliseconds of the
agent's start-up that a node without a controller should not pay and that controller mode pays
once, when its first session is built.
"""

from __future__ import annotations

import subprocess
import sys

PROBE = """
import sys
import tapio.agent.controller_mode, tapio.sinks.controller, tapio.agent.controller_client
import tapio.transport, tapio.sinks.delivery
print(sorted(m for m in ("aiohttp", "yarl") if m in sys.modules))
from tapio.transport import client_session, parse_endpoint
url = parse_endpoint("http://127.0.0.1:1", what="probe")
import asyncio
async def build():
    session = client_session(ssl_context=None, connect_timeout=1.0, timeout=1.0)
    await session.close()
    return type(session).__module__
print(asyncio.run(build()), type(url).__module__)
"""


def test_controller_mode_imports_no_http_client_until_a_session_is_built() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=60, check=True
    ).stdout.splitlines()
    assert out[0] == "[]"
    assert out[1] == "aiohttp.client yarl"
