"""The CI rule itself (tests/conftest.py): with CI=true a skip fails the run
with a readable summary line; without CI it stays a skip; xfail is untouched."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]

# The inner runs load the real hooks from tests/conftest.py, not a copy.
CONFTEST = "from tests.conftest import pytest_make_collect_report, pytest_runtest_makereport\n"

TESTS = """
import pytest

def test_skips():
    pytest.skip("needs a thing")

@pytest.mark.skipif(True, reason="marked away")
def test_skipif():
    pass

@pytest.fixture
def missing():
    pytest.skip("fixture cannot run")

def test_skip_in_fixture(missing):
    pass

@pytest.mark.xfail(reason="known bug")
def test_xfails():
    assert False

@pytest.mark.xfail(reason="fixed meanwhile")
def test_xpasses():
    pass

def test_passes():
    pass
"""


@pytest.fixture
def inner(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_inner=TESTS)
    return pytester


def test_ci_turns_each_skip_into_a_readable_failure(inner: pytest.Pytester,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    result = inner.runpytest("-ra")
    # A skip in setup (skipif, a fixture) fails the setup: pytest calls that an error.
    result.assert_outcomes(failed=1, errors=2, passed=1, xfailed=1, xpassed=1)
    assert result.ret == pytest.ExitCode.TESTS_FAILED
    result.stdout.fnmatch_lines([
        "XFAIL test_inner.py::test_xfails - known bug",
        "XPASS test_inner.py::test_xpasses - fixed meanwhile",
        "ERROR test_inner.py::test_skipif - skipped under CI=true: marked away",
        "ERROR test_inner.py::test_skip_in_fixture - skipped under CI=true: fixture cannot run",
        "FAILED test_inner.py::test_skips - skipped under CI=true: needs a thing",
    ])
    # A normal end: no internal error from pytest's own summary code.
    assert "INTERNALERROR" not in result.stdout.str()
    result.stdout.fnmatch_lines(["*1 failed, 1 passed, 1 xfailed, 1 xpassed, 2 errors in *"])


def test_without_ci_a_skip_stays_a_skip(inner: pytest.Pytester,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    result = inner.runpytest("-ra")
    result.assert_outcomes(skipped=3, passed=1, xfailed=1, xpassed=1)
    assert result.ret == pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["SKIPPED [[]1[]] test_inner.py:*: needs a thing"])


def test_ci_false_is_not_ci(inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "false")
    inner.runpytest().assert_outcomes(skipped=3, passed=1, xfailed=1, xpassed=1)


def test_ci_fails_a_module_level_skip(pytester: pytest.Pytester,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CI", "true")
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_gone="""
import pytest
pytest.skip("whole module away", allow_module_level=True)

def test_never_runs():
    pass
""")
    result = pytester.runpytest("-ra")
    assert result.ret != pytest.ExitCode.OK
    result.stdout.fnmatch_lines(["ERROR test_gone.py - skipped under CI=true: whole module away"])


def test_ci_runs_the_readmes_test_command() -> None:
    """.ci/run runs the README's test command as it is written there."""
    from tests.conftest import ROOT

    readme = (ROOT / "README.md").read_text()
    command = next(line.strip() for line in readme.splitlines()
                   if "scripts/setup-kernel-lane.sh && python3 -m pytest" in line)
    pytest_command = command.rsplit("&& ", 1)[1]
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert pytest_command in ci, (pytest_command, ci)
