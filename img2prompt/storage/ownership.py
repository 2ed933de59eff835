"""The project deletes and overwrites only what it wrote: a manifest in every folder it
creates, and an advisory lock for every writer.

A folder the project creates (a run, a dataset, the reports, the embedding cache) holds
``.img2prompt-manifest.jsonl``: one JSON object per line, appended as the project works —
the folder's kind, each file it writes (recorded *before* the file is written), each file it
removes, and each stage it finished. Appending keeps recording cheap for 100,000 images; a
line cut short by a crash is ignored. ``clear`` removes the recorded files and nothing else.
A non-empty folder without a manifest was not made by the project: it is refused, never
emptied. ``files.atomic_path`` records every write in the manifest of the folder that holds
it (the file's parent or grandparent), so no writer can forget to.

Locks are advisory locks on a lock file (``fcntl.flock``; on Windows ``msvcrt.locking``), which
holds the id of the process holding it: a second writer is told which process that is.
"""

import contextlib

try:
    import fcntl
except ImportError:  # Windows: msvcrt's locks (``_lock_file``)
    fcntl = None
import json
import os
import tempfile
import time
from pathlib import Path

from img2prompt.errors import Img2PromptError

_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() gives a new file; mkstemp gives 0600

MANIFEST_FILE = ".img2prompt-manifest.jsonl"
_NO_FOLLOW = getattr(os, "O_NOFOLLOW", 0)  # opening a link fails (POSIX; Windows has no such links)
LOCK_FILE = ".img2prompt.lock"
INTERNAL_FILES = (MANIFEST_FILE, LOCK_FILE)


class FolderError(Img2PromptError):
    """A folder is not the project's to change, or another process is writing it."""


