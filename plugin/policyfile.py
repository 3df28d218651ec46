"""Policy files of the CLI: JSON or YAML read within bounds, then parsed exactly as the agent parses them.

`cellgate policy check` and `cellgate policy import` both go through `load`, so they accept and refuse
the same files with the same messages, and import sends the agent only what parsed here. Hostile input
is refused before it costs anything: a file past MAX_BYTES, nesting past MAX_DEPTH (checked while
YAML is composed, before any recursion could overflow), more than MAX_NODES values once YAML aliases
are expanded (counted on the alias graph, never by expanding it), recursive aliases, and a policy
whose JSON body would be larger than the agent takes. Imports PyYAML only when a file is not JSON.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from datapath.errors import InvalidRequest
from datapath.policy import MAX_BYTES, MAX_DEPTH, MAX_NODES, Rule, check_shape, parse_rules


def load(path: str) -> tuple[Any, list[Rule]]:
    """The policy of a file ('-' = stdin) as `policy import` sends it, and its rules as the agent
    will parse them: the very JSON the agent receives is what is parsed here. InvalidRequest names
    what is wrong, OSError is a file that cannot be read."""
    data = decode(read(path), path)
    check_shape(data)
    try:
        body = json.dumps({"rules": data}, allow_nan=False)  # as plugin.client sends it
    except (TypeError, ValueError) as exc:  # YAML dates, NaN...
        raise InvalidRequest(f"the policy holds a value JSON cannot carry: {exc}") from None
    size = len(body.encode())
    if size > MAX_BYTES:
        raise InvalidRequest(f"the policy is too large: {size} bytes as JSON, the agent takes at most {MAX_BYTES}")
    data = json.loads(body)["rules"]
    return data, parse_rules(data)


def read(path: str) -> str:
    if path == "-":
        raw = sys.stdin.buffer.read(MAX_BYTES + 1)
    else:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    if len(raw) > MAX_BYTES:
        raise InvalidRequest(f"{path}: larger than {MAX_BYTES} bytes, the most a policy may be")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def decode(text: str, path: str) -> Any:
    """JSON, else YAML (several YAML documents become a list)."""
    try:
        return json.loads(text, parse_constant=_not_json)
    except RecursionError:
        raise _too_deep() from None
    except ValueError:
        pass
    return _yaml(text, path)


def _not_json(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")  # as the agent's REST door says


def _too_deep() -> InvalidRequest:
    return InvalidRequest(f"the policy is nested too deeply: more than {MAX_DEPTH} levels")


def _yaml(text: str, path: str) -> Any:
    import yaml

    class Loader(yaml.SafeLoader):  # the pure-Python composer, bounded while it recurses
        depth = 0

        def compose_node(self, parent: Any, index: Any) -> Any:
            self.depth += 1
            try:
                if self.depth > MAX_DEPTH + 1:  # + 1: scalars are nodes too (check_shape counts containers)
                    raise _too_deep()
                return super().compose_node(parent, index)
            finally:
                self.depth -= 1

    loader = Loader(text)
    docs = []
    total = 0
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            total += _expanded(node)
            if total > MAX_NODES:
                raise InvalidRequest(f"the policy is too large: more than {MAX_NODES} values once its YAML "
                                     "aliases are expanded")
            doc = loader.construct_document(node)
            if doc is not None:
                docs.append(doc)
    except yaml.YAMLError as exc:
        raise InvalidRequest(f"{path}: neither JSON nor YAML: {exc}") from None
    finally:
        loader.dispose()
    return docs[0] if len(docs) == 1 else docs


def _expanded(root: Any) -> int:
    """Values in a composed YAML document with every alias expanded, and its depth then, from the
    node graph (an alias is the node it names, shared): linear in the graph, whatever the expansion."""
    import yaml

    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[Any, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        if isinstance(node, yaml.MappingNode):
            kids = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            kids = list(node.value)
        else:
            kids = []
        if done:
            on_path.discard(key)
            size[key] = min(MAX_NODES + 1, 1 + sum(size[id(k)] for k in kids))
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if depth[key] > MAX_DEPTH + 1:
                raise _too_deep()
            continue
        if key in size:
            continue
        if key in on_path:
            raise InvalidRequest("the policy has a recursive YAML alias (a value that contains itself)")
        on_path.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in size)
    return size[id(root)]
