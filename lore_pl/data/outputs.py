"""Where a command writes its output file: never over the command's own input, a basis, a checkpoint or
a file that another kind of command wrote (unless the user says so), and one writer at a time.

Every command that writes a named output file (``lightning predict``'s score CSV, the sweeps' results,
``PersonalRewardModel.save``) claims it with ``claim_outputs``: a lock file ``.NAME.lock`` made with
``O_EXCL`` beside it (a second writer is refused while the first runs; a lock whose process died is
taken over), then ``check_output`` under the lock. A refusal is a ``LoreDataError`` naming the file and
why, and the file is not touched.
"""

from __future__ import annotations

import atexit
import json
import os
import struct
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from lore_pl.data.atomic import HOST_TAG, process_is_alive
from lore_pl.errors import LoreDataError

#: the start of a basis file's ``format`` metadata (``lore_pl.data.basis_file.FORMAT``)
BASIS_FORMAT_PREFIX = "lore-pl-basis/"
#: how much of a file a recogniser reads at most (a header line, a safetensors header, a results file)
READ_LIMIT = 1 << 24


@dataclass(frozen=True)
class OutputKind:
    """What a command writes, for the checks on its output path.

    Args:
        command: the command, as messages name it (``lightning predict``).
        recognises: whether an existing file is one such a command wrote (then it may be replaced).
        owns: what the command replaces without being told, for the refusal's message.
        overwrite_hint: how the user says "replace it anyway".
    """

    command: str
    recognises: Callable[[Path], bool]
    owns: str
    overwrite_hint: str = "pass --overwrite=true to replace it"


def first_line(path: Path) -> str | None:
    """The file's first line (without its line break), or None if it is not UTF-8 text."""
    try:
        with open(path, "rb") as stream:
            head = stream.readline(READ_LIMIT)
        return head.decode("utf-8").rstrip("\r\n")
    except (OSError, UnicodeDecodeError):
        return None


def first_line_starts(*prefixes: str) -> Callable[[Path], bool]:
    """A recogniser: the file's first line (e.g. the CSV header the command writes) starts with a prefix."""

    def recognises(path: Path) -> bool:
        line = first_line(path)
        return line is not None and line.startswith(prefixes)

    return recognises


def json_field_is(key: str, value: str) -> Callable[[Path], bool]:
    """A recogniser: the file is a JSON object whose ``key`` is ``value`` (the command's own mark)."""

    def recognises(path: Path) -> bool:
        try:
            if path.stat().st_size > READ_LIMIT:
                return False
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            return False
        return isinstance(payload, dict) and payload.get(key) == value

    return recognises


def png_text(path: Path) -> dict[str, str]:
    """The ``tEXt`` entries of a PNG before its image data (empty for anything else)."""
    entries: dict[str, str] = {}
    try:
        with open(path, "rb") as stream:
            if stream.read(8) != b"\x89PNG\r\n\x1a\n":
                return entries
            while True:
                head = stream.read(8)
                if len(head) < 8:
                    return entries
                length, kind = struct.unpack(">I4s", head)
                if kind in (b"IDAT", b"IEND") or length > READ_LIMIT:
                    return entries
                data = stream.read(length)
                stream.read(4)  # the chunk's CRC
                if kind == b"tEXt" and b"\0" in data:
                    key, _, text = data.partition(b"\0")
                    entries[key.decode("latin-1")] = text.decode("latin-1")
    except OSError:
        return entries


def png_text_is(key: str, value: str) -> Callable[[Path], bool]:
    """A recogniser: a PNG whose ``tEXt`` entry ``key`` is ``value`` (``savefig(metadata={key: value})``)."""
    return lambda path: png_text(path).get(key) == value


