"""The Docker managed-plugin package: the config.json `docker plugin create` takes (stdlib only).

`config.json` next to this module is the template (`${NAME}` = instance name, `${DRIVER}` = the
name Docker knows the plugin by); `python -m plugin.managed --name NAME` prints it rendered.
Building the rootfs, the image and the plugin is `build.sh` here (`make image`, `make plugin`).
"""

from __future__ import annotations

import argparse
import json
import sys
from importlib import resources
from typing import Any

from datapath import naming


def driver_name(plugin: str) -> str:
    """The name Docker gives a managed plugin created as `plugin` (a tag defaults to latest)."""
    last = plugin.rsplit("/", 1)[-1]
    return plugin if ":" in last else plugin + ":latest"


def render(name: str, driver: str = "", sources: dict[str, str] | None = None,
           env: dict[str, str] | None = None) -> dict[str, Any]:
    """config.json for instance `name`; `sources` rebinds mounts by destination, `env` sets values."""
    naming.check_instance(name)
    text = resources.files(__package__).joinpath("config.json").read_text()
    text = text.replace("${NAME}", name).replace("${DRIVER}", driver or driver_name(name))
    config: dict[str, Any] = json.loads(text)
    sources, env = dict(sources or {}), dict(env or {})
    for mount in config["Mounts"]:
        mount["Source"] = sources.pop(mount["Destination"], mount["Source"])
    for var in config["Env"]:
        var["Value"] = env.pop(var["Name"], var["Value"])
    unknown = [f"mount {d}" for d in sources] + [f"variable {k}" for k in env]
    if unknown:
        raise ValueError("not in the plugin config: " + ", ".join(unknown))
    return config


def _pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m plugin.managed", description=__doc__)
    parser.add_argument("--name", default="cellgate", help="instance name (CELLGATE_NAME)")
    parser.add_argument("--driver", default="", help="plugin name as Docker sees it [default NAME:latest]")
    parser.add_argument("--source", type=_pair, action="append", default=[], metavar="DEST=SRC",
                        help="host path bound at DEST inside the plugin")
    parser.add_argument("--env", type=_pair, action="append", default=[], metavar="VAR=VALUE")
    args = parser.parse_args(argv)
    try:
        config = render(args.name, args.driver, dict(args.source), dict(args.env))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    json.dump(config, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0