class OwnedFolder:
    """A folder with a manifest: its kind, the files the project wrote there, finished stages.

    Use ``claim`` (create or open) or ``find_owned`` (open when it has a manifest)."""

    def __init__(self, root):
        self.root = Path(root)
        self.manifest = self.root / MANIFEST_FILE
        self.kind, self.origin, self.files, self.finished, self.failed = None, None, set(), set(), {}
        self._identity, self._offset = None, 0
        self.refresh()

    # --- reading the manifest -------------------------------------------------------------

    def refresh(self):
        """Bring the in-memory state up to date with the manifest on disk: only the lines
        appended since the last read are parsed, unless the file was rewritten (``clear``)."""
        stat = self.manifest.stat()
        if self._identity != (stat.st_dev, stat.st_ino) or stat.st_size < self._offset:
            self.kind, self.origin, self.files, self.finished, self.failed = None, None, set(), set(), {}
            self._identity, self._offset = (stat.st_dev, stat.st_ino), 0
        if stat.st_size == self._offset:
            return
        with open(self.manifest, "rb") as handle:
            handle.seek(self._offset)
            data = handle.read()
        complete = data[:data.rfind(b"\n") + 1]  # a line without its newline is still being written
        self._offset += len(complete)
        for line in complete.splitlines():
            try:
                self._apply(json.loads(line))
            except (ValueError, AttributeError, TypeError):
                continue  # a line cut by a crash

    def _apply(self, event: dict):
        if "kind" in event:
            self.kind = event["kind"]
        if "origin" in event:
            self.origin = event["origin"]
        if "wrote" in event and _inside_name(event["wrote"]):
            self.files.add(event["wrote"])
        if "removed" in event:
            self.files.discard(event["removed"])
        if "finished" in event:
            self.finished.add(event["finished"])
            self.failed.pop(event["finished"], None)
        if "unfinished" in event:
            self.finished.discard(event["unfinished"])
            self.failed.pop(event["unfinished"], None)
        if "failed" in event:
            self.failed[event["failed"]] = str(event.get("reason", ""))

    # --- recording ------------------------------------------------------------------------

    def _append(self, *events, durable=False):
        self.refresh()
        torn = self.manifest.stat().st_size > self._offset  # a crash cut the last line short
        # never through a link: appending would write into whatever it points to
        with os.fdopen(os.open(self.manifest, os.O_WRONLY | os.O_APPEND | _NO_FOLLOW), "a",
                       encoding="utf-8") as handle:
            handle.write("\n" * torn + "".join(json.dumps(e) + "\n" for e in events))
            if durable:
                handle.flush()
                os.fsync(handle.fileno())
        self.refresh()

    def relative(self, path) -> str:
        """``path``'s name in the folder. The folder itself may be reached through links; below
        its top, a link is refused (FolderError naming it): writing or deleting through it
        would change what it points to, which the project did not make."""
        path = Path(os.path.abspath(path))
        top = os.path.realpath(self.root)
        name = next((path.relative_to(above).as_posix() for above in path.parents
                     if os.path.realpath(above) == top), None)
        if name is None:
            raise FolderError(f"{path}: outside the img2prompt folder {self.root}; img2prompt neither "
                              "writes nor deletes it there.")
        self._refuse_links(name)
        return name

    def _refuse_links(self, name):
        """FolderError naming the first link on the way from the folder's top to ``name``."""
        path = self.root
        for part in Path(name).parts:
            path = path / part
            if path.is_symlink():
                raise FolderError(
                    f"{path}: is a link (to {os.path.realpath(path)}) inside the img2prompt folder "
                    f"{self.root}. img2prompt writes and deletes only the files it made there, never "
                    "through a link. Remove the link (what it points to stays as it is), then run this again.")

    def record(self, *paths):
        """Record ``paths`` as written by the project, before they are written. A file of
        such a name that the project did not write is refused: it belongs to the user."""
        self.refresh()
        names = [name for name in dict.fromkeys(self.relative(p) for p in paths)
                 if name not in INTERNAL_FILES and name not in self.files]
        for name in names:
            if os.path.lexists(self.root / name):
                raise FolderError(
                    f"{self.root / name}: exists and was not written by img2prompt, so it is left "
                    f"alone. Move it out of {self.root}, or choose another folder.")
        if names:
            self._append(*({"wrote": name} for name in names))

    def owns(self, path) -> bool:
        self.refresh()
        return self.relative(path) in self.files

    def remove(self, path):
        """Delete a file the project wrote here (refused for any other file, and for a path
        that passes through a link: ``relative``)."""
        name = self.relative(path)
        self.refresh()
        if name not in self.files:
            raise FolderError(f"{self.root / name}: not written by img2prompt; not deleting it.")
        target = self.root / name
        if target.is_dir() and not target.is_symlink():
            raise FolderError(f"{target}: a folder, not a file written by img2prompt.")
        target.unlink(missing_ok=True)
        self._append({"removed": name})
        _remove_empty_parents(target.parent, self.root)

    def clear(self, keep=()):
        """Delete every recorded file (except those under the ``keep`` prefixes) and the
        folders that this leaves empty; files the project did not write stay, and nothing is
        deleted when a recorded name passes through a link (``relative``). The manifest is
        rewritten with what is kept, and no stage is finished any more."""
        self.refresh()
        kept = {name for name in self.files if any(name.startswith(prefix) for prefix in keep)}
        for name in self.files - kept:  # every one checked before anything is deleted
            self._refuse_links(name)
        for name in sorted(self.files - kept, reverse=True):
            target = self.root / name
            if target.is_dir() and not target.is_symlink():
                continue  # a recorded name that someone replaced with a folder: not ours now
            target.unlink(missing_ok=True)
            _remove_empty_parents(target.parent, self.root)
        header = {"kind": self.kind, **({"origin": self.origin} if self.origin else {})}
        _write_manifest(self.manifest, [header, *({"wrote": name} for name in sorted(kept))])
        self._identity = None
        self.refresh()

    def set_origin(self, origin):
        """Which front end made the folder's contents (``cli`` or ``notebooks``)."""
        self._append({"origin": origin})

    def mark_finished(self, stage):
        """The stage's outputs are all written: the last record of a stage, made durable."""
        self._append({"finished": stage}, durable=True)

    def mark_unfinished(self, stage):
        self._append({"unfinished": stage}, durable=True)

    def mark_failed(self, stage, reason):
        """The stage stopped on an error a rerun with the same settings would meet again."""
        self._append({"failed": stage, "reason": reason}, durable=True)

    def writer(self):
        """The id of another process writing the folder now (holding its lock), else None."""
        return lock_holder(self.root / LOCK_FILE)

    def is_finished(self, stage) -> bool:
        self.refresh()
        return stage in self.finished

    def require(self, stage, command):
        """FolderError unless ``stage`` finished: saying whether a process is running it now,
        it failed (and why), or it did not finish (run ``command``)."""
        if self.is_finished(stage):
            return
        writer = self.writer()
        if writer:
            raise FolderError(f"{self.root}: its {stage} stage is being run by process {writer} now. Wait "
                              "for it to finish, then run this again.")
        if stage in self.failed:
            raise FolderError(f"{self.root}: its {stage} stage failed: {self.failed[stage]}")
        raise FolderError(f"{self.root}: its {stage} stage did not finish. Run it with '{command}' (or start "
                          "the run anew).")

    def lock(self, what=None):
        """Hold this folder's advisory lock (re-entrant within the process)."""
        return lock(self.root / LOCK_FILE, what or f"{self.root}")


