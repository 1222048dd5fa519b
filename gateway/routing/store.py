"""The traffic state store: policies with revisions, persisted in a state directory.

Every gateway process on a machine shares one state directory. A change is a
compare-and-set under an exclusive file lock (``commit``): the new policy is written
atomically (temp file + rename) only when the stored revision is still the one the change
was computed from, and appended to the audit log. Other processes notice the new file
within ``poll_interval_s`` (a cheap ``stat`` per model) and swap the policy in. A restarted
gateway reads the same files, so it serves with the same revision.

Layout::

    STATE_DIR/traffic/<model>.json    {"policy": {...}, "history": [older policies...]}
    STATE_DIR/audit.jsonl             one line per change: revision, time, actor, op, old, new
    STATE_DIR/leases.json             {name: {"holder": id, "expires": wall clock}}

``BasePolicyStore`` is what the router and the admin use; ``PolicyStore`` here serves one
machine, ``gateway.routing.ray_store.RayPolicyStore`` a Ray cluster (a detached actor that
keeps this layout in the state directory of the head node).
"""

from __future__ import annotations

import abc
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

from gateway.errors import InvalidInput, RevisionConflict, StateUnwritable
from gateway.routing.operations import build_policy
from gateway.routing.policy import TrafficPolicy
from turnout_contract.names import check_model_name, contained

__all__ = ["BasePolicyStore", "PolicyStore"]

log = logging.getLogger(__name__)

HISTORY_KEPT = 50
COMMIT_ATTEMPTS = 20
"""``update`` recomputes a change this often when other writers keep committing first."""


Change = Callable[[TrafficPolicy | None, list[dict[str, Any]]], dict[str, Any]]


class BasePolicyStore(abc.ABC):
    """Every model's current policy, cached in this process and kept fresh by ``watch``.

    Reads (``get``, ``all``) never leave the process. A change is ``read`` -> compute the new
    fields -> validate -> ``commit``, a compare-and-set on the revision; ``update`` runs that
    loop and recomputes the change when another writer committed in between.
    """

    def __init__(self, poll_interval_s: float) -> None:
        self.poll_interval_s = poll_interval_s
        self._policies: dict[str, TrafficPolicy] = {}
        self._listeners: list[Callable[[TrafficPolicy], None]] = []

    # -- the local cache -----------------------------------------------------------------

    def get(self, model: str) -> TrafficPolicy | None:
        return self._policies.get(model)

    def all(self) -> dict[str, TrafficPolicy]:
        return dict(self._policies)

    def subscribe(self, listener: Callable[[TrafficPolicy], None]) -> None:
        self._listeners.append(listener)

    def _publish(self, changed: list[TrafficPolicy]) -> None:
        for policy in changed:
            for listener in self._listeners:
                listener(policy)

    def connect(self) -> None:
        """Attach to the shared state and fill the cache (before the gateway serves)."""
        self.reload()

    @abc.abstractmethod
    def reload(self) -> list[TrafficPolicy]:
        """Pick up changes made by any process; return the policies that changed."""

    async def _poll(self) -> None:
        await asyncio.to_thread(self.reload)

    async def watch(self) -> None:
        """Poll for changes made by other gateway processes (runs until cancelled)."""
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                await self._poll()
            except Exception:
                log.exception("traffic policy reload failed")

    @abc.abstractmethod
    def history(self, model: str) -> list[dict[str, Any]]:
        """Audit entries for ``model``, oldest first."""

    @abc.abstractmethod
    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> str:
        """Take or renew the lease ``name`` for ``holder`` for ``ttl_s`` seconds; the holder
        after the call (``holder`` when it has the lease, another one's id when not).

        One holder at a time across every gateway sharing the store: the rollout controller
        of a model acts only while it holds the model's lease, and a lease whose holder
        stopped renewing it is taken over once it expires.
        """

    # -- the shared state ----------------------------------------------------------------

    @abc.abstractmethod
    def read(self, model: str) -> tuple[TrafficPolicy | None, list[dict[str, Any]]]:
        """The stored policy (None when none was ever stored) and older policies, oldest first."""

    @abc.abstractmethod
    def commit(
        self,
        model: str,
        fields: dict[str, Any],
        *,
        expected_revision: int,
        operation: str,
        actor: str,
        base: TrafficPolicy | None = None,
    ) -> TrafficPolicy:
        """Store ``fields`` as revision ``expected_revision + 1``, if the stored revision is
        still ``expected_revision`` (0: none stored); RevisionConflict otherwise.

        ``base`` is the policy the change was computed from when none was stored (the
        default policy): it enters the history and the audit entry as the old policy.
        """

    def update(
        self,
        model: str,
        operation: str,
        change: Change,
        *,
        actor: str,
        if_revision: int | None = None,
        default: TrafficPolicy | None = None,
        validate: Callable[[TrafficPolicy], None] | None = None,
    ) -> TrafficPolicy:
        """Apply ``change`` (current policy, older policies) -> new policy fields, atomically.

        ``default`` stands for the current policy when none was ever stored. The new policy
        is validated as a whole (then by ``validate``) before it is committed; the revision
        is assigned here. A mismatched ``if_revision`` raises RevisionConflict; a commit that
        loses a race against another writer is recomputed from the winner's policy.
        """
        for _ in range(COMMIT_ATTEMPTS):
            stored, history = self.read(model)
            current = stored or default
            revision = stored.revision if stored else 0
            if if_revision is not None and if_revision != revision:
                raise RevisionConflict(
                    f"model '{model}' is at revision {revision}, not {if_revision}"
                )
            fields = change(current, history)
            policy = build_policy(model, fields, revision + 1)
            if validate is not None:
                validate(policy)
            try:
                return self.commit(
                    model,
                    fields,
                    expected_revision=revision,
                    operation=operation,
                    actor=actor,
                    base=current,
                )
            except RevisionConflict:
                log.info("traffic policy of '%s' changed during %s; recomputing", model, operation)
        raise RevisionConflict(
            f"model '{model}' changed {COMMIT_ATTEMPTS} times while '{operation}' was being "
            "applied; try again"
        )


