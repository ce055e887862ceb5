"""``lmc-transfer`` console script.

    lmc-transfer server --config F   run the MP cache daemon (foreground)
    lmc-transfer stats  --config F   print the daemon's counters
    lmc-transfer ping   --config F   exit 0 if the daemon answers in time, 1 otherwise
    lmc-transfer demo   [--config F] the end-to-end demo (default: the example MP config)

A subcommand is one ``_cmd_*`` function taking the parsed arguments and returning
the exit status, plus one entry in ``SUBCOMMANDS``; ``add_arguments`` (optional)
declares its extra flags.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass
from typing import Callable

from lmc_transfer.config import load_config
from lmc_transfer.daemon.messages import Body, PingReply, PingRequest, RequestBody, StatsReply, StatsRequest
from lmc_transfer.store.mp_client import DaemonConnection, DaemonError, DaemonUnavailable


@dataclass(frozen=True)
class Subcommand:
    help: str
    run: Callable[[argparse.Namespace], int]
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    config_required: bool = True


def _call(args: argparse.Namespace, message: RequestBody) -> Body:
    conn = DaemonConnection.for_config(load_config(args.config))
    try:
        return conn.call(message, deadline=time.monotonic() + args.timeout_ms / 1000)
    finally:
        conn.close()


def _cmd_server(args: argparse.Namespace) -> int:
    from lmc_transfer.daemon.instance import AlreadyRunning
    from lmc_transfer.daemon.server import serve

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(load_config(args.config))
    except (AlreadyRunning, OSError) as exc:  # taken endpoint, unsafe directory, port in use
        print(f"lmc-transfer server: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_stats(args: argparse.Namespace) -> int:
    stats: StatsReply = _call(args, StatsRequest())  # type: ignore[assignment]
    if args.json:
        print(json.dumps(stats.encode(), indent=2, sort_keys=True))
        return 0
    counters, pool, disk = stats.counters, stats.pool, stats.disk
    rows = [
        ("endpoint", stats.endpoint),
        ("pid", stats.pid),
        ("segment", stats.segment or "(no pool yet: waiting for the first HELLO)"),
        ("clients", stats.clients),
        ("chunks", f"{pool.committed_chunks} / {pool.num_slabs} slabs" if pool else "0 / 0 slabs"),
        ("bytes", pool.committed_bytes if pool else 0),
        ("pinned slabs", pool.pinned_slabs if pool else 0),
        ("leases / reservations", f"{pool.leases} / {pool.reservations}" if pool else "0 / 0"),
        ("hit rate", f"{stats.hit_rate:.3f} ({counters.hit_chunks} hit, {counters.miss_chunks} missed chunks)"),
        ("lookups", counters.lookups),
        ("committed chunks", counters.committed_chunks),
        ("evictions", pool.evictions if pool else 0),
        ("requests / errors", f"{counters.requests} / {counters.errors}"),
        ("disk usage", f"{disk.get('bytes')} / {disk.get('max_bytes')} bytes, {disk.get('files')} files" if disk else "off"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


def _client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout-ms", type=int, default=1000, help="how long to wait for the daemon (default 1000)")


def _stats_arguments(parser: argparse.ArgumentParser) -> None:
    _client_arguments(parser)
    parser.add_argument("--json", action="store_true", help="print the raw STATS reply as JSON")


def _server_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR (default INFO)")


def _cmd_ping(args: argparse.Namespace) -> int:
    start = time.monotonic()
    reply: PingReply = _call(args, PingRequest())  # type: ignore[assignment]
    print(f"ok: pid {reply.pid} answered in {(time.monotonic() - start) * 1000:.1f} ms")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from lmc_transfer.demo import run as demo

    return demo.run_demo(demo.settings_from_args(args))


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from lmc_transfer.demo import run as demo

    demo.add_arguments(parser)


SUBCOMMANDS: dict[str, Subcommand] = {
    "server": Subcommand("run the MP cache daemon in the foreground", _cmd_server, _server_arguments),
    "stats": Subcommand("print the daemon's counters", _cmd_stats, _stats_arguments),
    "ping": Subcommand("exit 0 if the daemon answers within --timeout-ms (liveness probe)", _cmd_ping,
                       _client_arguments),
    # The demo has a default config (the example MP one on a private socket).
    "demo": Subcommand("end-to-end demo: a toy engine serving multi-turn chats through the cache", _cmd_demo,
                       _demo_arguments, config_required=False),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmc-transfer", description="lmc-transfer KV cache tools")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=command.help)
        p.add_argument("--config", required=command.config_required, default=None,
                       help="YAML config file" + ("" if command.config_required else
                                                  " (default: configs/example_config_mp.yaml)"))
        if command.add_arguments is not None:
            command.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return SUBCOMMANDS[args.command].run(args)
    except ValueError as exc:  # a bad config (ConfigError) or a bad argument value
        print(f"lmc-transfer {args.command}: {exc}", file=sys.stderr)
        return 2
    except (DaemonUnavailable, DaemonError) as exc:
        print(f"lmc-transfer {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
