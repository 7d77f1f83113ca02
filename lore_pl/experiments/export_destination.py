"""Where ``lore-pl export hf`` writes: a directory of its own, replaced only when an export wrote it.

An export is marked: ``config.json["lore_pl"]`` holds ``written_by: "lore-pl export hf"`` and ``files``,
every path the export wrote. ``--overwrite`` replaces only a marked directory that holds nothing else,
deletes only the files it lists, and never names the run, the base model, the current or the home
directory or any directory above them. One export at a time per destination: a lock file beside it
(``.NAME.lore-export.lock``, held with ``flock``, so a killed export's lock is free again at once). An
export is built in a hidden ``.NAME.lore-export-XXXXXXXX.tmp`` beside the destination and renamed into
place; what a killed export left there is cleaned by the next export to the same destination, under
its lock.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from lore_pl.data.atomic import file_mode
from lore_pl.errors import LoreDataWarning

CONFIG = "config.json"
#: ``config.json["lore_pl"][MARKER_KEY]`` of a directory an export wrote
MARKER_KEY = "written_by"
EXPORT_MARKER = "lore-pl export hf"
#: ``config.json["lore_pl"][FILES_KEY]``: the paths (relative, ``/``-separated) the export wrote
FILES_KEY = "files"
#: in the names of an export's temporary directories and lock file, after ``.NAME.``
TAG = "lore-export"


def destination(out: str | os.PathLike) -> Path:
    """``--out`` as an absolute path, ``..`` resolved by name (a symbolic link is refused, not followed)."""
    return Path(os.path.abspath(out))


def _real(path: Path) -> Path:
    return Path(os.path.realpath(path))


def check_not_protected(out: Path, places: list[tuple[Path, str]]) -> None:
    """Refuse an ``out`` that is one of ``places`` (the run's directory, the base model, ...), or a
    directory above one: replacing it would delete what the export reads or what the user works in."""
    real = _real(out)
    places = places + [(Path.cwd(), "the current directory"), (Path.home(), "the home directory")]
    for place, what in places:
        if real == _real(place):
            raise FileExistsError(f"--out {out}: refusing to write there: it is {what}; choose a new directory")
    for place, what in places:
        if _real(place).is_relative_to(real):
            raise FileExistsError(f"--out {out}: refusing to write there: it holds {what} ({place}); "
                                  "choose a new directory")


def files_under(root: Path) -> list[str]:
    """Every entry under ``root`` that is not a directory (files, symbolic links, ...), relative, sorted."""
    found = []
    for top, directories, files in os.walk(root):
        links = [name for name in directories if os.path.islink(os.path.join(top, name))]  # not walked into
        found += [Path(os.path.relpath(os.path.join(top, name), root)).as_posix() for name in files + links]
    return sorted(found)


def exported_files(directory: Path) -> list[str] | None:
    """The files an export wrote into ``directory`` (its marker's list); None if no export marked it."""
    config = directory / CONFIG
    if config.is_symlink() or not config.is_file():
        return None
    try:
        block = json.loads(config.read_text(encoding="utf-8")).get("lore_pl")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(block, dict) or block.get(MARKER_KEY) != EXPORT_MARKER:
        return None
    files = block.get(FILES_KEY)
    if not isinstance(files, list) or not all(isinstance(name, str) for name in files):
        return None
    return files


def check_destination(out: Path, overwrite: bool) -> None:
    """``out`` may be written: it is new or empty, or (with ``overwrite``) an earlier export holding
    nothing but what that export wrote."""
    if out.is_symlink():
        raise FileExistsError(f"--out {out}: is a symbolic link; name a directory itself")
    if not out.exists():
        return
    if not out.is_dir():
        raise FileExistsError(f"--out {out}: exists and is not a directory")
    if not any(out.iterdir()):
        return
    written = exported_files(out)
    if written is None:
        raise FileExistsError(f"--out {out}: the directory is not empty and is not a lore-pl export ({CONFIG} holds "
                              f"no lore_pl {MARKER_KEY!r} marker), so it is never replaced; choose a new or empty "
                              "directory")
    foreign = sorted(set(files_under(out)) - set(written))
    if foreign:
        raise FileExistsError(f"--out {out}: holds {len(foreign)} file(s) no export wrote ({', '.join(foreign[:3])}), "
                              "so it is not replaced; move them away or choose another directory")
    if not overwrite:
        raise FileExistsError(f"--out {out}: holds an earlier export; pass --overwrite to replace it")


@contextmanager
def export_lock(out: Path) -> Iterator[Path]:
    """Hold ``.NAME.lore-export.lock`` beside ``out`` for the whole export; a second export into ``out``
    fails at once. ``flock`` frees the lock when its process dies, so a killed export blocks no one."""
    lock = out.parent / f".{out.name}.{TAG}.lock"
    while True:
        descriptor = os.open(lock, os.O_RDWR | os.O_CREAT, file_mode())
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            raise BlockingIOError(f"--out {out}: another export into it is running (it holds {lock}); "
                                  "wait for it to finish") from None
        try:
            current = os.path.samestat(os.fstat(descriptor), os.stat(lock))
        except FileNotFoundError:
            current = False
        if current:
            break
        os.close(descriptor)  # its holder removed it between our open and our lock: take the new one
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)  # before the lock is released, so no one locks a removed file
        os.close(descriptor)


def stale_directories(out: Path) -> list[Path]:
    """The temporary directories of exports into ``out``, by their exact tagged naming: a build (``.tmp``) or
    a replaced export (``.old``). Folders of the untagged naming of before are left alone: a name without
    the tag could be a folder of the user's own (``.model.snapshot.tmp``)."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.{TAG}-[a-z0-9_]{{8}}\.(?:tmp|old)")
    if not out.parent.is_dir():
        return []
    return sorted(entry for entry in out.parent.iterdir()
                  if pattern.fullmatch(entry.name) and entry.is_dir() and not entry.is_symlink())


def clean_stale(out: Path) -> None:
    """Under the lock, what a killed export into ``out`` left: an earlier export moved aside but not
    replaced is put back; builds and replaced exports are removed."""
    for stale in stale_directories(out):
        vacant = not out.exists() or (out.is_dir() and not out.is_symlink() and not any(out.iterdir()))
        if stale.suffix == ".old" and vacant and exported_files(stale) is not None:
            os.rename(stale, out)  # killed between moving the earlier export aside and renaming the new one in
        elif stale.suffix == ".old":
            remove_export(stale)
        else:
            shutil.rmtree(stale)


def remove_export(directory: Path) -> None:
    """Delete the files the export in ``directory`` wrote (links themselves, never what they point to)
    and the directories they leave empty; anything else is kept, and said."""
    listed = set(exported_files(directory) or [])
    for name in files_under(directory):  # what is there, so a listed '../x' names nothing outside
        if name in listed:
            (directory / name).unlink()
    for top, _, _ in sorted(os.walk(directory), key=lambda entry: -len(entry[0])):
        with contextlib.suppress(OSError):  # not empty: something no export wrote
            os.rmdir(top)
    if directory.exists():
        warnings.warn(f"kept {directory}: it holds files that no export wrote", LoreDataWarning, stacklevel=2)


def mark_export(directory: Path) -> None:
    """Record in ``config.json`` that an export wrote ``directory``, and which files."""
    config_path = directory / CONFIG
    config = json.loads(config_path.read_text(encoding="utf-8"))
    block = dict(config.get("lore_pl") or {})
    block.update({MARKER_KEY: EXPORT_MARKER, FILES_KEY: sorted(set(files_under(directory)) | {CONFIG})})
    config["lore_pl"] = block
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def take_umask_modes(directory: Path) -> None:
    """Files and directories as ``open``/``mkdir`` would make them under the umask: ``mkdtemp`` and some
    writers (safetensors) make them private."""
    os.chmod(directory, file_mode(0o777))
    for top, directories, files in os.walk(directory):
        for name in directories:
            if not os.path.islink(os.path.join(top, name)):
                os.chmod(os.path.join(top, name), file_mode(0o777))
        for name in files:
            if not os.path.islink(os.path.join(top, name)):
                os.chmod(os.path.join(top, name), file_mode(0o666))


def publish_directory(out: Path, build: Callable[[Path], None], overwrite: bool,
                      protected: list[tuple[Path, str]]) -> Path:
    """Have ``build(temporary_dir)`` fill a directory beside ``out``, mark it, then rename it to ``out``.

    ``out`` is checked first (``check_not_protected``, ``check_destination``), then again under the lock;
    a failure leaves ``out`` as it was; an ``out`` another writer filled meanwhile is not replaced.
    """
    check_not_protected(out, protected)
    check_destination(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    with export_lock(out):
        clean_stale(out)
        check_destination(out, overwrite)
        tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{TAG}-", suffix=".tmp"))
        try:
            build(tmp)
            mark_export(tmp)
            take_umask_modes(tmp)
            check_destination(out, overwrite)  # a writer that takes no lock may have been at it meanwhile
            swap_in(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def swap_in(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an earlier export there (marked) is moved aside first, removed after. A
    rename onto a directory that is not empty fails, so nothing else that appeared at ``out`` is replaced."""
    old = None
    if not out.is_symlink() and out.is_dir() and exported_files(out) is not None:
        old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.{TAG}-", suffix=".old"))
        old.rmdir()
        os.rename(out, old)
    try:
        os.rename(tmp, out)
    except OSError as error:
        if old is not None:
            os.rename(old, out)
        if error.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
        raise FileExistsError(f"--out {out}: another writer filled it meanwhile ({error.strerror}); it is as that "
                              "writer left it") from None
    if old is not None:
        remove_export(old)