def _inside_name(name) -> bool:
    """A recorded name must stay inside the folder: an edited manifest naming '../x' or an
    absolute path must not make ``clear`` delete outside it."""
    parts = Path(name).parts
    return bool(parts) and not Path(name).is_absolute() and ".." not in parts


def _write_manifest(path, events):
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(e) + "\n" for e in events))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _remove_empty_parents(folder: Path, root: Path):
    while folder != root and root in folder.parents:
        try:
            folder.rmdir()  # only succeeds when empty
        except OSError:
            return
        folder = folder.parent


def _entries(root: Path) -> list:
    return [p for p in root.iterdir() if p.name not in INTERNAL_FILES] if root.is_dir() else []


def _files_under(entry: Path) -> list:
    if entry.is_dir() and not entry.is_symlink():
        return [p for p in entry.rglob("*") if not p.is_dir()]
    return [entry]


def find_owned(root):
    """The folder's OwnedFolder when it has a manifest, else None."""
    root = Path(root)
    if (root / MANIFEST_FILE).is_symlink():
        raise FolderError(f"{root / MANIFEST_FILE}: is a link, not the manifest img2prompt writes; the "
                          "folder is left alone. Remove the link, or choose another folder.")
    return OwnedFolder(root) if (root / MANIFEST_FILE).is_file() else None


def claim(root, kind, adopt=None, create=True) -> OwnedFolder:
    """Open ``root`` as the project's folder of ``kind``: created with a fresh manifest when
    it is missing or empty, opened when its manifest says ``kind``, refused otherwise.
    ``create=False`` only checks (nothing is made; None for a folder to be created), so a
    command can refuse a folder before its slow first steps.

    ``adopt(path) -> bool`` may accept a folder without a manifest whose every entry the
    project can prove it wrote (e.g. cache files named by their content hash): they are
    then recorded."""
    root = Path(root)
    if root.exists() and not root.is_dir():
        raise FolderError(f"{root}: is a file, not a folder. Choose a folder.")
    folder = find_owned(root)
    if folder is None:
        entries = _entries(root)
        if entries and not (adopt and all(adopt(p) for p in entries)):
            shown = ", ".join(sorted(p.name for p in entries)[:5]) + (", …" if len(entries) > 5 else "")
            raise FolderError(
                f"{root}: this folder holds files that img2prompt did not write ({shown}) and has "
                f"no {MANIFEST_FILE} recording what img2prompt wrote, so img2prompt will not write "
                "into it or empty it. Choose a new or empty folder, or move those files away "
                "yourself. (A folder made by an older img2prompt has no record either.)")
        if not create:
            return None
        root.mkdir(parents=True, exist_ok=True)
        adopted = sorted(p.relative_to(root).as_posix() for e in entries for p in _files_under(e))
        _write_manifest(root / MANIFEST_FILE, [{"kind": kind}, *({"wrote": n} for n in adopted)])
        folder = OwnedFolder(root)
    if folder.kind is None:
        raise unreadable_manifest(folder)
    if folder.kind != kind:
        raise FolderError(f"{root}: is an img2prompt {folder.kind} folder, not a {kind} folder. "
                          "Choose another folder.")
    return folder


