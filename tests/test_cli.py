"""The console script's argument parsing."""

from __future__ import annotations

import pytest

from lmc_transfer.cli import SUBCOMMANDS, build_parser, main
from lmc_transfer.daemon.server import main as server_main


def test_demo_runs_without_a_config_and_the_daemon_commands_require_one(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert parser.parse_args(["demo"]).config is None
    assert parser.parse_args(["demo", "--config", "c.yaml"]).config == "c.yaml"
    for name in sorted(set(SUBCOMMANDS) - {"demo"}):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([name])
        assert exc.value.code == 2
        assert "the following arguments are required: --config" in capsys.readouterr().err


def test_each_subcommand_takes_only_the_flags_it_uses() -> None:
    parser = build_parser()
    assert parser.parse_args(["ping", "--config", "c", "--timeout-ms", "5"]).timeout_ms == 5
    assert parser.parse_args(["stats", "--config", "c", "--timeout-ms", "5", "--json"]).json is True
    assert parser.parse_args(["server", "--config", "c", "--log-level", "DEBUG"]).log_level == "DEBUG"
    for argv in (["server", "--config", "c", "--timeout-ms", "5"], ["ping", "--config", "c", "--log-level", "INFO"],
                 ["demo", "--timeout-ms", "5"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)


def test_a_bad_value_is_one_line_and_exit_status_2(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("chunk_size: 0\n")
    assert main(["ping", "--config", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"lmc-transfer ping: {bad}: chunk_size: expected an integer >= 1, got 0"
    assert main(["demo", "--turns", "0"]) == 2
    assert capsys.readouterr().err.startswith("lmc-transfer demo: ")
    assert server_main(["--config", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"python -m lmc_transfer.daemon: {bad}: chunk_size: expected an integer >= 1, got 0")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda d: d, "is a directory, expected a YAML file"),
        (lambda d: _write(d / "inf.yaml", b"lease_ttl_s: .inf\n"), "lease_ttl_s: expected a finite number <= 86400, got inf"),
        (lambda d: _write(d / "bad.yaml", b"chunk_size: [\n"), "not valid YAML: expected the node content"),
        (lambda d: _write(d / "latin1.yaml", b"mp_socket: caf\xe9\n"), "not UTF-8 text (byte 0xe9 at offset 14)"),
    ],
)
def test_an_unusable_config_file_is_one_line_and_exit_status_2(tmp_path, capsys: pytest.CaptureFixture[str], make,
                                                                message: str) -> None:
    path = make(tmp_path)
    for run, prog in ((lambda: main(["server", "--config", str(path)]), "lmc-transfer server"),
                      (lambda: main(["stats", "--config", str(path)]), "lmc-transfer stats"),
                      (lambda: server_main(["--config", str(path)]), "python -m lmc_transfer.daemon")):
        assert run() == 2
        err = capsys.readouterr().err
        assert len(err.splitlines()) == 1 and err.startswith(f"{prog}: {path}: {message}"), err


def _write(path, content: bytes):
    path.write_bytes(content)
    return path
