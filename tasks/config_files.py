"""Config files and command lines as written: the files given to ``--config``, a key written
twice in one (YAML would keep the second silently), and the keys a command line sets."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import yaml


def config_files(argv: Sequence[str]) -> list[str]:
    """The files given to ``--config`` / ``-c`` on a command line."""
    files = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("--config", "-c")]
    return files + [arg.split("=", 1)[1] for arg in argv if arg.startswith("--config=")]


class _DuplicateKeyError(yaml.constructor.ConstructorError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader refusing a mapping key written twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first: dict[object, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, str):
                continue
            if key in first:
                raise _DuplicateKeyError(
                    None, None, f"{key!r} (first at line {first[key] + 1})", key_node.start_mark
                )
            first[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def config_file_problem(path: Path) -> str | None:
    """``<file>:<line>: duplicate key ...`` for a YAML file with a key written twice in one
    mapping, ``<file>:<line>:<column>: not valid YAML ...`` (a tab, a bad token), ``<file>: ...
    expected a mapping`` for a file that is a list or a scalar, else ``None`` (an unreadable file
    is jsonargparse's to report)."""
    try:
        content = yaml.load(path.read_text(encoding="utf-8-sig"), Loader=_UniqueKeyLoader)
    except _DuplicateKeyError as error:
        line = error.problem_mark.line + 1 if error.problem_mark else "?"
        return (
            f"{path}:{line}: duplicate key {error.problem}; YAML would keep the second value "
            "silently, so the config is refused"
        )
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark
        where = f"{mark.line + 1}:{mark.column + 1}" if mark else "?"
        line = path.read_text(encoding="utf-8-sig").splitlines()[mark.line] if mark else ""
        hint = "; YAML indents with spaces, not tabs" if "\t" in line else ""
        return f"{path}:{where}: not valid YAML ({error.problem}){hint}"
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if content is not None and not isinstance(content, dict):
        return (
            f"{path}: a config is a mapping of options (trainer:, model:, data: ...), got a "
            f"YAML {'list' if isinstance(content, list) else type(content).__name__}"
        )
    return None


def flatten(tree: object, prefix: str = "") -> dict[str, object]:
    """``{"a.b.c": leaf}`` of nested dicts (lists and other values are leaves)."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, object] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def command_line_keys(argv: Sequence[str], group: str) -> set[str]:
    """The keys under ``group`` that a command line sets (``--model.head X``, ``--model.lr=1``
    give ``head``, ``lr``)."""
    keys = set()
    for arg in argv:
        name = arg.split("=", 1)[0]
        if name.startswith(f"--{group}."):
            keys.add(name.removeprefix(f"--{group}."))
    return keys