def unreadable_manifest(folder) -> FolderError:
    return FolderError(f"{folder.manifest}: holds no readable record of what img2prompt wrote (damaged?), "
                       f"so {folder.root} is left alone. Choose another folder, or empty this one "
                       "yourself and run again.")


def record_write(path):

    """Before the project writes ``path``: record it in the manifest of the folder that owns
    it (the file's parent or grandparent). Outside owned folders nothing is recorded."""
    path = Path(path)
    for folder in (path.parent, path.parent.parent):
        if (folder / MANIFEST_FILE).is_file():
            _cached(folder).record(path)
            return


_folders = {}  # resolved folder -> OwnedFolder, so a bulk write does not re-read the manifest


def _cached(folder: Path) -> OwnedFolder:
    key = os.path.realpath(folder)
    if key not in _folders:
        _folders[key] = OwnedFolder(key)
    return _folders[key]


# --- locks -------------------------------------------------------------------------------

_held = {}  # lock path -> [fd, depth] of the locks this process holds


@contextlib.contextmanager
def lock(path, what, waiting=None):
    """Hold an exclusive advisory lock on ``path`` (created when missing). When another
    process holds it: fail at once naming that process, or with ``waiting`` (a function
    taking a message) say so and wait for it. Re-entrant within one process."""
    key = os.path.realpath(path)
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    fd = _open_lock_file(path)
    try:
        if not _try_lock(fd):
            if waiting is None:
                raise FolderError(f"{what} is in use by process {_holder(fd)} (lock file {path}). Wait for "
                                  "it to finish, or stop that process, then run this again.")
            waiting(f"{what} is in use by process {_holder(fd)}: waiting for it to finish")
            _lock_file(fd, wait=True)
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, f"{os.getpid()}\n".encode())
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        _unlock_file(fd)
        os.close(fd)


def lock_holder(path):
    """The id of another process that holds the lock on ``path`` now, else None."""
    if os.path.realpath(path) in _held or not os.path.isfile(path):
        return None
    fd = _open_lock_file(path)
    try:
        if _try_lock(fd):
            _unlock_file(fd)
            return None
        return _holder(fd)
    finally:
        os.close(fd)


def _open_lock_file(path) -> int:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:  # never through a link: the lock file is truncated to hold this process's id
        return os.open(path, os.O_RDWR | os.O_CREAT | _NO_FOLLOW, 0o644)
    except OSError as error:
        if not os.path.islink(path):
            raise
        raise FolderError(f"{path}: the lock file is a link ({error.strerror}); nothing is written through "
                          "it. Remove the link, then run this again.") from None


def _try_lock(fd) -> bool:
    try:
        _lock_file(fd, wait=False)
    except OSError:  # BlockingIOError; on Windows PermissionError
        return False
    return True


# Windows locks byte ranges, which no other process may then read: the lock is on a byte far
# beyond the process id that the file holds
_WINDOWS_LOCKED_BYTE = 1 << 30


def _lock_file(fd, wait):
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        return
    import msvcrt
    os.lseek(fd, _WINDOWS_LOCKED_BYTE, os.SEEK_SET)
    while True:
        try:
            return msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            if not wait:
                raise
            time.sleep(0.5)


def _unlock_file(fd):
    if fcntl is not None:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return
    import msvcrt
    os.lseek(fd, _WINDOWS_LOCKED_BYTE, os.SEEK_SET)
    msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)


def _holder(fd) -> str:
    """The process id its holder wrote into a lock file ("?" while it is being written)."""
    os.lseek(fd, 0, os.SEEK_SET)
    return os.read(fd, 32).decode("ascii", "replace").strip() or "?"

