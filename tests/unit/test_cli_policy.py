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
