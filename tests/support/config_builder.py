"""relayd.yaml for tests: one builder with test-friendly defaults and per-test overrides.

``ConfigBuilder(directory)`` keeps every path (spool, state, key file) under ``directory``,
listens on 127.0.0.1 (any free port unless ``port=`` is given) and retries quickly.
``ConfigBuilder()`` (no directory) has no defaults at all: only what the test names, for
in-memory configs (``parse``). Overrides replace top-level keys; a mapping given for a key
whose default is a mapping is merged into it one level deep, so ``spool={"max_age": "4d"}``
keeps the spool path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from relayd.config.load import parse_config
from relayd.config.schema import Config


def default_values(directory: Path) -> dict[str, Any]:
    """What every test config has unless it says otherwise."""
    return {
        "hostname": "relay.test.example",
        "listen": ["127.0.0.1:0"],
        "spool": {"path": str(directory / "spool"), "retry": {"initial": "200ms", "max_interval": "1s"}},
        "state_dir": str(directory / "state"),
        "secrets": {"key_file": str(directory / "secret.key")},
        "logging": {"level": "info"},
    }


def merge(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``overrides`` on top; mappings merged one level deep."""
    data = dict(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


class ConfigBuilder:
    """Builds relayd configs; see the module docstring for the defaults and how overrides apply."""

    def __init__(self, directory: Path | None = None, **defaults: Any) -> None:
        self.directory = directory
        self.defaults = merge(default_values(directory) if directory is not None else {},
                              self._normalise(defaults))

    @staticmethod
    def _normalise(overrides: dict[str, Any]) -> dict[str, Any]:
        out = dict(overrides)
        if "port" in out:                        # shorthand: listen on 127.0.0.1:PORT
            out["listen"] = [f"127.0.0.1:{out.pop('port')}"]
        return out

    def data(self, smarthosts: list[dict[str, Any]] | None = None, **overrides: Any) -> dict[str, Any]:
        """The config as a mapping (what ``text`` dumps)."""
        if smarthosts is not None:
            overrides["smarthosts"] = smarthosts
        return merge(self.defaults, self._normalise(overrides))

    def text(self, smarthosts: list[dict[str, Any]] | None = None, **overrides: Any) -> str:
        """The config as YAML."""
        return yaml.safe_dump(self.data(smarthosts, **overrides), allow_unicode=True)

    def write(self, smarthosts: list[dict[str, Any]] | None = None, *, filename: str = "relayd.yaml",
              **overrides: Any) -> Path:
        """Write the config as ``directory/filename``; returns its path."""
        if self.directory is None:
            raise ValueError("ConfigBuilder() without a directory only builds in-memory configs")
        path = self.directory / filename
        path.write_text(self.text(smarthosts, **overrides))
        return path

    def parse(self, smarthosts: list[dict[str, Any]] | None = None, *, source: Path | None = None,
              **overrides: Any) -> Config:
        """The ``Config`` relayd makes of it, without a file."""
        return parse_config(self.text(smarthosts, **overrides), source=source)


__all__ = ["ConfigBuilder", "default_values", "merge"]
