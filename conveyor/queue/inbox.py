"""Taking files in: validate, fingerprint, copy into the workspace (content-addressed), and enqueue a job.

The person's file is only read, never modified, and never removed unless an identical copy is kept in the
workspace (law 6): every file taken in ends byte-identical in claimed/, finished/ or rejected/.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .. import faults
from ..data.formats import scan_file
from ..data.kept import REASON, _move_new, kept_path, printable
from ..errors import DataError, StoredDataError
from ..fingerprint import FileHashes, copy_hashing, fingerprint, short
from ..overrides import describe
from ..store import jobs
from ..store.database import log_event
from ..store.jobs import Job, JobState
from ..store.reconcile import FRESH
from ..store.runs import active
from ..store.workspace import Workspace

# Same bytes as one of these jobs: that job carries on from its own position, never a second copy (laws 2, 4).
CARRIES_ON = (JobState.RUNNING, JobState.INTERRUPTED)


@dataclass
class Enqueued:
    job: Job
    messages: list[str] = field(default_factory=list)  # warnings and notices for the person
    new: bool = True  # False: the file is the same dataset as `job`, which existed already


def store(ws: Workspace, source: Path, hashes: FileHashes | None = None) -> tuple[str, Path, str | None]:
    """Fingerprint the file and keep its bytes in data/<sha256>.jsonl (once per content), verified. The third
    value says what was wrong with a copy that jobs had and that this one restores (None: there was none).
    `hashes`: where the copy's hash is recorded, saved by the caller (the inbox: once a scan); else here."""
    ws.data.mkdir(exist_ok=True)
    fp = fingerprint(source)
    target = ws.data / f"{fp}.jsonl"
    if target.exists():
        found = fingerprint(target)
        if found == fp:
            return fp, target, None
        restores = f"held {target.stat().st_size} bytes with sha256 {short(found)}… instead of {short(fp)}…"
    else:
        known = ws.db.execute("SELECT 1 FROM jobs WHERE fingerprint = ? AND state != 'rejected'", (fp,)).fetchone()
        restores = "was missing" if known else None
    tmp = ws.data / f".{fp}.{os.getpid()}.tmp"
    try:
        if copy_hashing(source, tmp) != fp:  # the bytes copied are not the bytes fingerprinted
            raise DataError(f"{printable(str(source))}: the file changed while it was being copied; "
                            "add it again once it is complete")
        os.replace(tmp, target)
    finally:
        if tmp.exists():  # a failed copy (changed, disk full) leaves nothing behind
            tmp.unlink()
    own = hashes is None
    hashes = FileHashes(ws.data) if own else hashes  # hashed as copied: the check when its job starts is a stat
    hashes.record(target, fp)
    if own:
        hashes.save()
    return fp, target, restores


def reject(ws: Workspace, source: Path, fp: str, stored: Path, reason: str, priority: int) -> Enqueued:
    """A `rejected` job, with an identical copy of the file in rejected/ and the reason beside it."""
    name = printable(source.name)
    job = jobs.insert(ws.db, file=name, source=printable(str(source)), stored=str(stored), fingerprint=fp,
                      priority=priority, state=JobState.REJECTED, error=reason)
    kept = kept_path(ws.rejected, job.id, name)
    if copy_hashing(stored, kept, exclusive=True) != fp:  # data/ was altered behind conveyor's back
        raise DataError(f"{printable(str(stored))} no longer holds the bytes {short(fp)}; run `conveyor doctor`")
    (ws.rejected / (kept.name + REASON)).write_text(reason + "\n", encoding="utf-8")
    jobs.update(ws.db, job.id, kept=str(kept))
    log_event(ws.db, "error", "rejected", reason, job.id)
    return Enqueued(jobs.get(ws.db, job.id), [reason])


def unexpected(name: str, error: BaseException) -> str:
    """The reason for a file that failed in a way no check foresaw; the file is kept with it."""
    if isinstance(error, MemoryError):
        return (f"{name}: rejected, nothing trained from it: the machine ran out of memory while checking it; "
                "split it into smaller files and add them again")
    return (f"{name}: rejected, nothing trained from it: checking it failed unexpectedly "
            f"({type(error).__name__}: {error}); the file is kept with this reason, please report it as a bug")


