"""vfsd's options: the command line, and /etc/vfs/vfsd.toml with the same keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.main import load_options, parse_size


def test_sizes() -> None:
    assert parse_size("512M") == 512 << 20
    assert parse_size("2G") == 2 << 30
    assert parse_size("0") == 0
    assert parse_size("1.5k") == 1536


def test_defaults() -> None:
    options = load_options([])
    assert options.encode_ahead == 32 << 20
    assert options.mount == "/pfs"
    assert options.read_ahead_kb == 1024
    assert options.lease_ttl == 30.0


def test_config_file_sets_what_the_command_line_does_not(tmp_path: Path) -> None:
    config = tmp_path / "vfsd.toml"
    config.write_text('chunk-cache-size = "8G"\nencode-ahead = "64M"\nread-ahead-kb = 512\n'
                      'poll-interval = 5.0\nlease-ttl = 12\n')
    options = load_options(["--config", str(config), "--read-ahead-kb", "2048"])
    assert options.chunk_cache_size == 8 << 30
    assert options.encode_ahead == 64 << 20
    assert options.poll_interval == 5.0
    assert options.lease_ttl == 12
    assert options.read_ahead_kb == 2048  # the command line wins


def test_config_file_errors_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "vfsd.toml"
    config.write_text("no-such-option = 1\n")
    with pytest.raises(SystemExit):
        load_options(["--config", str(config)])
    assert "unknown option 'no-such-option'" in capsys.readouterr().err
    config.write_text("this is not toml")
    with pytest.raises(SystemExit):
        load_options(["--config", str(config)])
    assert f"cannot read {config}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_options(["--encode-ahead", "lots"])
    assert "not a size" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_options(["--memory-cache-size=-1G"])
    assert "cannot be negative" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        load_options(["--encode-ahead", "4k"])
    assert "0 (off) or at least 1M" in capsys.readouterr().err


def test_datum_timeout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert load_options([]).datum_timeout == 3600
    assert load_options(["--datum-timeout", "10m"]).datum_timeout == 600
    assert load_options(["--datum-timeout", "90"]).datum_timeout == 90
    assert load_options(["--datum-timeout", "0"]).datum_timeout == 0  # no limit
    config = tmp_path / "vfsd.toml"
    config.write_text('datum-timeout = "2h"\n')
    assert load_options(["--config", str(config)]).datum_timeout == 7200
    assert load_options(["--config", str(config), "--datum-timeout", "0"]).datum_timeout == 0
    for bad in ("nan", "inf", "-5", "soon"):
        with pytest.raises(SystemExit):
            load_options(["--datum-timeout", bad])
        assert "--datum-timeout must be a positive duration" in capsys.readouterr().err
    config.write_text("datum-timeout = nan\n")
    with pytest.raises(SystemExit):
        load_options(["--config", str(config)])
    assert "--datum-timeout must be a positive duration" in capsys.readouterr().err


def test_the_default_config_file_may_be_missing() -> None:
    # The systemd unit always names /etc/vfs/vfsd.toml; without it vfsd still starts.
    if Path("/etc/vfs/vfsd.toml").exists():
        pytest.skip("this machine has a /etc/vfs/vfsd.toml")
    assert load_options(["--config", "/etc/vfs/vfsd.toml"]).config is None


def test_lease_ttl_bounds(capsys: pytest.CaptureFixture) -> None:
    assert load_options(["--lease-ttl", "3"]).lease_ttl == 3
    for bad in ("2", "nan", "100000"):
        with pytest.raises(SystemExit):
            load_options(["--lease-ttl", bad])
        assert "--lease-ttl: from 3 seconds to a day" in capsys.readouterr().err
