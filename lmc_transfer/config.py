"""The YAML configuration: one frozen dataclass, validated on load.

Key names follow LMCache where they mean the same thing (``chunk_size``,
``max_local_cpu_size``, ``local_disk``, ``max_local_disk_size``, ``mp_host``,
``mp_port``), so the relevant part of an LMCache file carries over. Sizes are in
GB (1024**3 bytes, as LMCache counts them) except ``staging_buffer_size`` (MB).
Unknown keys are rejected with a did-you-mean hint, and every error names the
source file, the key and the offending value.

Daemon endpoint (``mp_url``): ``ipc://<mp_socket>`` when ``mp_socket`` is set;
else ``tcp://<mp_host>:<mp_port>`` when either of those is set (the other
defaults to 127.0.0.1 / 5555, so an LMCache file keeps its tcp endpoint); else
the ipc socket ``default_mp_socket()``: ``$XDG_RUNTIME_DIR/lmc-transfer/daemon.sock``
when XDG_RUNTIME_DIR is set, otherwise ``<system temp dir>/lmc-transfer-<uid>/daemon.sock``.
The default is resolved from the environment of each process, so a daemon and
engines started with different XDG_RUNTIME_DIR/TMPDIR must set ``mp_socket``.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import ipaddress
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import yaml

GB = 1024**3
MB = 1024**2


class Mode(str, enum.Enum):
    MP = "mp"
    IP = "ip"


class ConfigError(ValueError):
    """A configuration value or file that cannot be used; the message names file and key."""


DEFAULT_MP_HOST = "127.0.0.1"
DEFAULT_MP_PORT = 5555

#: Names accepted by ``transfer_path`` (lmc_transfer.transfer.paths.TransferPath values).
TRANSFER_PATHS = ("auto", "zero_copy", "staged")

_Check = Callable[[Any], Any]


class _BadValue(Exception):
    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


def _int(minimum: int, maximum: int | None = None) -> _Check:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum or (maximum is not None and v > maximum):
            raise _BadValue(f"an integer in [{minimum}, {maximum}]" if maximum is not None else f"an integer >= {minimum}")
        return v

    return check


def _number(*, positive: bool) -> _Check:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (positive and v == 0):
            raise _BadValue("a positive number" if positive else "a number >= 0")
        return float(v)

    return check


def _optional(inner: _Check) -> _Check:
    def check(v: Any) -> Any:
        return None if v is None else inner(v)

    return check


def _string(v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise _BadValue("a non-empty string")
    return v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _BadValue("true or false")
    return v


def _mode(v: Any) -> Mode:
    names = [m.value for m in Mode]
    if not isinstance(v, str) or v.lower() not in names:
        raise _BadValue("one of " + ", ".join(names))
    return Mode(v.lower())


def _transfer_path(v: Any) -> str:
    if v not in TRANSFER_PATHS:
        raise _BadValue("one of " + ", ".join(TRANSFER_PATHS))
    return v


def _disk_path(v: Any) -> str:
    """A directory path, or a ``file://`` URL as LMCache writes it."""
    v = _string(v)
    if "://" in v:
        if not v.startswith("file://"):
            raise _BadValue("a directory path or a file:// URL")
        v = v.removeprefix("file://")
        if not v:
            raise _BadValue("a directory path or a file:// URL")
    return v


#: URL schemes lmc_transfer.tiers.remote accepts (redis-py's, plus cluster variants).
REMOTE_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
_TLS_SCHEMES = ("rediss://", "rediss+cluster://")


def _remote_url(v: Any) -> str:
    v = _string(v)
    if not v.startswith(REMOTE_SCHEMES) or v in REMOTE_SCHEMES:
        raise _BadValue("a URL starting with one of " + ", ".join(REMOTE_SCHEMES))
    return v


def _existing_file(v: Any) -> str:
    v = _string(v)
    if not os.path.isfile(v):
        raise _BadValue("the path of an existing file")
    return v


def _f(default: Any, check: _Check) -> Any:
    return field(default=default, metadata={"check": check})