def enqueue(ws: Workspace, source: Path, priority: int = jobs.PRIORITIES["normal"], epochs: int = 1,
            join_queued: bool = False, overrides: dict | None = None) -> Enqueued:
    """Validate and enqueue one file; a bad file becomes a `rejected` job with every problem listed.

    join_queued: the same bytes already queued are that job, not a second one (the inbox: a file dropped again
    before it trained). The CLI queues exactly what it is given."""
    source = Path(source)
    if source.is_dir():
        raise DataError(f"{source} is a folder; pass the JSONL files in it (e.g. {source}/*.jsonl)")
    if not source.exists():
        raise DataError(f"{source}: no such file; check the path")
    if not source.is_file():
        raise DataError(f"{source} is not a regular file (a pipe, socket or device); copy the data into a .jsonl file")
    fp, stored, restores = store(ws, source)
    return enqueue_stored(ws, source, fp, stored, priority, epochs, join_queued, restores, overrides)


def enqueue_stored(ws: Workspace, source: Path, fp: str, stored: Path, priority: int, epochs: int,
                   join_queued: bool = False, restores: str | None = None, overrides: dict | None = None) -> Enqueued:
    """enqueue() once the bytes are in data/: validate, recognise the same dataset, insert the job.

    restores: what was wrong with the stored copy these bytes replaced. Jobs that stopped for it go back in the
    queue, and a queued job of these bytes is this file (it would have stopped for it): no second job."""
    name = printable(source.name)
    try:
        fmt, examples = scan_file(stored, name)  # streamed: the daemon never holds a file's records
    except DataError as e:
        return reject(ws, source, fp, stored, str(e), priority)
    except Exception as e:  # MemoryError, or a case no check foresaw: this file is rejected, nothing else stops
        return reject(ws, source, fp, stored, unexpected(name, e), priority)
    restored = [f"data/{fp}.jsonl {restores}; {name} restores it"] if restores else []
    for text in restored:
        log_event(ws.db, "warning", "restored", text)
    # Failed because the copy of these bytes was missing or altered (their own, or one they replay or evaluate).
    stopped = jobs.failed_mentioning(ws.db, StoredDataError.names(fp))
    if stopped:
        return _back_in_queue(ws, name, fp, stopped, restored)
    same = jobs.of_data(ws.db, fp)
    joined = [j for j in same if j.state in CARRIES_ON or ((join_queued or restores) and j.state == JobState.QUEUED)]
    if joined:
        found = _same_dataset(ws, name, joined[0])
        found.messages[:0] = restored
        if overrides and overrides != joined[0].overrides:
            found.messages.append(f"--set {', '.join(overrides)} not applied: job {joined[0].id} trains these bytes "
                                  "with the settings it was queued with")
        return found
    messages = [f"{name} has the same bytes ({short(fp)}) as job {j.id} ({j.file}, trained at steps "
                f"{j.start_step}–{j.end_step}); see data.skip_duplicates" for j in same if j.state == JobState.DONE]
    job = jobs.insert(ws.db, file=name, source=printable(str(source.resolve())), stored=str(stored),
                      fingerprint=fp, priority=priority, state=JobState.QUEUED, format=fmt,
                      examples=examples, epochs=epochs, overrides=overrides)
    settings = f"; with {describe(overrides)}" if overrides else ""
    log_event(ws.db, "info", "queued", f"job {job.id}: {name} ({examples} examples, {fmt}, {short(fp)}){settings}",
              job.id)
    return Enqueued(job, messages)


def _back_in_queue(ws: Workspace, name: str, fp: str, stopped: list[Job], messages: list[str]) -> Enqueued:
    """Jobs that failed because data/<fp>.jsonl was missing or altered wait again, now that it holds these bytes:
    one stopped mid-way in the active run as interrupted (it resumes from its own position, which every checkpoint
    since kept: law 2), any other as queued."""
    run = active(ws.db)
    for job in stopped:
        if job.steps_done and run is not None and job.run_id == run.id:
            jobs.transition(ws.db, job.id, JobState.INTERRUPTED, expect=JobState.FAILED, error=None, attempts=0)
            where = f"interrupted: it resumes at its step {job.steps_done + 1} of {job.planned_steps}"
        else:
            jobs.transition(ws.db, job.id, JobState.QUEUED, expect=JobState.FAILED, error=None, attempts=0, **FRESH)
            where = "queued"
        messages.append(f"job {job.id} ({job.file}), which had stopped for data/{short(fp)}….jsonl, is back in the "
                        f"queue, {where}")
        log_event(ws.db, "info", "restored", messages[-1], job.id)
    return Enqueued(jobs.get(ws.db, stopped[0].id), messages, new=False)