def safetensors_metadata(path: Path) -> dict[str, str] | None:
    """The ``__metadata__`` of a safetensors file's header (read without its tensors), or None."""
    try:
        with open(path, "rb") as stream:
            head = stream.read(8)
            if len(head) < 8:
                return None
            (size,) = struct.unpack("<Q", head)
            if size > READ_LIMIT:
                return None
            header = json.loads(stream.read(size).decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    return metadata if isinstance(metadata, dict) else {}


def is_lore_basis(path: Path) -> bool:
    """A safetensors file whose metadata says it holds a lore-pl basis."""
    metadata = safetensors_metadata(path)
    return metadata is not None and str(metadata.get("format", "")).startswith(BASIS_FORMAT_PREFIX)


def is_checkpoint(path: Path) -> bool:
    """A ``.ckpt`` file, or a ``torch.save`` archive (a zip holding ``data.pkl``)."""
    if path.suffix == ".ckpt":
        return True
    try:
        with zipfile.ZipFile(path) as archive:
            return any(name.endswith("data.pkl") for name in archive.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def describe(path: Path, kind: OutputKind) -> str:
    """What an existing file at an output path is, for a refusal."""
    if is_lore_basis(path):
        return "a lore-pl basis"
    if is_checkpoint(path):
        return "a checkpoint"
    return f"a file that {kind.command} did not write"


def _inside(path: Path, directory: Path) -> bool:
    return path.resolve().is_relative_to(directory.resolve())


def input_it_would_replace(path: Path, kind: OutputKind, inputs: Iterable[str | os.PathLike | None]) -> str | None:
    """Why ``path`` is an input of the command (the message's words), or None. An input file is the path
    itself (or a link to it); an input directory (a run directory) owns every file in it that exists and
    that the command did not write."""
    for source in inputs:
        if source is None:
            continue
        source = Path(source).expanduser()
        if source.is_dir():
            if path.exists() and _inside(path, source) and not kind.recognises(path):
                return f"a file of {source}, an input of this command"
        elif path.resolve() == source.resolve() or (source.exists() and path.exists()
                                                     and os.path.samefile(path, source)):  # a hard link
            return f"an input of this command ({source})"
    return None


def check_output(path: str | os.PathLike, kind: OutputKind, inputs: Iterable[str | os.PathLike | None] = (),
                 overwrite: bool = False) -> Path:
    """Refuse (``LoreDataError`` naming ``path`` and why) an output path that is a directory or an input of
    the command, whatever ``overwrite`` says; and, unless ``overwrite``, an existing file that ``kind``
    does not recognise as its own (a basis, a checkpoint, anything else). Touches nothing."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise LoreDataError(f"{path}: the output is a directory; give the path of a file to write")
    if path.parent.exists() and not path.parent.is_dir():
        raise LoreDataError(f"{path}: the output's folder {path.parent} is a file")
    reason = input_it_would_replace(path, kind, inputs)
    if reason is not None:
        raise LoreDataError(f"{path}: refusing to write over {reason}; choose another output path")
    if not path.exists() or overwrite or kind.recognises(path):
        return path
    raise LoreDataError(f"{path}: refusing to replace {describe(path, kind)} ({kind.command} replaces only "
                        f"{kind.owns}); {kind.overwrite_hint}")


#: the locks this process holds, by their absolute path: another claim of one in this process is refused
_HELD: dict[str, OutputLock] = {}


def lock_path(path: Path) -> Path:
    return path.parent / f".{path.name}.lock"


class OutputLock:
    """``.NAME.lock`` beside an output, made with ``O_EXCL``: one writer of the output at a time.

    It records the writer (pid, machine, command). A lock of a dead process of this machine (or one
    this process left without releasing) is stale and taken over; one of a live process, or of another
    machine, refuses the claim with a message naming the lock file.
    """

    def __init__(self, path: str | os.PathLike, command: str) -> None:
        self.path = Path(path).expanduser()
        self.file = lock_path(self.path)
        self.command = command
        self._record = json.dumps({"pid": os.getpid(), "host": HOST_TAG, "command": command,
                                   "token": os.urandom(8).hex()})

    @property
    def key(self) -> str:
        return os.path.abspath(self.file)

    def acquire(self) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                handle = os.open(self.file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                holder = self._holder()
                if holder is None:
                    continue  # released meanwhile: try again
                if self._alive(holder):
                    raise LoreDataError(
                        f"{self.path}: another {holder.get('command', 'writer')} (pid {holder.get('pid', '?')}) "
                        f"is writing it now (lock {self.file}); wait for it to finish, or delete the lock if "
                        "no such process runs") from None
                self._remove_stale(holder)
                continue
            with os.fdopen(handle, "w") as stream:
                stream.write(self._record)
            _HELD[self.key] = self
            return
        raise LoreDataError(f"{self.path}: could not take the lock {self.file} (other writers keep taking it)")

    def _holder(self) -> dict | None:
        """The lock's record; None if the lock is gone. A lock still empty after a moment (its writer was
        killed between making and filling it) reads as ``{}``, which counts as held."""
        for _ in range(5):
            try:
                text = self.file.read_text(encoding="utf-8")
            except FileNotFoundError:
                return None
            except OSError:
                return {}
            if text:
                try:
                    record = json.loads(text)
                except ValueError:
                    return {}
                return record if isinstance(record, dict) else {}
            time.sleep(0.02)
        return {}

    def _alive(self, holder: dict) -> bool:
        pid = holder.get("pid")
        if holder.get("host") != HOST_TAG or not isinstance(pid, int):
            return True  # another machine's process, or an unreadable lock: cannot tell, so it holds
        if pid == os.getpid():
            return self.key in _HELD
        return process_is_alive(pid)

    def _remove_stale(self, holder: dict) -> None:
        """Move the stale lock aside (atomic: of two takers only one moves it), and put it back if what
        was moved is a fresh lock another taker made meanwhile."""
        aside = self.file.with_name(f"{self.file.name}.stale-{os.getpid()}")
        try:
            os.rename(self.file, aside)
        except FileNotFoundError:
            return
        try:
            moved = json.loads(aside.read_text(encoding="utf-8") or "null")
        except (OSError, ValueError):
            moved = None
        if moved != holder:
            with suppress(OSError):  # a third taker made one since: theirs stands
                os.link(aside, self.file)
        aside.unlink(missing_ok=True)

    def release(self) -> None:
        if _HELD.get(self.key) is not self:
            return
        del _HELD[self.key]
        with suppress(OSError):
            if self.file.read_text(encoding="utf-8") == self._record:
                self.file.unlink()


@atexit.register
def _release_all() -> None:
    """An exit mid-write (``sys.exit``, an uncaught error) leaves no lock of this process behind."""
    for lock in list(_HELD.values()):
        lock.release()


@contextmanager
def claim_outputs(paths: Iterable[str | os.PathLike], kind: OutputKind,
                  inputs: Iterable[str | os.PathLike | None] = (), overwrite: bool = False) -> Iterator[list[Path]]:
    """``check_output`` each output path and lock it; the locks are released when the block ends."""
    inputs = list(inputs)
    locks = []
    try:
        for path in paths:
            path = check_output(path, kind, inputs, overwrite)  # a refusal makes no lock (nor folder)
            lock = OutputLock(path, kind.command)
            lock.acquire()
            locks.append(lock)
            check_output(path, kind, inputs, overwrite)  # again, now that no other claimer can change it
        yield [lock.path for lock in locks]
    finally:
        for lock in reversed(locks):
            lock.release()
