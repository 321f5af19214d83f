"""Multi-document YAML loading that remembers where every value came from.

PyYAML's composer knows each node's line; we keep that by constructing mappings as
``LineMap`` (a dict that also records the line of each key) and sequences as
``LineList``. Validation uses those lines so every message can say ``file:line``.
Nothing here knows about Kubernetes or Istio.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

from isthmus.core.errors import Diagnostic, Severity

try:  # the C loader is much faster on large files; fall back to pure Python.
    _BaseLoader: type = yaml.CSafeLoader  # type: ignore[attr-defined]
except AttributeError:  # pragma: no cover - depends on how PyYAML was built
    _BaseLoader = yaml.SafeLoader

MAX_FILE_BYTES = 8 * 1024 * 1024
"""Config files above this size are refused: no real mesh config is that large, and a
pathological file must not stall the control plane."""


class LineMap(dict):
    """A YAML mapping: a dict plus the 1-based line of the mapping and of each key."""

    __slots__ = ("line", "key_lines")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.line = 0
        self.key_lines: dict[Any, int] = {}


class LineList(list):
    """A YAML sequence: a list plus the 1-based line of the sequence and of each item."""

    __slots__ = ("line", "item_lines")

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.line = 0
        self.item_lines: list[int] = []


class _LineLoader(_BaseLoader):  # type: ignore[misc, valid-type]
    pass


def _construct_mapping(loader: Any, node: yaml.MappingNode) -> LineMap:
    loader.flatten_mapping(node)
    result = LineMap()
    result.line = node.start_mark.line + 1
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, "found an unhashable key",
                key_node.start_mark,
            ) from None
        if key in result:
            raise yaml.constructor.ConstructorError(
                "while constructing a mapping", node.start_mark, f"found duplicate key {key!r}",
                key_node.start_mark,
            )
        result[key] = loader.construct_object(value_node, deep=True)
        result.key_lines[key] = key_node.start_mark.line + 1
    return result


def _construct_sequence(loader: Any, node: yaml.SequenceNode) -> LineList:
    result = LineList(loader.construct_object(child, deep=True) for child in node.value)
    result.line = node.start_mark.line + 1
    result.item_lines = [child.start_mark.line + 1 for child in node.value]
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


@dataclass(frozen=True, slots=True)
class RawDocument:
    """One YAML document before it is interpreted: its data and where it came from."""

    data: Any
    file: str
    line: int  # line where the document starts
    index: int  # position within the file (0-based)


def iter_documents(text: str, file: str = "<input>") -> Iterator[RawDocument | Diagnostic]:
    """Yield each non-empty document of ``text``, or a Diagnostic for a YAML syntax error.

    A syntax error ends the file: YAML cannot resynchronise reliably after one, and
    guessing would risk applying half a document.
    """
    loader = _LineLoader(text)
    index = 0
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            data = loader.construct_document(node)
            if data is not None:
                yield RawDocument(data, file, node.start_mark.line + 1, index)
            index += 1
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark is not None else 0
        problem = getattr(exc, "problem", None) or str(exc)
        context = getattr(exc, "context", None)
        message = f"invalid YAML: {problem}" + (f" ({context})" if context else "")
        yield Diagnostic(Severity.ERROR, message, file=file, line=line)
    finally:
        loader.dispose()


def read_config_file(path: Path) -> tuple[str | None, Diagnostic | None]:
    """Read a config file as text, refusing huge or non-UTF-8 files with a clear message."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            return None, Diagnostic(
                Severity.ERROR,
                f"file is {size // (1024 * 1024)} MiB; config files over "
                f"{MAX_FILE_BYTES // (1024 * 1024)} MiB are refused (split it up)",
                file=str(path),
            )
        return path.read_text(encoding="utf-8"), None
    except UnicodeDecodeError as exc:
        return None, Diagnostic(Severity.ERROR, f"not UTF-8 text: {exc.reason} at byte {exc.start}", file=str(path))
    except OSError as exc:
        return None, Diagnostic(Severity.ERROR, f"cannot read: {exc.strerror}", file=str(path))


YAML_SUFFIXES = (".yaml", ".yml", ".json")


def config_files(paths: list[Path]) -> Iterator[Path]:
    """Expand files and directories (recursively, sorted) into YAML/JSON config files."""
    for path in paths:
        if path.is_dir():
            for child in sorted(path.rglob("*")):
                if child.is_file() and child.suffix in YAML_SUFFIXES and not child.name.startswith("."):
                    yield child
        else:
            yield path
