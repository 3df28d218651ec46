"""The managed plugin's config.json: what Docker needs from it and what the agent reads from it."""

from __future__ import annotations

import json

import pytest

from plugin.managed import driver_name, main, render


def env_of(config: dict) -> dict[str, str]:
    return {v["Name"]: v["Value"] for v in config["Env"]}


def test_interfaces_socket_and_names_agree() -> None:
    config = render("cgx1")
    assert config["Interface"]["Types"] == ["docker.networkdriver/1.0", "docker.ipamdriver/1.0"]
    assert config["Network"]["Type"] == "host"
    env = env_of(config)
    assert env["CELLGATE_NAME"] == "cgx1"
    assert env["CELLGATE_DRIVER_NAME"] == "cgx1:latest"  # what Docker lists as the network's driver
    assert env["CELLGATE_PLUGIN_SOCKET"] == "/run/docker/plugins/" + config["Interface"]["Socket"]
    assert env["CELLGATE_SOCK"].startswith("/var/lib/cgx1/")  # inside the state mount
    assert {"CAP_SYS_ADMIN", "CAP_NET_ADMIN"} <= set(config["Linux"]["Capabilities"])
    mounts = {m["Destination"]: m for m in config["Mounts"]}
    assert {"/sys/fs/bpf", "/lib/modules", "/usr/src", "/var/lib/cgx1", "/var/run/docker.sock"} <= set(mounts)
    assert "ro" in mounts["/lib/modules"]["Options"] and "ro" in mounts["/usr/src"]["Options"]
    assert "${" not in json.dumps(config)


def test_sources_and_env_are_rebound_and_unknown_ones_refused() -> None:
    config = render("cgx1", sources={"/var/run/docker.sock": "/tmp/d.sock"}, env={"CELLGATE_DEBUG": "true"})
    assert {m["Destination"]: m["Source"] for m in config["Mounts"]}["/var/run/docker.sock"] == "/tmp/d.sock"
    assert env_of(config)["CELLGATE_DEBUG"] == "true"
    with pytest.raises(ValueError, match="mount /nope"):
        render("cgx1", sources={"/nope": "/x"})
    with pytest.raises(ValueError, match="variable CELLGATE_TYPO"):
        render("cgx1", env={"CELLGATE_TYPO": "1"})
    with pytest.raises(ValueError):
        render("Bad:Name")


def test_driver_names() -> None:
    assert driver_name("cellgate") == "cellgate:latest"
    assert driver_name("me/cellgate:0.1") == "me/cellgate:0.1"
    assert driver_name("reg:5000/cellgate") == "reg:5000/cellgate:latest"


def test_cli_prints_the_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--name", "cgx2", "--driver", "me/cg:1"]) == 0
    assert env_of(json.loads(capsys.readouterr().out))["CELLGATE_DRIVER_NAME"] == "me/cg:1"
