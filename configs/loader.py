"""YAML as Topiary reads it: PyYAML's safe loader, but ``2:4`` stays the string ``"2:4"``.

Kept apart from :mod:`configs.schema` (which imports torch) so that parsing a ``--set``
value costs nothing.
"""

from __future__ import annotations

import re

import yaml


class DuplicateKeyError(yaml.YAMLError):
    """A mapping gives a key twice; the message names the key and both lines."""


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's base-60 numbers, refusing duplicate keys.

    YAML 1.1 reads an unquoted ``2:4`` as the sexagesimal integer 124; here it stays the
    string ``"2:4"`` (an N:M pattern), in config files and ``--set`` values alike. Every
    other scalar resolves as with ``yaml.safe_load``. A key given twice in one mapping
    (two ``prune:`` sections) is an error naming both lines, not "the last one wins".
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[object, int] = {}
        for key_node, _ in node.value:
            key = (
                self.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
            )
            line = key_node.start_mark.line + 1
            if key is not None and key in seen:
                raise DuplicateKeyError(
                    f"key {key!r} is given twice, on lines {seen[key]} and {line} (YAML would keep only "
                    "the last); keep one"
                )
            if key is not None and key != "<<":
                seen[key] = line
        return super().construct_mapping(node, deep)


_INT = re.compile(
    r"""^(?:[-+]?0b[0-1_]+
    |[-+]?0[0-7_]+
    |[-+]?(?:0|[1-9][0-9_]*)
    |[-+]?0x[0-9a-fA-F_]+)$""",
    re.X,
)
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?
    |\.[0-9][0-9_]*(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_NUMBER_TAGS = {"tag:yaml.org,2002:int": _INT, "tag:yaml.org,2002:float": _FLOAT}
ConfigLoader.yaml_implicit_resolvers = {
    first: [(tag, _NUMBER_TAGS.get(tag, rx)) for tag, rx in resolvers]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def yaml_value(text: str):
    """Parse YAML text with :class:`ConfigLoader` (``2:4`` is the string ``"2:4"``)."""
    return yaml.load(text, Loader=ConfigLoader)  # noqa: S506 - a SafeLoader subclass
