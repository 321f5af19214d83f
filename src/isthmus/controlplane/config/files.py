"""Directory source: every YAML file under a directory is one source of the ConfigStore.

The initial scan is synchronous (the control plane must not serve before it has read
its config); afterwards ``watch`` follows changes with watchfiles (inotify) and
re-reads only the files that changed.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from isthmus.api.loader import YAML_SUFFIXES, config_files, read_config_file
from isthmus.controlplane.config.store import ConfigStore
from isthmus.core.errors import Diagnostic

log = logging.getLogger(__name__)


def source_name(path: Path) -> str:
    return f"file:{path}"


MESH_CONFIG_FILE = "mesh.yaml"  # Istio meshConfig, read by the app, not a resource file


def _is_config_file(path: Path) -> bool:
    return path.suffix in YAML_SUFFIXES and not path.name.startswith(".") and path.name != MESH_CONFIG_FILE


class DirectorySource:
    def __init__(self, store: ConfigStore, directory: Path) -> None:
        self.store = store
        self.directory = directory.resolve()

    def load_file(self, path: Path) -> list[Diagnostic]:
        text, problem = read_config_file(path)
        if problem is not None:
            if not path.exists():
                self.store.remove_source(source_name(path))
                return []
            # Unreadable now (too large, not UTF-8): what it had keeps serving.
            return [problem]
        assert text is not None
        return self.store.update_source_text(source_name(path), text, str(path))

    def scan(self) -> list[Diagnostic]:
        """Load every config file; forget sources whose files are gone."""
        diagnostics: list[Diagnostic] = []
        seen = set()
        if not self.directory.is_dir():
            raise FileNotFoundError(f"config directory {self.directory} does not exist")
        for path in config_files([self.directory]):
            if not _is_config_file(path):
                continue
            seen.add(source_name(path))
            diagnostics += self.load_file(path)
        for source in self.store.sources():
            if source.startswith("file:") and source not in seen:
                self.store.remove_source(source)
        for d in diagnostics:
            log.warning("%s", d)
        return diagnostics

    async def watch(self, stop: asyncio.Event) -> None:
        """Follow changes until ``stop`` is set."""
        from watchfiles import Change, awatch

        async for changes in awatch(self.directory, stop_event=stop, debounce=100, step=25, recursive=True):
            for change, raw in sorted(changes, key=lambda c: c[1]):
                path = Path(raw)
                if not _is_config_file(path):
                    continue
                if change == Change.deleted or not path.exists():
                    log.info("config file removed: %s", path)
                    self.store.remove_source(source_name(path))
                    continue
                for d in self.load_file(path):
                    log.warning("%s", d)
                log.info("config file reloaded: %s (store version %d)", path, self.store.version)
