"""`cellgate policy check FILE`: offline validation through plugin.cli.main, no agent needed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from plugin import cli

VALID_YAML = """\
# two documents: a plain rule and a CRD
endpointSelector:
  matchLabels: {app: web}
ingress:
  - fromEndpoints:
      - matchLabels: {app: db}
    toPorts:
      - ports:
          - {port: 80, protocol: TCP}
          - {port: 8000, endPort: 8080, protocol: TCP}
---
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: deny-world}
specs:
  - endpointSelector: {}
    ingressDeny:
      - fromEntities: [world]
  - endpointSelector: {matchExpressions: [{key: app, operator: NotIn, values: [db]}]}
    egress: [{}]
"""

INVALID_YAML = """\
- endpointSelector: {matchLabels: {app: web}}
  ingress:
    - fromEntities: [host]
- endpointSelector: {matchLabels: {app: db}}
  egress:
    - toPorts:
        - ports:
            - port: http
"""


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_a_valid_yaml_file_passes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "ok.yaml", VALID_YAML)
    assert cli.main(["policy", "check", path]) == 0
    assert capsys.readouterr().out.strip() == f"{path}: valid, 3 rule(s)"


def test_a_valid_json_file_passes_with_json_output(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "ok.json", json.dumps([{"endpointSelector": {}, "egress": [{}]}]))
    assert cli.main(["policy", "check", "-o", "json", path]) == 0
    assert json.loads(capsys.readouterr().out) == {"valid": True, "rules": 1}


def test_an_invalid_file_fails_and_names_the_rule_and_field(tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "bad.yaml", INVALID_YAML)
    assert cli.main(["policy", "check", path]) == 1
    out = capsys.readouterr().out
    assert out.startswith(f"{path}: invalid: rule 1: egress[0].toPorts[0].ports[0].port: 'http'")
    assert "named ports are not supported" in out
    assert cli.main(["policy", "check", "-o", "json", path]) == 1
    assert json.loads(capsys.readouterr().out)["error"].startswith("rule 1: egress[0].toPorts[0].ports[0].port")


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("endpointSelector: {}\negres: [{}]\n", "rule 0: unknown field 'egres' (did you mean 'egress'?)"),
        ("ingress: []\n", "rule 0: endpointSelector is required"),
        ("kind: CiliumNetworkPolicy\nmetadata: x\nspec: {endpointSelector: {}}\n", "policy 0: metadata"),
        ("endpointSelector: {matchLabels: {app: [", "neither JSON nor YAML"),
        ("", "the policy holds no rules"),
        ("- 42\n", "rule 0: must be an object"),
    ],
)
def test_other_invalid_files(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str, fragment: str) -> None:
    path = write(tmp_path, "bad.yaml", text)
    assert cli.main(["policy", "check", path]) == 1
    assert fragment in capsys.readouterr().out


def test_a_missing_file_is_a_usage_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["policy", "check", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml" in capsys.readouterr().err


# -- `policy check` and `policy import` answer alike; hostile files are refused with a message -----

BILLION_LAUGHS = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]\n" for i in range(8))


def hostile(kind: str) -> str:
    if kind == "deep-json":
        return "[" * 100_000 + "]" * 100_000
    if kind == "deep-json-object":
        return '{"a": ' * 50_000 + "1" + "}" * 50_000
    if kind == "deep-yaml-flow":
        return "- " + "[" * 100_000 + "]" * 100_000 + "\n"
    if kind == "deep-yaml-block":
        return "".join("  " * i + "- \n" for i in range(600)) + "  " * 600 + "- x\n"
    if kind == "just-too-deep-json":
        return json.dumps([{"endpointSelector": {}, "egress": [{}], "description": [[[[[[[[[[[[[[[[[[[[[[[[[[[[
            [[["x"]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}])
    if kind == "alias-bomb":
        return BILLION_LAUGHS
    if kind == "recursive-alias":
        return "&a [*a]\n"
    if kind == "huge":
        return json.dumps([{"endpointSelector": {}, "egress": [{}], "description": "x" * (1 << 20)}])
    if kind == "yaml-date":
        return "- endpointSelector: {}\n  egress: [{}]\n  labels: [{key: since, value: 2024-01-01}]\n"
    raise AssertionError(kind)


HOSTILE = [
    ("deep-json", "nested too deeply"),
    ("deep-json-object", "nested too deeply"),
    ("deep-yaml-flow", "nested too deeply"),
    ("deep-yaml-block", "nested too deeply"),
    ("just-too-deep-json", "nested too deeply: more than 32 levels"),
    ("alias-bomb", "too large"),
    ("recursive-alias", "recursive YAML alias"),
    ("huge", "larger than 1048576 bytes"),
    ("yaml-date", "JSON cannot carry"),
]


def check_and_import(tmp_path: Path, capsys: pytest.CaptureFixture[str], text: str) -> tuple[str, str]:
    """The error of `policy check` and of `policy import` (whose agent does not exist: a file refused
    locally never tries to reach it)."""
    path = write(tmp_path, "p.yaml", text)
    assert cli.main(["policy", "check", "-o", "json", path]) == 1
    checked = json.loads(capsys.readouterr().out)["error"]
    assert cli.main(["policy", "import", path, "--socket", str(tmp_path / "no-agent.sock")]) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "cannot reach" not in captured.err, captured.err
    assert captured.err.startswith("cellgate: ")
    return checked, captured.err.strip().removeprefix("cellgate: ")


@pytest.mark.parametrize(("kind", "fragment"), HOSTILE)
def test_hostile_files_are_refused_alike_by_check_and_import(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                              kind: str, fragment: str) -> None:
    import time

    started = time.monotonic()
    checked, imported = check_and_import(tmp_path, capsys, hostile(kind))
    assert time.monotonic() - started < 10
    assert fragment in checked and checked == imported


INVALID = [
    "endpointSelector: {}\negres: [{}]\n",
    "- endpointSelector: {matchLabels: {app: web}}\n",  # no section
    "- nodeSelector: {}\n  ingress: [{}]\n",
    "- endpointSelector: {matchLabels: {'reserved:host': ''}}\n  ingress: [{}]\n",
    "- endpointSelector: {}\n  ingress: []\n",
    "- endpointSelector: {}\n  ingress: [{fromEndpoints: [{}], toPorts: []}]\n",
    "kind: CiliumNetworkPolicy\nmetadata: {name: x, namespace: Bad_Name}\nspec: {endpointSelector: {}, egress: [{}]}\n",
    "kind: CiliumNetworkPolicy\nmetadata: {name: x}\nspec: {endpointSelector: {}, ingress: [{fromEndpoints: "
    "[{matchLabels: {'reserved:world': ''}}]}]}\n",
    "- endpointSelector: {}\n  egress: [{}]\n  labels: [{key: a, value: .nan}]\n",
    "endpointSelector: {matchLabels: {app: [",
]


@pytest.mark.parametrize("text", INVALID)
def test_check_and_import_give_the_same_message(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                text: str) -> None:
    checked, imported = check_and_import(tmp_path, capsys, text)
    assert checked == imported


def test_import_parses_before_it_sends(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A valid file gets as far as the agent (absent here); check says it is valid."""
    path = write(tmp_path, "ok.yaml", VALID_YAML)
    assert cli.main(["policy", "import", path, "--socket", str(tmp_path / "no-agent.sock")]) == 2
    assert "cannot reach the cellgate agent" in capsys.readouterr().err
    assert cli.main(["policy", "check", path]) == 0
