"""Config loading: example files, defaults, and the error message of each invalid case."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from lmc_transfer.config import GB, MB, ConfigError, LMCTransferConfig, Mode, default_mp_socket, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return path


def test_example_ip_config_loads() -> None:
    cfg = load_config(CONFIGS / "example_config_ip.yaml")
    assert cfg.mode is Mode.IP
    assert cfg.chunk_size == 256
    assert cfg.max_local_cpu_bytes == 5 * GB
    assert cfg.local_disk is None and cfg.max_local_disk_bytes == 0
    assert cfg.transfer_path == "auto" and cfg.staging_bytes == 64 * MB


def test_example_mp_config_loads() -> None:
    cfg = load_config(CONFIGS / "example_config_mp.yaml")
    assert cfg.mode is Mode.MP
    assert cfg.local_disk == "lmc_transfer_disk/"
    assert cfg.max_local_disk_bytes == 20 * GB
    assert cfg.mp_url == f"ipc://{default_mp_socket()}"
    assert (cfg.lookup_timeout_ms, cfg.request_timeout_ms, cfg.lease_ttl_s) == (200, 1000, 30.0)


def test_empty_file_gives_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    assert cfg == LMCTransferConfig()
    assert cfg.mode is Mode.IP and cfg.mp_port is None and cfg.max_programs is None
    assert cfg.allow_remote_tcp is False and cfg.layer_signals is True


def test_layer_signals_is_a_bool(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "layer_signals: false\n")).layer_signals is False


def test_values_are_normalised(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, "mode: MP\nmax_local_cpu_size: 2\nmp_socket: /run/x.sock\nmax_programs: 16\nlocal_disk: /d\n")
    )
    assert cfg.mode is Mode.MP
    assert cfg.max_local_cpu_size == 2.0 and isinstance(cfg.max_local_cpu_size, float)
    assert cfg.mp_url == "ipc:///run/x.sock"
    assert cfg.max_programs == 16 and cfg.local_disk == "/d"


def test_from_dict_names_its_source() -> None:
    assert LMCTransferConfig.from_dict({"chunk_size": 16}).chunk_size == 16
    with pytest.raises(ConfigError, match=r"^<dict>: chunk_size: expected an integer >= 1, got 0$"):
        LMCTransferConfig.from_dict({"chunk_size": 0})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("chunk_size: '256'\n", "chunk_size: expected an integer >= 1, got '256'"),
        ("chunk_size: true\n", "chunk_size: expected an integer >= 1, got True"),
        ("chunk_size: 12.5\n", "chunk_size: expected an integer >= 1, got 12.5"),
        ("max_local_cpu_size: -1\n", "max_local_cpu_size: expected a positive number, got -1"),
        ("max_local_disk_size: -0.5\n", "max_local_disk_size: expected a number >= 0, got -0.5"),
        ("mode: hybrid\n", "mode: expected one of mp, ip, got 'hybrid'"),
        ("mp_port: 70000\n", "mp_port: expected an integer in [1, 65535], got 70000"),
        ("allow_remote_tcp: 'yes'\n", "allow_remote_tcp: expected true or false, got 'yes'"),
        ("layer_signals: 1\n", "layer_signals: expected true or false, got 1"),
        ("transfer_path: fast\n", "transfer_path: expected one of auto, zero_copy, staged, got 'fast'"),
        ("local_disk: 's3://bucket'\n", "local_disk: expected a directory path or a file:// URL, got 's3://bucket'"),
        ("max_programs: 0\n", "max_programs: expected an integer >= 1, got 0"),
        ("chunk_sise: 256\n", "unknown key 'chunk_sise'; did you mean 'chunk_size'?"),
        ("zzz: 1\n", "unknown key 'zzz'; known keys: mode, chunk_size"),
        ("max_local_disk_size: 1.0\n", "max_local_disk_size: 1.0 GB of disk tier needs local_disk to be set"),
        ("local_disk: /d\n", "local_disk: the disk tier lives in the cache daemon (mode: mp) and mode: ip would ignore it"),
        ("mp_host: 10.0.0.5\n", "mp_host: expected a loopback address (set allow_remote_tcp: true to allow others), got '10.0.0.5'"),
        ("- a\n- b\n", "expected a mapping of config keys at the top level, got list"),
        ("chunk_size: [\n", "not valid YAML"),
    ],
)
def test_invalid_values_name_file_key_and_value(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)


def test_remote_host_allowed_when_opted_in(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "mp_host: 10.0.0.5\nallow_remote_tcp: true\nmp_port: 6000\n"))
    assert cfg.mp_url == "tcp://10.0.0.5:6000"
    assert load_config(write(tmp_path, "mp_host: '::1'\n")).mp_url == "tcp://[::1]:5555"


def test_default_endpoint_is_a_private_ipc_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/4242")
    cfg = LMCTransferConfig()
    assert cfg.mp_url == "ipc:///run/user/4242/lmc-transfer/daemon.sock"
    assert cfg.mp_ipc_path == "/run/user/4242/lmc-transfer/daemon.sock" and not cfg.uses_tcp
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    monkeypatch.setattr("tempfile.tempdir", None)  # gettempdir() caches its answer
    assert LMCTransferConfig().mp_url == f"ipc://{tmp_path}/lmc-transfer-{os.getuid()}/daemon.sock"


@pytest.mark.parametrize(
    "text, url",
    [
        ("mp_port: 6000\n", "tcp://127.0.0.1:6000"),
        ("mp_host: localhost\n", "tcp://localhost:5555"),
        ("mp_host: 127.0.0.2\nmp_port: 7000\n", "tcp://127.0.0.2:7000"),
        ("mp_socket: /s.sock\nmp_host: 127.0.0.1\nmp_port: 7000\n", "ipc:///s.sock"),
    ],
)
def test_explicit_host_or_port_keeps_tcp(tmp_path: Path, text: str, url: str) -> None:
    cfg = load_config(write(tmp_path, text))
    assert cfg.mp_url == url
    assert cfg.mp_ipc_path == (None if url.startswith("tcp") else "/s.sock")


def test_remote_tier_fields(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    cfg = load_config(
        write(
            tmp_path,
            "remote_url: rediss://cache.internal:6380/2\nremote_timeout_ms: 30\nremote_ttl_s: 3600\n"
            f"max_remote_size: 1.5\nremote_queue: 8\nremote_username: u\nremote_password: p\nremote_tls_ca: {ca}\n",
        )
    )
    assert (cfg.remote_url, cfg.remote_timeout_ms, cfg.remote_ttl_s, cfg.remote_queue) == ("rediss://cache.internal:6380/2", 30, 3600.0, 8)
    assert cfg.max_remote_bytes == int(1.5 * GB)
    assert (cfg.remote_username, cfg.remote_password, cfg.remote_tls_ca, cfg.remote_tls_cert) == ("u", "p", str(ca), None)
    off = LMCTransferConfig()
    assert off.remote_url is None and off.max_remote_bytes is None and off.remote_timeout_ms == 50


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("remote_url: http://x:1\n", "remote_url: expected a URL starting with one of redis://, rediss://, unix://"),
        ("remote_url: 'redis://'\n", "remote_url: expected a URL starting with one of"),
        ("remote_url: 5\n", "remote_url: expected a non-empty string, got 5"),
        ("remote_ttl_s: 10\n", "remote_ttl_s: 10.0 needs remote_url to be set, got no remote_url"),
        ("remote_password: s3cret\n", "remote_password: <hidden> needs remote_url to be set"),
        ("remote_url: redis://h:1\nremote_timeout_ms: 0\n", "remote_timeout_ms: expected an integer >= 1, got 0"),
        ("remote_url: redis://h:1\nremote_timeout_ms: 200\n", "remote_timeout_ms: must be below lookup_timeout_ms (200)"),
        ("remote_url: redis://h:1\nremote_ttl_s: 0\n", "remote_ttl_s: expected a positive number, got 0"),
        ("remote_url: redis://h:1\nmax_remote_size: -1\n", "max_remote_size: expected a number >= 0, got -1"),
        ("remote_url: redis://h:1\nremote_queue: 0\n", "remote_queue: expected an integer >= 1, got 0"),
        ("remote_url: rediss://h:1\nremote_tls_ca: /no/such/ca.pem\n", "remote_tls_ca: expected the path of an existing file, got '/no/such/ca.pem'"),
        ("remote_url: redis://h:1\nremote_tls_ca: CFG\n", "remote_tls_ca: TLS settings need a rediss:// or rediss+cluster:// remote_url, got 'redis://h:1'"),
        ("remote_url: rediss://h:1\nremote_tls_cert: CFG\n", "remote_tls_cert: a client certificate needs both remote_tls_cert and remote_tls_key"),
    ],
)
def test_invalid_remote_fields_name_file_key_and_value(tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, text.replace("CFG", str(tmp_path / "cfg.yaml")))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: ")
    assert message in str(info.value)
    assert "s3cret" not in str(info.value)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml: config file not found$"):
        load_config(path)


def test_config_is_frozen() -> None:
    cfg = LMCTransferConfig()
    with pytest.raises(AttributeError):
        cfg.chunk_size = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "key, maximum",
    [("lease_ttl_s", 86400), ("max_local_cpu_size", 65536), ("max_local_disk_size", 1048576),
     ("disk_flush_interval_s", 3600), ("remote_ttl_s", 31536000), ("max_remote_size", 1048576)],
)
@pytest.mark.parametrize("text, shown", [(".inf", "inf"), (".nan", "nan"), ("1000000000000", "1000000000000"),
                                         ("1.0e+12", "1000000000000.0")])
def test_numbers_that_are_not_finite_or_past_a_sane_bound_are_refused(tmp_path: Path, key: str, maximum: int,
                                                                       text: str, shown: str) -> None:
    path = write(tmp_path, f"{key}: {text}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: {key}: expected a finite number <= {maximum}, got {shown}"


@pytest.mark.parametrize("key", ["chunk_size", "lookup_timeout_ms", "request_timeout_ms", "remote_timeout_ms",
                                 "staging_buffer_size", "max_programs", "remote_queue"])
def test_integers_past_a_sane_bound_are_refused(tmp_path: Path, key: str) -> None:
    path = write(tmp_path, f"{key}: 1000000000000\n")
    with pytest.raises(ConfigError, match=rf"^.*: {key}: expected an integer in \[1, \d+\], got 1000000000000$"):
        load_config(path)


def test_the_largest_sane_values_load(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "lease_ttl_s: 86400\nmax_local_cpu_size: 65536\nrequest_timeout_ms: 3600000\n"))
    assert (cfg.lease_ttl_s, cfg.max_local_cpu_bytes, cfg.request_timeout_ms) == (86400.0, 65536 * GB, 3600000)


@pytest.mark.parametrize(
    "content, message",
    [
        (b"chunk_size: [\n", "not valid YAML: expected the node content, but found '<stream end>' at line 2, column 1"),
        (b"a: 1\n  b: 2\n", "not valid YAML: mapping values are not allowed here at line 2, column 4"),
        (b"chunk_size: 16\nmp_socket: caf\xe9\n", "not UTF-8 text (byte 0xe9 at offset 29)"),
        (b"a: \x01", "not valid YAML: unacceptable character #x0001: special characters are not allowed at offset 3"),
    ],
)
def test_unreadable_files_are_one_line_naming_the_file(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "cfg.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {message}")
    assert "\n" not in str(info.value)


def test_a_directory_is_no_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == f"{tmp_path}: is a directory, expected a YAML file"
