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
import math
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


# Upper bounds: values past them are typos (or .inf) that the daemon would accept and then
# fail on at every request (timeouts past a C int of milliseconds, pools no machine has).
_MAX_MS = 3_600_000  # one hour
_MAX_SECONDS = 86_400.0  # one day
_MAX_RAM_GB = 65_536.0  # 64 TiB
_MAX_STORAGE_GB = 1_048_576.0  # 1 PiB


def _int(minimum: int, maximum: int) -> _Check:
    def check(v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise _BadValue(f"an integer >= {minimum}")
        if v > maximum:
            raise _BadValue(f"an integer in [{minimum}, {maximum}]")
        return v

    return check


def _number(*, positive: bool, maximum: float) -> _Check:
    def check(v: Any) -> float:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0 or (positive and v == 0):
            raise _BadValue("a positive number" if positive else "a number >= 0")
        if not math.isfinite(v) or v > maximum:
            raise _BadValue(f"a finite number <= {maximum:.0f}")
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


def _hidden(value: Any) -> str:
    """A secret for an error message: its type only, when that is not the expected str."""
    return "<hidden>" if isinstance(value, str) else f"<hidden {type(value).__name__}>"


def _shown_url(value: Any) -> str:
    """A URL without its secrets (redact_url); a value that is no URL string only by its type."""
    if isinstance(value, str):
        return repr(redact_url(value))
    return repr(value) if isinstance(value, (int, float)) else _hidden(value)


def _f(default: Any, check: _Check, *, shown: Callable[[Any], str] = repr) -> Any:
    """A config field; ``shown`` is how an error message may show its value (secrets: hidden)."""
    return field(default=default, metadata={"check": check, "shown": shown})


@dataclass(frozen=True)
class LMCTransferConfig:
    mode: Mode = _f(Mode.IP, _mode)
    chunk_size: int = _f(256, _int(1, 1 << 20))
    max_local_cpu_size: float = _f(5.0, _number(positive=True, maximum=_MAX_RAM_GB))  # GB
    local_disk: str | None = _f(None, _optional(_disk_path))
    max_local_disk_size: float = _f(0.0, _number(positive=False, maximum=_MAX_STORAGE_GB))  # GB; 0 = no disk tier
    mp_host: str | None = _f(None, _optional(_string))  # set host or port: tcp (see module docstring)
    mp_port: int | None = _f(None, _optional(_int(1, 65535)))
    mp_socket: str | None = _f(None, _optional(_string))  # ipc path; wins over host/port
    mp_auth_token: str | None = _f(None, _optional(_string), shown=_hidden)
    lookup_timeout_ms: int = _f(200, _int(1, _MAX_MS))
    request_timeout_ms: int = _f(1000, _int(1, _MAX_MS))
    lease_ttl_s: float = _f(30.0, _number(positive=True, maximum=_MAX_SECONDS))
    disk_flush_interval_s: float = _f(1.0, _number(positive=True, maximum=3600.0))
    transfer_path: str = _f("auto", _transfer_path)
    staging_buffer_size: int = _f(64, _int(1, 1 << 16))  # MB
    max_programs: int | None = _f(None, _optional(_int(1, 1 << 16)))
    layer_signals: bool = _f(True, _bool)  # zero-copy layerwise loads: one launch + per-layer device counters
    allow_remote_tcp: bool = _f(False, _bool)
    # Remote tier (Redis/Valkey, lmc_transfer.tiers.remote); off unless remote_url is set.
    remote_url: str | None = _f(None, _optional(_remote_url), shown=_shown_url)  # may carry a password
    remote_timeout_ms: int = _f(50, _int(1, _MAX_MS))  # per remote operation; a LOOKUP may add this much
    remote_ttl_s: float | None = _f(None, _optional(_number(positive=True, maximum=365 * _MAX_SECONDS)))
    max_remote_size: float = _f(0.0, _number(positive=False, maximum=_MAX_STORAGE_GB))  # GB per namespace; 0 = no budget
    remote_queue: int = _f(64, _int(1, 1 << 20))  # chunks waiting for the write-behind
    remote_connections: int = _f(4, _int(1, 64))  # connections one fetch reads over in parallel
    # The remote cost rule (lmc_transfer.tiers.remote_cost): a prefix is fetched only when that is
    # estimated faster than recomputing it at 2 * params FLOP per token on the engine's GPU.
    remote_recompute_tflops: float = _f(500.0, _number(positive=True, maximum=1e5))  # effective prefill rate of one GPU
    remote_model_params_b: float | None = _f(None, _optional(_number(positive=True, maximum=1e5)))  # per TP rank; None: from geometry
    remote_username: str | None = _f(None, _optional(_string))
    remote_password: str | None = _f(None, _optional(_string), shown=_hidden)
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
        values: dict[str, Any] = {}
        for key, value in data.items():
            if key not in _FIELDS:
                hint = difflib.get_close_matches(str(key), list(_FIELDS), n=1)
                suffix = f"; did you mean {hint[0]!r}?" if hint else f"; known keys: {', '.join(_FIELDS)}"
                raise ConfigError(f"{source}: unknown key {key!r:.80}{suffix}")
            try:
                values[key] = _FIELDS[key].metadata["check"](value)
            except _BadValue as bad:
                raise ConfigError(f"{source}: {key}: expected {bad.expected}, got {_shown(key, value)}") from None
        config = cls(**values)
        config._check_combination(source)
        return config

    def _check_combination(self, source: str) -> None:
        if self.max_local_disk_size > 0 and self.local_disk is None:
            raise ConfigError(
                f"{source}: max_local_disk_size: {self.max_local_disk_size} GB of disk tier needs local_disk to be set, got no local_disk"
            )
        if self.mode is Mode.IP and self.local_disk is not None:
            raise ConfigError(
                f"{source}: local_disk: the disk tier lives in the cache daemon (mode: mp) and mode: ip would ignore it; "
                f"set mode: mp or remove local_disk, got local_disk {self.local_disk!r} with mode: ip"
            )
        self._check_remote(source)
        if self.uses_tcp and not self.allow_remote_tcp and not is_loopback(self.tcp_host):
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
                shown = _shown(name, getattr(self, name))
                raise ConfigError(f"{source}: {name}: {shown} needs remote_url to be set, got no remote_url")
            return
        tls = [n for n in ("remote_tls_ca", "remote_tls_cert", "remote_tls_key") if getattr(self, n) is not None]
        if tls and not self.remote_url.startswith(_TLS_SCHEMES):
            raise ConfigError(
                f"{source}: {tls[0]}: TLS settings need a rediss:// or rediss+cluster:// remote_url, "
                f"got {redact_url(self.remote_url)!r}"
            )
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


_FIELDS = {f.name: f for f in dataclasses.fields(LMCTransferConfig)}


def _shown(name: str, value: Any) -> str:
    return _FIELDS[name].metadata["shown"](value)


def redact_url(url: str) -> str:
    """``url`` for messages and logs: the user info's password and every query value hidden."""
    scheme, sep, rest = url.partition("://")
    rest, _, _fragment = rest.partition("#")
    rest, qmark, query = rest.partition("?")
    userinfo, at, hostpath = rest.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        rest = f"{user}:***@{hostpath}" if colon else f"***@{hostpath}"
    if qmark:
        names = [part.partition("=")[0] for part in query.split("&") if part]
        rest += "?" + "&".join(f"{name}=***" for name in names)
    return f"{scheme}{sep}{rest}"


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (the only hosts TCP may bind by default)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_config(path: str | os.PathLike[str]) -> LMCTransferConfig:
    """Read and validate a YAML config file; raises ConfigError (a ValueError) naming the file.

    Every error is one line: the file, then what is wrong with it."""
    source = os.fspath(path)
    try:
        with open(source, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{source}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{source}: is a directory, expected a YAML file") from None
    except OSError as exc:
        raise ConfigError(f"{source}: cannot read the config file: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source}: not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source}: not valid YAML: {_yaml_problem(exc)}") from None
    return LMCTransferConfig.from_dict(data, source=source)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """One line for a YAML error (PyYAML's own message spans several, with a snippet)."""
    mark = getattr(exc, "problem_mark", None)
    if mark is None:  # a reader error (a character YAML does not allow): its first line says it all
        position = getattr(exc, "position", None)
        return str(exc).splitlines()[0] + (f" at offset {position}" if position is not None else "")
    return f"{getattr(exc, 'problem', None) or type(exc).__name__} at line {mark.line + 1}, column {mark.column + 1}"
