"""YAML as configs need it: PyYAML's safe loader, except that a key given twice in one mapping is an error.

PyYAML keeps the last of duplicate keys silently, so `models: {x: a, x: b}` would merge one model and a
second `parameters:` block would replace the first; here either is refused, naming the key and its lines.
"""

from __future__ import annotations

from typing import Any

import yaml


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that gives one key twice."""


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: overriding those keys is the point
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                seen = first_line.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            line = key_node.start_mark.line + 1
            if seen is not None:
                raise DuplicateKeyError(None, None, f"duplicate key {key!r} on line {line} (first given on line "
                                                    f"{seen}); each key may appear once")
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def load_strict_yaml(text: str) -> Any:
    """Parse `text` like `yaml.safe_load`, refusing duplicate keys in any mapping (`DuplicateKeyError`)."""
    return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
