"""The suite-wide skip policy (tests/conftest.py), run on a throw-away test suite."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT_CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"

SUITE = """
import pytest

def test_runs():
    assert True

def test_skips_in_body():
    pytest.skip("no widget here")

@pytest.mark.skipif(True, reason="widget missing")
def test_skipif_mark():
    pass

@pytest.fixture
def widget():
    pytest.skip("fixture found no widget")

def test_skips_in_fixture(widget):
    pass

@pytest.mark.allow_skip(reason="the widget exists only on arm64 hosts")
def test_allowed():
    pytest.skip("not arm64")

@pytest.mark.allow_skip(reason="  ")
def test_allowed_without_reason():
    pytest.skip("nothing to say")

@pytest.mark.xfail(reason="known bug", strict=True)
def test_xfail():
    assert False
"""


#: The inner suites' own configuration: the marker, and pytest-asyncio's loop scope as the
#: project sets it (unset, the plugin warns in every inner run).
INI = (
    "[pytest]\nmarkers =\n    allow_skip(reason): may skip under CI\naddopts = --strict-markers\n"
    "asyncio_default_fixture_loop_scope = function\n"
)


@pytest.fixture
def suite(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(ROOT_CONFTEST.read_text())
    pytester.makeini(INI)
    pytester.makepyfile(test_suite=SUITE)
    return pytester


def test_under_ci_every_unaccepted_skip_fails(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CI", "true")
    result = suite.runpytest("-rfs")
    # A skip in the setup phase (a skipif mark, a fixture) is reported as a setup error.
    result.assert_outcomes(passed=1, failed=2, errors=2, skipped=1, xfailed=1)
    reports = result.reprec.getreports("pytest_runtest_logreport")  # type: ignore[attr-defined]
    failed = {r.nodeid.split("::")[-1]: r for r in reports if r.failed}
    assert set(failed) == {
        "test_skips_in_body",
        "test_skipif_mark",
        "test_skips_in_fixture",
        "test_allowed_without_reason",
    }
    # The failure keeps the original reason and says what would make the skip acceptable.
    assert "no widget here" in str(failed["test_skips_in_body"].longrepr)
    assert "widget missing" in str(failed["test_skipif_mark"].longrepr)
    assert "fixture found no widget" in str(failed["test_skips_in_fixture"].longrepr)
    assert "gives no reason" in str(failed["test_allowed_without_reason"].longrepr)
    assert "allow_skip(reason=...)" in str(failed["test_skips_in_body"].longrepr)


def test_without_ci_skips_stay_skips(
    suite: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("CI", raising=False)
    result = suite.runpytest()
    result.assert_outcomes(passed=1, skipped=5, xfailed=1)


def test_a_module_skipped_at_collection_fails_under_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makeconftest(ROOT_CONFTEST.read_text())
    pytester.makeini(INI)
    pytester.makepyfile(
        test_gone='import pytest\npytest.skip("no gadget", allow_module_level=True)\n'
    )
    monkeypatch.setenv("CI", "true")
    result = pytester.runpytest()
    assert result.ret != 0
    result.stdout.fnmatch_lines(["*module skipped at collection under CI: no gadget*"])