@dataclass(frozen=True)
class LMCTransferConfig:
    mode: Mode = _f(Mode.IP, _mode)
    chunk_size: int = _f(256, _int(1))
    max_local_cpu_size: float = _f(5.0, _number(positive=True))  # GB
    local_disk: str | None = _f(None, _optional(_disk_path))
    max_local_disk_size: float = _f(0.0, _number(positive=False))  # GB; 0 = no disk tier
    mp_host: str | None = _f(None, _optional(_string))  # set host or port: tcp (see module docstring)
    mp_port: int | None = _f(None, _optional(_int(1, 65535)))
    mp_socket: str | None = _f(None, _optional(_string))  # ipc path; wins over host/port
    mp_auth_token: str | None = _f(None, _optional(_string))
    lookup_timeout_ms: int = _f(200, _int(1))
    request_timeout_ms: int = _f(1000, _int(1))
    lease_ttl_s: float = _f(30.0, _number(positive=True))
    disk_flush_interval_s: float = _f(1.0, _number(positive=True))
    transfer_path: str = _f("auto", _transfer_path)
    staging_buffer_size: int = _f(64, _int(1))  # MB
    max_programs: int | None = _f(None, _optional(_int(1)))
    layer_signals: bool = _f(True, _bool)  # zero-copy layerwise loads: one launch + per-layer device counters
    allow_remote_tcp: bool = _f(False, _bool)
    # Remote tier (Redis/Valkey, lmc_transfer.tiers.remote); off unless remote_url is set.
    remote_url: str | None = _f(None, _optional(_remote_url))
    remote_timeout_ms: int = _f(50, _int(1))  # per remote operation; a LOOKUP may add this much
    remote_ttl_s: float | None = _f(None, _optional(_number(positive=True)))
    max_remote_size: float = _f(0.0, _number(positive=False))  # GB per namespace; 0 = no budget
    remote_queue: int = _f(64, _int(1))  # chunks waiting for the write-behind
    remote_username: str | None = _f(None, _optional(_string))
    remote_password: str | None = _f(None, _optional(_string))
    remote_tls_ca: str | None = _f(None, _optional(_existing_file))
    remote_tls_cert: str | None = _f(None, _optional(_existing_file))
    remote_tls_key: str | None = _f(None, _optional(_existing_file))

    @property
    def max_local_cpu_bytes(self) -> int:
        return int(self.max_local_cpu_size * GB)

    @property
    def max_local_disk_bytes(self) -> int:
        return int(self.max_local_disk_size * GB)

    @property
    def max_remote_bytes(self) -> int | None:
        """The remote tier's byte budget per namespace, None for no budget."""
        return int(self.max_remote_size * GB) or None

    @property
    def staging_bytes(self) -> int:
        return self.staging_buffer_size * MB

    @property
    def uses_tcp(self) -> bool:
        return self.mp_socket is None and (self.mp_host is not None or self.mp_port is not None)

    @property
    def tcp_host(self) -> str:
        return self.mp_host if self.mp_host is not None else DEFAULT_MP_HOST

    @property
    def mp_ipc_path(self) -> str | None:
        """The daemon's socket path when the endpoint is ipc (set or default), else None."""
        if self.uses_tcp:
            return None
        return self.mp_socket if self.mp_socket is not None else default_mp_socket()

    @property
    def mp_url(self) -> str:
        """The daemon's ZMQ endpoint (see the module docstring for the rules)."""
        if not self.uses_tcp:
            return f"ipc://{self.mp_ipc_path}"
        host = f"[{self.tcp_host}]" if ":" in self.tcp_host else self.tcp_host
        return f"tcp://{host}:{self.mp_port if self.mp_port is not None else DEFAULT_MP_PORT}"

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, source: str = "<dict>") -> "LMCTransferConfig":
        """Validate a mapping of YAML keys; ``None`` (an empty file) means all defaults."""
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{source}: expected a mapping of config keys at the top level, got {type(data).__name__}")
        fields = {f.name: f for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in fields:
                hint = difflib.get_close_matches(str(key), list(fields), n=1)
                suffix = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(fields)}"
                raise ConfigError(f"{source}: unknown key {key!r}{suffix}")
            try:
                values[key] = fields[key].metadata["check"](value)
            except _BadValue as bad:
                raise ConfigError(f"{source}: {key}: expected {bad.expected}, got {value!r}") from None
        config = cls(**values)
        config._check_combination(source)
        return config

    def _check_combination(self, source: str) -> None:
        if self.max_local_disk_size > 0 and self.local_disk is None:
            raise ConfigError(
                f"{source}: max_local_disk_size: {self.max_local_disk_size} GB of disk tier needs local_disk to be set, got no local_disk"
            )
        self._check_remote(source)
        if self.uses_tcp and not self.allow_remote_tcp and not _is_loopback(self.tcp_host):
            raise ConfigError(
                f"{source}: mp_host: expected a loopback address (set allow_remote_tcp: true to allow others), got {self.mp_host!r}"
            )


    def _check_remote(self, source: str) -> None:
        needs_url = [
            f.name
            for f in dataclasses.fields(self)
            if f.name.startswith(("remote_", "max_remote_")) and f.name != "remote_url" and getattr(self, f.name) != f.default
        ]
        if self.remote_url is None:
            if needs_url:
                name = needs_url[0]
                shown = "<hidden>" if name == "remote_password" else repr(getattr(self, name))
                raise ConfigError(f"{source}: {name}: {shown} needs remote_url to be set, got no remote_url")
            return
        tls = [n for n in ("remote_tls_ca", "remote_tls_cert", "remote_tls_key") if getattr(self, n) is not None]
        if tls and not self.remote_url.startswith(_TLS_SCHEMES):
            raise ConfigError(f"{source}: {tls[0]}: TLS settings need a rediss:// or rediss+cluster:// remote_url, got {self.remote_url!r}")
        if (self.remote_tls_cert is None) != (self.remote_tls_key is None):
            given = "remote_tls_cert" if self.remote_tls_cert is not None else "remote_tls_key"
            raise ConfigError(f"{source}: {given}: a client certificate needs both remote_tls_cert and remote_tls_key, got only {given}")
        if self.remote_timeout_ms >= self.lookup_timeout_ms:
            raise ConfigError(
                f"{source}: remote_timeout_ms: must be below lookup_timeout_ms ({self.lookup_timeout_ms}) so a slow remote "
                f"stays a miss instead of a client timeout, got {self.remote_timeout_ms}"
            )


def default_mp_socket() -> str:
    """The ipc socket used when the config names no endpoint (module docstring)."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "lmc-transfer", "daemon.sock")
    return os.path.join(tempfile.gettempdir(), f"lmc-transfer-{os.getuid()}", "daemon.sock")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(path: str | os.PathLike[str]) -> LMCTransferConfig:
    """Read and validate a YAML config file; raises ConfigError (a ValueError) naming the file."""
    source = os.fspath(path)
    try:
        with open(source, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {exc}") from None
    return LMCTransferConfig.from_dict(data, source=source)
