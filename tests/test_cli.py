"""The console script's argument parsing."""

from __future__ import annotations

import pytest

from lmc_transfer.cli import SUBCOMMANDS, build_parser


def test_demo_runs_without_a_config_and_the_daemon_commands_require_one(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    assert parser.parse_args(["demo"]).config is None
    assert parser.parse_args(["demo", "--config", "c.yaml"]).config == "c.yaml"
    for name in sorted(set(SUBCOMMANDS) - {"demo"}):
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([name])
        assert exc.value.code == 2
        assert "the following arguments are required: --config" in capsys.readouterr().err
