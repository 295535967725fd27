"""Suite-wide rules: under CI a skipped test is a failed test unless it says why it may skip.

A skip hides a test that did not run; locally that is a convenience (no root, no BPF objects
built), in CI it is a hole a green run can fall through. With ``CI`` set to ``true`` (or ``1``
or ``yes``), every skip — a ``skip``/``skipif`` mark, ``pytest.skip()`` in a test or fixture,
or a module skipped at collection — is reported as a failure, with the original reason, unless
the test carries ``@pytest.mark.allow_skip(reason="...")`` with a non-empty reason that says
why skipping is legitimate even in CI. Expected failures (``xfail``) are not skips and are left
alone.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Generator
from typing import Any

import pytest

# A suite started in the background of a non-interactive shell (`cmd &`, nohup) inherits SIGINT
# ignored, and an ignored disposition survives exec: every process a test starts would then
# ignore the SIGINT the test stops it with (Python installs no KeyboardInterrupt handler over an
# inherited SIG_IGN). A handler, unlike SIG_IGN, is reset to the default in a child, so the
# children of this process see SIGINT as a terminal would deliver it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

pytest_plugins = ["pytester"]

CI_VALUES = ("1", "true", "yes")


def ci_enabled() -> bool:
    return os.environ.get("CI", "").strip().lower() in CI_VALUES


def _skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


def _allowed(item: pytest.Item) -> str | None:
    """The accepted reason for ``item`` to skip under CI, or None when it may not skip.

    A marker without a reason is not an acceptance: the reader must be told why.
    """
    marker = item.get_closest_marker("allow_skip")
    if marker is None:
        return None
    reason = marker.kwargs.get("reason", marker.args[0] if marker.args else "")
    return reason.strip() if isinstance(reason, str) and reason.strip() else None


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()
    if not report.skipped or hasattr(report, "wasxfail") or not ci_enabled():
        return
    if _allowed(item) is not None:
        return
    marker = item.get_closest_marker("allow_skip")
    why = (
        "its allow_skip marker gives no reason"
        if marker is not None
        else "mark it @pytest.mark.allow_skip(reason=...) only if skipping in CI is legitimate"
    )
    report.outcome = "failed"
    report.longrepr = f"skipped under CI ({why}): {_skip_reason(report)}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    outcome = yield
    report: pytest.CollectReport = outcome.get_result()
    if report.skipped and ci_enabled():
        report.outcome = "failed"
        report.longrepr = f"module skipped at collection under CI: {_skip_reason(report)}"