def _same_dataset(ws: Workspace, name: str, job: Job) -> Enqueued:
    if job.state == JobState.QUEUED:
        where = "which is queued; no new job, it trains once"
    elif job.state == JobState.INTERRUPTED:
        where = (f"which stopped at step {job.steps_done} of {job.planned_steps}; no new job, job {job.id} "
                 "resumes where it stopped")
    else:
        where = (f"which is under way (step {job.steps_done} of {job.planned_steps}); no new job, job {job.id} "
                 "carries on from its own position")
    message = f"{name} is the same dataset ({short(job.fingerprint)}) as job {job.id} ({job.file}), {where}"
    log_event(ws.db, "info", "recognised", message, job.id)
    return Enqueued(job, [message], new=False)


PRIORITY_FOLDERS = {"high": jobs.PRIORITIES["high"], "low": jobs.PRIORITIES["low"]}
IGNORED_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload")
RETRY_SECONDS = 60.0  # a file that could not be claimed is tried again when it changes, or after this long
CLAIMS_PER_SCAN = 32  # files claimed in one scan: a burst of thousands never keeps the daemon from its controls


class Inbox:
    """Watches inbox/ (inotify through watchdog, with a polling scan as fallback) and claims settled files.

    Nothing in one file (its content, its name, its kind) may end the daemon: every failure is that file's
    alone, rejected with its reason or reported once and left in place."""

    def __init__(self, ws: Workspace, settle_seconds: float, say, epochs: Callable[[], int] | None = None):
        self.ws = ws
        self.settle = settle_seconds
        self.say = say
        self.epochs = epochs  # training.epochs for new jobs; None: read from conveyor.toml at each claim
        self.changed = threading.Event()  # set by file-system events: rescan now
        self._seen: dict[Path, tuple[tuple, float]] = {}  # path → (signature, since when unchanged)
        self._reported: dict[Path, tuple] = {}  # entries reported once as not claimable
        self._failed: dict[Path, tuple[tuple, float]] = {}  # not claimed: (signature, when to try again)
        self._last_epochs = 1  # the last valid training.epochs
        self._observer = None
        self._hashes: FileHashes | None = None  # the scan's, saved at its end

    def start(self) -> None:
        self.ws.inbox.mkdir(exist_ok=True)
        for name in PRIORITY_FOLDERS:
            try:
                (self.ws.inbox / name).mkdir(exist_ok=True)
            except OSError as e:  # e.g. a file named `high`: that priority is unavailable, the rest works
                self.say("warning", f"inbox: cannot make inbox/{name}/ ({e}); move what is there away")
        try:
            from watchdog.events import FileSystemEventHandler
            from watchdog.observers import Observer

            changed = self.changed

            class Handler(FileSystemEventHandler):
                def on_any_event(self, event):
                    changed.set()

            self._observer = Observer()
            self._observer.schedule(Handler(), str(self.ws.inbox), recursive=True)
            self._observer.start()
        except Exception as e:  # no inotify (some network file systems): the polling scan still works
            self.say("warning", f"file-system events unavailable ({e}); scanning inbox/ by polling")
            self._observer = None

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(timeout=5)

    def settling(self) -> bool:
        """Whether some file is waiting to settle (the daemon then rescans sooner)."""
        return bool(self._seen)

    def scan(self) -> list[Enqueued]:
        """Claim settled files, CLAIMS_PER_SCAN at most (the daemon acts on controls and starts training between
        scans, however many files arrive at once); report (once) entries that cannot be claimed."""
        self.changed.clear()
        now = time.monotonic()
        claimed = []
        present = list(self._entries())
        self._hashes = FileHashes(self.ws.data)  # the copies' hashes, saved once a scan (not once a file)
        for path, priority in present:
            signature = self._signature(path)
            if signature is None or self._waiting_to_retry(path, signature, now):
                continue
            previous = self._seen.get(path)
            if previous is None or previous[0] != signature:
                self._seen[path] = (signature, now)
                continue
            if now - previous[1] >= self.settle and len(claimed) < CLAIMS_PER_SCAN:
                result = self._claim(path, priority, signature)
                if result:
                    claimed.append(result)
        if self._hashes.changed:
            self._hashes.save()
        paths = {path for path, _ in present}
        for gone in set(self._seen) - paths:
            del self._seen[gone]  # deleted or renamed before it settled: nothing to do
        for gone in set(self._failed) - paths:
            del self._failed[gone]
        return claimed

    def _waiting_to_retry(self, path: Path, signature: tuple, now: float) -> bool:
        failed = self._failed.get(path)
        return failed is not None and failed[0] == signature and now < failed[1]

    def _entries(self):
        """(path, priority) of each claimable file; the others are reported once."""
        for folder, priority in [(self.ws.inbox, jobs.PRIORITIES["normal"]),
                                 *[(self.ws.inbox / n, p) for n, p in PRIORITY_FOLDERS.items()]]:
            try:
                names = sorted(os.listdir(folder))
            except (FileNotFoundError, NotADirectoryError):  # a file named `high` is reported as what it is
                continue
            except OSError as e:  # not a folder, no permission: the other folders are still scanned
                self._report_once(folder, f"cannot be listed ({e})")
                continue
            for name in names:
                path = folder / name
                if name.startswith(".") or name.endswith(IGNORED_SUFFIXES):
                    continue  # hidden or still being written (a `.part` is renamed when complete)
                if folder == self.ws.inbox and name in PRIORITY_FOLDERS and path.is_dir():
                    continue
                try:
                    problem = self._unclaimable(path)
                except Exception as e:  # e.g. a name the file system cannot stat: that entry alone is skipped
                    problem = f"cannot be examined ({type(e).__name__}: {e})"
                if problem:
                    self._report_once(path, problem)
                    continue
                yield path, priority

    def _unclaimable(self, path: Path) -> str | None:
        if path.is_symlink():
            problem = self._symlink_problem(path)
            if problem:
                return problem
        if path.is_dir():
            return "a folder; put .jsonl files directly in inbox/ (or inbox/high/, inbox/low/)"
        if path.suffix != ".jsonl":
            return "not a .jsonl file; conveyor only takes JSONL (one JSON object a line)"
        if not path.is_file():  # a FIFO would block the reader forever; a device never ends
            return "not a regular file (a pipe, socket or device); copy the data into a .jsonl file"
        return None

    def _symlink_problem(self, path: Path) -> str | None:
        try:
            target = path.resolve(strict=True)
        except FileNotFoundError:
            return f"a symlink to {printable(os.readlink(path))}, which does not exist; copy the file in instead"
        except (OSError, RuntimeError):  # RuntimeError: a symlink loop (Python < 3.13)
            return "a symlink that loops back on itself; copy the file in instead"
        if not target.is_relative_to(self.ws.inbox.resolve()):
            return f"a symlink to {printable(str(target))}, outside the inbox; copy the file in instead"
        return None

    def _report_once(self, path: Path, problem: str, signature: tuple = ()) -> None:
        if self._reported.get(path) == (problem, signature):
            return
        self._reported[path] = (problem, signature)
        where = printable(str(path.relative_to(self.ws.inbox))) if path != self.ws.inbox else "inbox/"
        self.say("warning", f"inbox: left {where} in place: {problem}")

    def _signature(self, path: Path) -> tuple | None:
        try:
            st = path.stat()
        except OSError:
            return None
        # ctime too: a chmod that makes an unreadable file readable changes only that.
        return (st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns)

    def _epochs_now(self) -> int:
        """training.epochs for a new job; while conveyor.toml is invalid (the daemon says why), the last valid."""
        try:
            self._last_epochs = int(self.epochs() if self.epochs else self.ws.config().training.epochs)
        except Exception:
            pass
        return self._last_epochs

    def _claim(self, path: Path, priority: int, signature: tuple) -> Enqueued | None:
        """Enqueue (verified copy), then move the person's file out of the inbox; it is never lost."""
        del self._seen[path]
        try:
            result = self._enqueue(path, priority, signature)
        except Exception as e:  # last resort: nothing about one file may end the daemon
            if faults.is_disk_full(e):  # not the file's fault: retried on a timer, never rejected
                self._failed_once(path, signature, f"not claimed yet: the disk is full ({e}); retried once there "
                                  "is room", retry=RETRY_SECONDS)
                return None
            self._failed_once(path, signature, f"cannot be claimed ({type(e).__name__}: {e}); touch or copy it "
                              "again to retry")
            return None
        if result is None:
            return None
        try:
            self._keep_original(path, signature, result)
        except Exception as e:  # the job stands (its bytes are in data/); the person's file stays where it is
            self._failed_once(path, signature, f"taken as job {result.job.id}, but it could not be moved out of "
                              f"the inbox ({type(e).__name__}: {e})")
        return result

    def _failed_once(self, path: Path, signature: tuple, problem: str, retry: float = float("inf")) -> None:
        """Report once; try again when the file changes, or after `retry` seconds. Only reading is retried on a
        timer: a failure after a job was recorded would record another at every attempt."""
        self._failed[path] = (signature, time.monotonic() + retry)
        self._report_once(path, problem, signature)

    def _enqueue(self, path: Path, priority: int, signature: tuple) -> Enqueued | None:
        epochs = self._epochs_now()
        try:
            fp, stored, restores = store(self.ws, path, self._hashes)
        except (OSError, DataError) as e:  # vanished, unreadable, or still changing: it stays where it is
            problem = f"not claimed yet: the disk is full ({e}); retried once there is room" \
                if faults.is_disk_full(e) else f"cannot be read ({e})"
            self._failed_once(path, signature, problem, retry=RETRY_SECONDS)
            return None
        try:
            return enqueue_stored(self.ws, path, fp, stored, priority, epochs, join_queued=True, restores=restores)
        except Exception as e:  # its bytes are safe in data/: reject it with the reason rather than retry forever
            if faults.is_disk_full(e):
                raise  # the disk, not the file: claimed again once there is room
            return reject(self.ws, path, fp, stored, unexpected(printable(path.name), e), priority)

    def _keep_original(self, path: Path, signature: tuple, result: Enqueued) -> None:
        """Move the person's file out of the inbox, never over another file, or leave it if it changed."""
        job, name = result.job, printable(path.name)
        now = self._signature(path)
        if now != signature:
            what = "went away" if now is None else "changed (a newer version is claimed when it settles)"
            self.say("warning", f"inbox: {name} {what} while it was being claimed; the version taken is "
                     f"{short(job.fingerprint)}, job {job.id}, kept in data/")
        elif not result.new:
            kept = kept_path(self.ws.root / "finished", job.id, name)
            _move_new(path, kept, job.fingerprint)
            result.messages.append(f"{name} is kept as {kept.relative_to(self.ws.root)}")
        elif job.state == JobState.REJECTED:
            path.unlink()  # rejected/ holds a verified identical copy and the reason
        else:
            kept = kept_path(self.ws.root / "claimed", job.id, name)
            _move_new(path, kept, job.fingerprint)
            jobs.update(self.ws.db, job.id, kept=str(kept))


def file_finished(ws: Workspace, job: Job) -> None:
    """After a job is done (or skipped), move the person's original from claimed/ to finished/."""
    claimed = ws.root / "claimed"
    if not job.kept or Path(job.kept).parent != claimed or not Path(job.kept).exists():
        return
    target = kept_path(ws.root / "finished", job.id, job.file)
    try:
        _move_new(Path(job.kept), target, job.fingerprint)
    except Exception as e:  # the job is done either way; the original simply stays in claimed/
        log_event(ws.db, "warning", "kept", f"job {job.id}: {job.kept} could not be moved to finished/ ({e}); "
                  "it stays in claimed/", job.id)
        return
    jobs.update(ws.db, job.id, kept=str(target))