class PolicyStore(BasePolicyStore):
    """Policies in ``state_dir``, shared by every gateway process on this machine."""

    def __init__(self, state_dir: Path, poll_interval_s: float = 0.2) -> None:
        super().__init__(poll_interval_s)
        self.state_dir = state_dir
        self._dir = state_dir / "traffic"
        self._dir.mkdir(parents=True, exist_ok=True)
        self._audit = state_dir / "audit.jsonl"
        self._lock_path = state_dir / ".traffic.lock"
        self._mtimes: dict[str, tuple[int, int, int]] = {}
        self.reload()

    # -- reading -------------------------------------------------------------------------

    def _path(self, model: str) -> Path:
        try:
            return contained(self._dir, f"{check_model_name(model)}.json")
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None

    def _read(self, model: str) -> dict[str, Any] | None:
        try:
            document: dict[str, Any] = json.loads(self._path(model).read_text())
        except FileNotFoundError:
            return None
        return document

    def read(self, model: str) -> tuple[TrafficPolicy | None, list[dict[str, Any]]]:
        document = self._read(model) or {}
        stored = document.get("policy")
        history: list[dict[str, Any]] = document.get("history", [])
        return (TrafficPolicy.model_validate(stored) if stored else None), history

    def reload(self) -> list[TrafficPolicy]:
        """Pick up files changed by any process; return the policies that changed."""
        changed = []
        for path in self._dir.glob("*.json"):
            model = path.stem
            try:
                stat = path.stat()
            except FileNotFoundError:
                continue
            # Each write is a rename onto the path: a new inode, even within one mtime tick.
            mtime = (stat.st_mtime_ns, stat.st_ino, stat.st_size)
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
            # Only forward: a poll that read the file just before our own write must not
            # put the older revision back.
            if current is None or policy.revision > current.revision:
                self._policies[model] = policy
                changed.append(policy)
        self._publish(changed)
        return changed

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

    def commit(
        self,
        model: str,
        fields: dict[str, Any],
        *,
        expected_revision: int,
        operation: str,
        actor: str,
        base: TrafficPolicy | None = None,
    ) -> TrafficPolicy:
        with self._locked():
            stored, history = self.read(model)
            revision = stored.revision if stored else 0
            if revision != expected_revision:
                raise RevisionConflict(
                    f"model '{model}' is at revision {revision}, not {expected_revision}"
                )
            policy = build_policy(model, fields, revision + 1)
            previous = stored or base
            if previous is not None:
                history = [*history, previous.model_dump(mode="json")][-HISTORY_KEPT:]
            entry = {
                "model": model,
                "revision": policy.revision,
                "time": time.time(),
                "actor": actor,
                "operation": operation,
                "old": previous.public() if previous else None,
                "new": policy.public(),
            }
            document = {"policy": policy.model_dump(mode="json"), "history": history}
            self._write(model, document, entry)
        self.reload()
        return policy

    def _write(self, model: str, document: dict[str, Any], audit: dict[str, Any]) -> None:
        """The new policy file and its audit line, or neither: the file is written aside,
        the audit line appended, and only then is the file renamed into place (a rename
        needs no free space). A full or read-only disk refuses the change (507)."""
        path = self._path(model)
        temp = path.with_suffix(f".tmp{os.getpid()}")
        try:
            temp.write_text(json.dumps(document, indent=1))
            self._append_audit(audit)
            os.replace(temp, path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            log.error("state dir %s refused the policy of '%s': %s", self.state_dir, model, exc)
            raise StateUnwritable(
                f"the policy of model '{model}' was not changed: the state dir "
                f"{self.state_dir} refused the write ({exc.strerror or exc}); free space there "
                "and retry"
            ) from None

    def acquire_lease(self, name: str, holder: str, ttl_s: float) -> str:
        path = self.state_dir / "leases.json"
        with self._locked():
            try:
                leases: dict[str, Any] = json.loads(path.read_text())
            except (FileNotFoundError, ValueError):
                leases = {}
            now = time.time()
            current = leases.get(name)
            if current and current.get("holder") != holder and current.get("expires", 0) > now:
                return str(current["holder"])
            leases[name] = {"holder": holder, "expires": now + ttl_s}
            temp = path.with_suffix(f".tmp{os.getpid()}")
            temp.write_text(json.dumps(leases))
            os.replace(temp, path)
        return holder

    def _append_audit(self, entry: dict[str, Any]) -> None:
        with self._audit.open("a") as audit:
            size = audit.tell()
            try:
                audit.write(json.dumps(entry) + "\n")
                audit.flush()
            except OSError:
                with contextlib.suppress(OSError):  # no half line for the next entry to join
                    audit.truncate(size)
                raise
