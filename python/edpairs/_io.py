"""Atomic file writes: the data goes to a temporary file in the destination's folder, is
flushed and fsynced, and replaces the destination in one rename, so a crash leaves either
the old file or the new one, never a torn one."""

from __future__ import annotations

import os
import stat
import tempfile
from typing import Callable, Sequence


def fsync_dir(path: str) -> None:
    """Makes a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def make_folder(folder, what: str) -> None:
    """os.makedirs(folder, exist_ok=True), with an error that names the file in the way (where
    makedirs says "File exists" or "Not a directory" about some part of the path)."""
    folder = os.fspath(folder)
    try:
        os.makedirs(folder, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        part = _file_in_the_way(os.path.abspath(folder))
        raise FileExistsError(f"cannot make the folder for {what} ({folder}): {part} is a file, not a folder") from None


def _file_mode(st) -> int:
    """The permissions a written file gets: those of the file it replaces (``st``, its
    ``os.stat``), else what ``open`` would give a new file (0o666 less the umask), not mkstemp's
    private 0o600."""
    return st.st_mode & 0o7777 if st is not None else 0o666 & ~_umask()


def _umask() -> int:
    try:  # Linux: read it, rather than set it (os.umask is process-wide, racing other threads)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    umask = os.umask(0o022)  # pragma: no cover - elsewhere: the only portable way to read it
    os.umask(umask)  # pragma: no cover
    return umask  # pragma: no cover


def _file_in_the_way(folder: str):
    """The deepest existing part of the path ``folder`` when it is not a folder (a file where a
    folder is needed), else None."""
    part = folder
    while part != os.path.dirname(part) and not os.path.lexists(part):
        part = os.path.dirname(part)
    return part if os.path.lexists(part) and not os.path.isdir(part) else None


def existing_folder(path: str, what: str) -> str:
    """The folder of file ``path``, which must exist, else a FileNotFoundError: "{what}: its
    folder ... does not exist", or a NotADirectoryError where a file stands in its place ("...
    is a file, not a folder")."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        in_the_way = _file_in_the_way(folder)
        if in_the_way is not None:
            raise NotADirectoryError(f"{what}: its folder {folder} cannot exist: {in_the_way} is a file, not a folder")
        raise FileNotFoundError(f"{what}: its folder {folder} does not exist (create it first)")
    return folder


def check_can_create_in(folder: str, what: str) -> None:
    """Creates and removes a temporary file in the existing ``folder``: a PermissionError with a
    one-line message (naming ``what``, the folder and the system's reason) where that fails —
    no write permission, a read-only or immutable folder, a file system that takes no files
    (/proc, /sys) — so an output is refused before the work that would produce it."""
    try:
        fd, tmp = tempfile.mkstemp(prefix=".edpairs-write-test-", suffix=".tmp", dir=folder)
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise PermissionError(f"cannot write {what}: no file can be created in the folder "
                              f"{os.path.abspath(folder)} ({reason})") from None
    os.close(fd)
    try:
        os.unlink(tmp)
    except OSError:  # pragma: no cover - created but not removable: the output may still be written
        pass


def check_output_file(path, what: str) -> str:
    """Refuses, before any work, a file output ``path`` that could not be written: its folder
    missing (FileNotFoundError naming it), a file in the folder's place (NotADirectoryError), a
    folder where no file can be created (PermissionError, :func:`check_can_create_in`).
    Returns the folder."""
    path = os.fspath(path)
    folder = existing_folder(path, f"{what} {path!r}")
    check_can_create_in(folder, f"{what} {path!r}")
    return folder


def check_output_folder(path, what: str, *, written_inside: bool) -> None:
    """Refuses, before any work, an output folder ``path`` that could not be written: a file in
    its place or in its parent's, its parent folder missing (the folder is created in an
    existing one, never with its parents), or no file creatable where the output goes: inside
    the folder where it exists and ``written_inside`` (a store filled in place), else in its
    parent (a new folder, or one built beside it and renamed into place, as reports are)."""
    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise NotADirectoryError(f"{what} {path!r} is a file, not a folder: name a folder")
    parent = existing_folder(os.path.abspath(path), f"{what} {path!r}")
    where = path if written_inside and os.path.isdir(path) else parent
    check_can_create_in(where, f"{what} {path!r}")


def write_atomic(path, write: Callable, *, mode: str = "wb"):
    """Calls ``write(file)`` on a temporary file next to ``path``, then renames it to ``path``.
    Returns what ``write`` returned. The temporary file is removed if anything fails. The file
    keeps the permissions of the one it replaces (a new one gets the umask's, as ``open``)."""
    path = os.fspath(path)
    folder = existing_folder(path, f"cannot write {path}")
    try:
        st = os.stat(path)  # (the file replaced: its permissions carry over)
    except OSError:
        st = None
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise IsADirectoryError(f"cannot write {path}: it is a folder; name a file")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:  # (closes fd whatever fails below)
            os.fchmod(f.fileno(), _file_mode(st))
            result = write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(folder)
    return result


def _real(path) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _holds(folder, path) -> bool:
    """Whether ``path`` is the folder ``folder`` or lies inside it (both resolved)."""
    folder, path = _real(folder), _real(path)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_replaceable_folder(path, *, overwrite: bool, entries_of: Callable[[str], list], kind: str,
                             what: str = "out_dir", protect: Sequence = (),
                             overwrite_flag: str = "overwrite=True (CLI --overwrite)") -> None:
    """Refuses, before any work, an output folder whose replacement would lose files: the
    current working folder or a folder holding it, a folder that is or holds one of
    ``protect`` (the input images' folders), and — when it exists and is not empty — a folder
    without ``overwrite`` or, with it, one that holds more than ``kind`` (``entries_of(folder)``
    lists the entries that do not belong). Raises FileExistsError."""
    path = os.fspath(path)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{what} {path!r} is a file, not a folder: name a folder")
    if _holds(path, os.getcwd()):
        here = "is the current folder" if _real(path) == _real(os.getcwd()) else "holds the current folder"
        raise FileExistsError(f"{what} {path!r} {here} ({os.getcwd()}): an output folder may be replaced, so it "
                              "cannot be the current folder or hold it; name a new folder (e.g. a subfolder)")
    for p in protect:
        folder = p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p))
        if _holds(path, folder):
            raise FileExistsError(f"{what} {path!r} {'is' if _real(path) == _real(folder) else 'holds'} the images' "
                                  f"folder {folder!r}: an output folder may be replaced, so it cannot be the images' "
                                  "folder or hold it; name another folder")
    if not os.path.isdir(path) or not os.listdir(path):
        return
    if not overwrite:
        raise FileExistsError(f"{what} {path!r} exists and is not empty: pass {overwrite_flag} to replace it "
                              "(or name another folder)")
    foreign = entries_of(path)
    if foreign:
        shown = ", ".join(foreign[:6]) + (f" and {len(foreign) - 6} more" if len(foreign) > 6 else "")
        raise FileExistsError(f"{what} {path!r} is not {kind} (found: {shown}); overwrite replaces only an empty "
                              f"folder or {kind}: name another folder")
