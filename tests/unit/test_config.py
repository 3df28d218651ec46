"""plugin.config: ranges derived from the node index, explicit ranges, names, environment variables."""

from __future__ import annotations

import argparse
import ipaddress
import os
from pathlib import Path

import pytest

from ipam.allocator import HostRanges
from plugin import config
from plugin.config import CLUSTER_V4, CLUSTER_V6, Config, default_ranges


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CELLGATE_"):
            monkeypatch.delenv(name)


def parse(*argv: str, api_socket: str = "") -> Config:
    parser = argparse.ArgumentParser()
    Config.add_arguments(parser)
    return Config.from_args(parser.parse_args(argv), api_socket)


@pytest.mark.parametrize(
    ("index", "v4", "v6"),
    [
        (0, "10.192.0.0/20", "fd63:6767::/64"),
        (1, "10.192.16.0/20", "fd63:6767:0:1::/64"),
        (1023, "10.255.240.0/20", "fd63:6767:0:3ff::/64"),
        (1024, "10.192.0.0/20", "fd63:6767:0:400::/64"),  # the IPv4 slots wrap, IPv6 has 65536
        (65536, "10.192.0.0/20", "fd63:6767::/64"),
    ],
)
def test_default_ranges_derive_from_the_node_index(index: int, v4: str, v6: str) -> None:
    assert default_ranges(index) == (ipaddress.IPv4Network(v4), ipaddress.IPv6Network(v6))


def test_default_ranges_of_different_nodes_never_overlap() -> None:
    ranges = [default_ranges(i) for i in range(0, 1024, 7)]
    v4s = [r[0] for r in ranges]
    v6s = [r[1] for r in ranges]
    assert len(set(v4s)) == len(v4s) and len(set(v6s)) == len(v6s)
    assert all(r.subnet_of(CLUSTER_V4) for r in v4s) and all(r.subnet_of(CLUSTER_V6) for r in v6s)


def test_defaults_follow_the_instance_name() -> None:
    cfg = parse("--name", "cgt1", "--node-index", "3")
    assert (cfg.ipv4_range, cfg.ipv6_range) == default_ranges(3)
    assert cfg.plugin_socket == Path("/run/docker/plugins/cgt1.sock")
    assert cfg.api_socket == Path("/var/run/cgt1/cgt1.sock")
    assert cfg.state_dir == Path("/var/lib/cgt1") and cfg.bpf_dir == Path("/sys/fs/bpf/cgt1")
    assert (cfg.ipv4_prefix, cfg.ipv6_prefix, cfg.masquerade, cfg.debug) == (24, 80, True, False)
    HostRanges(cfg.ipv4_range, cfg.ipv6_range, cfg.ipv4_prefix, cfg.ipv6_prefix)  # usable as is


def test_without_a_node_index_the_machine_decides() -> None:
    cfg = parse()
    assert (cfg.ipv4_range, cfg.ipv6_range) == default_ranges(config.machine_index())
    assert parse().ipv4_range == cfg.ipv4_range  # stable


def test_explicit_ranges_and_paths_win() -> None:
    cfg = parse(
        "--node-index",
        "3",
        "--ipv4-range",
        "172.20.0.0/16",
        "--ipv6-range",
        "fd12:3456::/56",
        "--state-dir",
        "/tmp/cg-state",
        "--plugin-socket",
        "/tmp/cg.sock",
        api_socket="/tmp/api.sock",
    )
    assert cfg.ipv4_range == ipaddress.IPv4Network("172.20.0.0/16")
    assert cfg.ipv6_range == ipaddress.IPv6Network("fd12:3456::/56")
    assert (cfg.state_dir, cfg.plugin_socket, cfg.api_socket) == (
        Path("/tmp/cg-state"),
        Path("/tmp/cg.sock"),
        Path("/tmp/api.sock"),
    )


def test_environment_variables_are_the_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CELLGATE_NAME", "cgenv")
    monkeypatch.setenv("CELLGATE_NODE_INDEX", "5")
    monkeypatch.setenv("CELLGATE_MASQUERADE", "off")
    monkeypatch.setenv("CELLGATE_IPV4_NETWORK_SIZE", "26")
    cfg = parse()
    assert cfg.name == "cgenv" and cfg.ipv4_range == default_ranges(5)[0]
    assert cfg.masquerade is False and cfg.ipv4_prefix == 26
    assert parse("--node-index", "6").ipv4_range == default_ranges(6)[0]  # a flag beats the variable


@pytest.mark.parametrize(
    "flags",
    [
        ("--ipv4-range", "10.0.0.1/16"),
        ("--ipv4-range", "fd00::/64"),
        ("--ipv6-range", "10.0.0.0/8"),
        ("--ipv6-range", "nonsense"),
    ],
)
def test_bad_ranges_are_refused(flags: tuple[str, str]) -> None:
    with pytest.raises(ValueError, match="bad address range"):
        parse("--node-index", "0", *flags)


@pytest.mark.parametrize("name", ["", "CellGate", "9lives", "much-too-long-name", "a_b", "../x"])
def test_bad_instance_names_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match="instance name"):
        parse("--name", name, "--node-index", "0")


def test_bad_boolean_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("--masquerade", "perhaps")
    assert "expected a boolean" in capsys.readouterr().err
