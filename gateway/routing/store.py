"""The traffic state store: policies with revisions, persisted in a state directory.

Every gateway process on a machine shares one state directory. A change is a
read-modify-write under an exclusive file lock, written atomically (temp file + rename) and
appended to the audit log; other processes notice the new file within ``poll_interval_s``
(a cheap ``stat`` per model) and swap the policy in. A restarted gateway reads the same
files, so it serves with the same revision.

Layout::

    STATE_DIR/traffic/<model>.json    {"policy": {...}, "history": [older policies...]}
    STATE_DIR/audit.jsonl             one line per change: revision, time, actor, op, old, new
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from gateway.errors import Conflict, InvalidInput
from gateway.routing.policy import TrafficPolicy

__all__ = ["PolicyStore", "RevisionConflict"]

log = logging.getLogger(__name__)

HISTORY_KEPT = 50


class RevisionConflict(Conflict):
    """``--if-revision`` did not match: someone else changed the policy first."""


class PolicyStore:
    def __init__(self, state_dir: Path, poll_interval_s: float = 0.2) -> None:
        self.state_dir = state_dir
        self._dir = state_dir / "traffic"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._audit = state_dir / "audit.jsonl"
        self._lock_path = state_dir / ".traffic.lock"
        self.poll_interval_s = poll_interval_s
        self._policies: dict[str, TrafficPolicy] = {}
        self._mtimes: dict[str, int] = {}
        self._listeners: list[Callable[[TrafficPolicy], None]] = []
        self.reload()

    # -- reading -------------------------------------------------------------------------

    def get(self, model: str) -> TrafficPolicy | None:
        return self._policies.get(model)

    def all(self) -> dict[str, TrafficPolicy]:
        return dict(self._policies)

    def subscribe(self, listener: Callable[[TrafficPolicy], None]) -> None:
        self._listeners.append(listener)

    def _path(self, model: str) -> Path:
        return self._dir / f"{model}.json"

    def _read(self, model: str) -> dict[str, Any] | None:
        try:
            document: dict[str, Any] = json.loads(self._path(model).read_text())
        except FileNotFoundError:
            return None
        return document

    def reload(self) -> list[TrafficPolicy]:
        """Pick up files changed by any process; return the policies that changed."""
        changed = []
        for path in self._dir.glob("*.json"):
            model = path.stem
            try:
                mtime = path.stat().st_mtime_ns
            except FileNotFoundError:
                continue
            if self._mtimes.get(model) == mtime:
                continue
            try:
                document = self._read(model)
                if document is None:
                    continue
                policy = TrafficPolicy.model_validate(document["policy"])
            except (ValueError, KeyError, ValidationError) as exc:
                log.error("ignoring unreadable traffic policy %s: %s", path, exc)
                continue
            self._mtimes[model] = mtime
            current = self._policies.get(model)
            if current is None or policy.revision != current.revision:
                self._policies[model] = policy
                changed.append(policy)
        for policy in changed:
            for listener in self._listeners:
                listener(policy)
        return changed

    async def watch(self) -> None:
        """Poll for changes made by other gateway processes (runs until cancelled)."""
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await asyncio.to_thread(self.reload)
            except Exception:
                log.exception("traffic policy reload failed")

    def history(self, model: str) -> list[dict[str, Any]]:
        """Audit entries for ``model``, oldest first."""
        if not self._audit.exists():
            return []
        entries = []
        with self._audit.open() as lines:
            for line in lines:
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if entry.get("model") == model:
                        entries.append(entry)
        return entries

    # -- writing -------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        with self._lock_path.open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def update(
        self,
        model: str,
        operation: str,
        change: Callable[[TrafficPolicy | None, list[dict[str, Any]]], dict[str, Any]],
        *,
        actor: str,
        if_revision: int | None = None,
        default: TrafficPolicy | None = None,
        validate: Callable[[TrafficPolicy], None] | None = None,
    ) -> TrafficPolicy:
        """Apply ``change`` (current policy, older policies) -> new policy fields, atomically.

        ``default`` stands for the current policy when none was ever stored. The new policy
        is validated as a whole before anything is written; the revision is assigned here.
        """
        with self._locked():
            document = self._read(model) or {}
            stored = document.get("policy")
            current = TrafficPolicy.model_validate(stored) if stored else default
            history: list[dict[str, Any]] = document.get("history", [])
            revision = current.revision if current else 0
            if if_revision is not None and if_revision != revision:
                raise RevisionConflict(
                    f"model '{model}' is at revision {revision}, not {if_revision}"
                )
            fields = change(current, history)
            try:
                policy = TrafficPolicy.model_validate(
                    {**fields, "model": model, "revision": revision + 1}
                )
            except ValidationError as exc:
                problems = "; ".join(
                    f"{'.'.join(str(p) for p in e['loc']) or 'policy'}: {e['msg']}"
                    for e in exc.errors()
                )
                raise InvalidInput(
                    f"invalid traffic policy for model '{model}': {problems}"
                ) from None
            if validate is not None:
                validate(policy)
            if current is not None:
                history = [*history, current.model_dump(mode="json")][-HISTORY_KEPT:]
            self._write(model, {"policy": policy.model_dump(mode="json"), "history": history})
            self._append_audit(
                {
                    "model": model,
                    "revision": policy.revision,
                    "time": time.time(),
                    "actor": actor,
                    "operation": operation,
                    "old": current.public() if current else None,
                    "new": policy.public(),
                }
            )
        self.reload()
        return policy

    def _write(self, model: str, document: dict[str, Any]) -> None:
        path = self._path(model)
        temp = path.with_suffix(f".tmp{os.getpid()}")
        temp.write_text(json.dumps(document, indent=1))
        os.replace(temp, path)

    def _append_audit(self, entry: dict[str, Any]) -> None:
        with self._audit.open("a") as audit:
            audit.write(json.dumps(entry) + "\n")
