"""YAML as Topiary reads it: PyYAML's safe loader, but ``2:4`` stays the string ``"2:4"``.

Kept apart from :mod:`configs.schema` (which imports torch) so that parsing a ``--set``
value costs nothing.
"""

from __future__ import annotations

import re

import yaml


class ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader without YAML 1.1's base-60 numbers.

    YAML 1.1 reads an unquoted ``2:4`` as the sexagesimal integer 124; here it stays the
    string ``"2:4"`` (an N:M pattern), in config files and ``--set`` values alike. Every
    other scalar resolves as with ``yaml.safe_load``.
    """


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
