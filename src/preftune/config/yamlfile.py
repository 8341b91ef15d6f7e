"""A YAML file read as plain data: yaml's SafeLoader (no tags that build objects), a key given
twice in one mapping refused (not the last one silently kept), merge keys (``<<: *base``)
accepted, and every problem a :class:`~preftune.errors.ConfigError` naming the file."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from preftune.errors import ConfigError


def read_yaml(path: str | Path, what: str = "config file") -> dict[str, Any]:
    """The mapping at the top of the YAML file ``path`` ({} when empty), or a ConfigError naming it."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found." if not path.exists() else f"{path}: not a regular file.")
    try:
        loaded = yaml.load(path.read_text(encoding="utf-8"), Loader=strict_loader())  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}).") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply.") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}.")
    return loaded


def strict_loader() -> type:
    """yaml's SafeLoader, but a key given twice in one mapping is an error (merge keys are SafeLoader's own)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged by SafeLoader, its keys overridable once
                    continue
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"the key '{key}' is given twice", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return StrictLoader
