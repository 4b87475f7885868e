"""A stage's cache directory, the one shape every cached stage uses (augmentation, selection, the reference
log-probs, on-policy rounds, synthetic pairs).

``StageCache`` is a directory and four things in it:

- its **key**: the directory is ``<root>/<key>``, the key a digest of what the output depends on (``identity``,
  composed by the stage: ``miadpo.fingerprint.digest`` with the stage's algorithm and length), or a fixed
  directory (``data.out_dir`` for the augmentation) whose manifest says what it holds;
- its **manifest**: the identity as JSON, written once, so a reader sees what a directory was made from;
- its **lock**: held by the one process writing it (``miadpo.locks``: a second writer fails at once naming the
  holder; readers of a finished directory take none);
- its **done marker**: the file whose presence (written last, atomically) makes the output finished.

Stages that write from several processes give each rank its own **shard** (``shards`` lists them) and merge them
once every rank finished.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from miadpo.data.jsonl import atomic_replace
from miadpo.locks import stage_lock


@dataclass(frozen=True)
class StageCache:
    """The cache directory of one stage output (see the module doc); ``what`` names it in lock messages."""

    directory: Path
    identity: Any = None
    what: str = "the stage's output"
    manifest_name: str = "manifest.json"
    lock_name: str = "stage.lock"
    done_name: str = "done.json"

    @classmethod
    def keyed(cls, root: str | Path, identity: Any, key: Callable[[Any], str], **names: str) -> StageCache:
        """The cache ``<root>/<key(identity)>`` (``names``: the file names and ``what``)."""
        return cls(Path(root) / key(identity), identity, **names)

    @property
    def manifest(self) -> Path:
        """The manifest file."""
        return self.directory / self.manifest_name

    @property
    def done(self) -> Path:
        """The done marker."""
        return self.directory / self.done_name

    def is_done(self) -> bool:
        """Whether the output is finished (its done marker exists)."""
        return self.done.is_file()

    def stored_identity(self) -> Any | None:
        """The identity in the manifest (None without one)."""
        return json.loads(self.manifest.read_text()) if self.manifest.is_file() else None

    def record_identity(self) -> None:
        """Creates the directory and writes the manifest, once (an existing one is left as it is)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.manifest.exists():
            with atomic_replace(self.manifest) as tmp:
                tmp.write_text(json.dumps(self.identity, indent=2, sort_keys=True, default=str) + "\n")

    @contextmanager
    def writing(self, lock_name: str | None = None) -> Iterator[None]:
        """Holds the directory's lock (or the lock ``lock_name``, a rank's shard's) while the block writes."""
        self.directory.mkdir(parents=True, exist_ok=True)
        with stage_lock(self.directory / (lock_name or self.lock_name), self.what):
            yield

    def finish(self, text: str) -> None:
        """Writes the done marker (atomically: it exists whole or not at all)."""
        with atomic_replace(self.done) as tmp:
            tmp.write_text(text)

    def wait_until_done(self, timeout_s: float, poll_s: float = 1.0) -> None:
        """Waits for another process to finish the output (TimeoutError naming the directory after ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        while not self.is_done():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.directory}: {self.what} was not finished by the process writing it within "
                                   f"{timeout_s:g} s (its {self.lock_name} names it)")
            time.sleep(poll_s)

    def shards(self, pattern: str) -> list[Path]:
        """The ranks' shard files matching ``pattern``, in name order."""
        return sorted(self.directory.glob(pattern))
