"""Strict reading and deterministic writing of plan files (YAML).

Plans are read with a private ``yaml.SafeLoader`` subclass that refuses anchors and aliases (no
alias bombs), refuses duplicate keys at any depth, reads YAML 1.2 exponent floats (``5e-2``) as
floats and accepts exactly one document. Every problem is a PlanError naming the file.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Any

import yaml

from diffcache.errors import PlanError

MAX_PLAN_BYTES = 1 << 20  # plans are small; big arrays live in .safetensors sidecars

# Exponent forms YAML 1.2 reads as floats and PyYAML's YAML 1.1 resolver leaves as strings
# (``1e3``, ``5e-2``, ``1.5E+3``); the forms with a dot and no exponent are resolved as before.
_FLOAT_TAG = "tag:yaml.org,2002:float"
_EXP_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)[eE][-+]?[0-9]+$")
_FLOAT_FIRST = list("-+0123456789.")


class _Refused(Exception):
    """A construct plan files do not allow (the message follows the file name)."""


class _PlanLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 exponent floats that refuses anchors and aliases."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _Refused(
                f"line {event.start_mark.line + 1}: YAML anchors and aliases are not allowed in "
                "plan files; write the values out"
            )
        return super().compose_node(parent, index)


class _PlanDumper(yaml.SafeDumper):
    """SafeDumper that quotes what ``_PlanLoader`` would read as floats and never writes aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


for _cls in (_PlanLoader, _PlanDumper):  # add_implicit_resolver copies the parent's table first
    _cls.add_implicit_resolver(_FLOAT_TAG, _EXP_FLOAT, _FLOAT_FIRST)
_PlanDumper.add_representer(tuple, yaml.SafeDumper.represent_list)


def read_yaml(path: str | Path, max_bytes: int = MAX_PLAN_BYTES) -> Any:
    """The plain data of the one YAML document in the plan file ``path`` (None for an empty
    file), read strictly; a file over ``max_bytes`` is refused unread. Every problem is a
    PlanError naming the file."""
    path = Path(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise PlanError(f"{path}: no such plan file; check the path") from None
    except OSError as e:
        raise PlanError(f"{path}: cannot read ({e.strerror}); check the path") from None
    if stat.S_ISDIR(info.st_mode):
        raise PlanError(f"{path}: is a directory, not a plan file")
    if not stat.S_ISREG(info.st_mode):
        raise PlanError(f"{path}: is not a regular file; give the path of a plan file")
    too_big = (
        f"{path}: is {{}} bytes, over the {max_bytes}-byte cap for plan files; "
        "keep large arrays in a .safetensors sidecar"
    )
    if info.st_size > max_bytes:
        raise PlanError(too_big.format(info.st_size))
    try:
        with path.open("rb") as f:
            data = f.read(max_bytes + 1)  # the file may have grown since stat
    except OSError as e:
        raise PlanError(f"{path}: cannot read ({e.strerror}); check the permissions") from None
    if len(data) > max_bytes:
        raise PlanError(too_big.format(f"more than {max_bytes}"))
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PlanError(
            f"{path}: not UTF-8 text (byte offset {e.start}); save the plan as UTF-8"
        ) from None
    return loads_yaml(text, source=str(path))


def loads_yaml(text: str, source: str = "<string>") -> Any:
    """The plain data of the one YAML document in ``text`` (None for an empty one), read with
    the rules of ``read_yaml``; errors call the text ``source`` (a file name)."""
    loader = None
    try:
        loader = _PlanLoader(text)
        loader.get_event()  # StreamStartEvent
        node = None
        if not loader.check_event(yaml.StreamEndEvent):
            node = loader.compose_document()
        if not loader.check_event(yaml.StreamEndEvent):
            line = loader.peek_event().start_mark.line + 1
            raise _Refused(f"line {line}: a plan file holds one YAML document; remove the rest")
        if node is None:
            return None
        _check_duplicates(node, "")
        return loader.construct_document(node)
    except _Refused as e:
        raise PlanError(f"{source}: {e}") from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise PlanError(f"{source}: not valid YAML: {e.problem or e.context}{where}") from None
    except yaml.reader.ReaderError as e:
        raise PlanError(
            f"{source}: not valid YAML: unacceptable character #x{e.character:04x} "
            f"(character offset {e.position}); remove it"
        ) from None
    except yaml.YAMLError as e:
        raise PlanError(f"{source}: not valid YAML: {e}") from None
    except RecursionError:
        raise PlanError(f"{source}: not valid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def dump_yaml(data: Any) -> str:
    """Deterministic block-style YAML of plain data, in insertion order.

    Strings that ``loads_yaml`` would read as numbers are quoted, tuples are written as lists and
    shared objects are written out again (never as aliases), so the text reads back equal.
    """
    return yaml.dump(
        data,
        Dumper=_PlanDumper,
        sort_keys=False,
        default_flow_style=False,
        width=100,
        allow_unicode=True,
    )


def _check_duplicates(node: yaml.Node, path: str) -> None:
    """Raise ``_Refused`` for the first mapping key written twice, naming its key path."""
    if isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicates(item, f"{path}[{i}]")
    elif isinstance(node, yaml.MappingNode):
        seen: dict[tuple[str, str], int] = {}
        for key, value in node.value:
            sub = path
            if isinstance(key, yaml.ScalarNode):
                sub = f"{path}.{key.value}" if path else key.value
                line = key.start_mark.line + 1
                if (key.tag, key.value) in seen:
                    first = seen[key.tag, key.value]
                    lines = (
                        f"lines {first} and {line}" if first != line else f"twice on line {line}"
                    )
                    raise _Refused(f"{sub}: duplicate key ({lines})")
                seen[key.tag, key.value] = line
            _check_duplicates(value, sub)
