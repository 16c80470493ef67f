"""Nothing of the user's is destroyed: every file and folder ldm_train writes for keeps (a checkpoint,
an export, a cache shard, generated images, metrics) is written to a temporary path beside its
target and renamed into place (written_beside, the one place this rule is written). Beside: in the
same folder, so on the same filesystem, where a rename is atomic (a temporary file elsewhere, e.g.
in /tmp, is copied across, and a full disk leaves half a file). So a write that fails midway (a
full disk, a kill) leaves the previous file or folder as it was, and a reader never sees half of
one.

A folder is replaced only if ldm_train wrote it: it holds the marker file (.ldm_train) that
write_folder and claim_folder put into every folder they write, or one of the files that marked
such a folder before the marker existed. Any other non-empty folder is the user's: refused in one
line, never overwritten or deleted.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ldm_train.errors import UserError

MARKER = ".ldm_train"  # {"written_by": "ldm_train", "what": ...}: a folder we may replace


@contextlib.contextmanager
def written_beside(target: str | Path) -> Iterator[Path]:
    """A temporary path beside `target` to write a file or a folder at; when the block ends
    without an error it takes target's place (a folder: the old one is moved aside first and
    removed once the new one is in), else it is removed and target is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(3)}.tmp")
    try:
        yield temporary
        if temporary.is_file():
            with open(temporary, "rb") as written:  # on disk before the rename makes it visible
                os.fsync(written.fileno())
        replace(temporary, target)
    finally:
        remove(temporary)


def replace(source: Path, target: Path) -> None:
    """Rename source to target (same filesystem); an existing target folder goes aside first."""
    if not target.is_dir() or target.is_symlink():
        os.replace(source, target)
        return
    old = target.with_name(f".{target.name}.{os.getpid()}-{secrets.token_hex(3)}.old")
    os.rename(target, old)
    try:
        os.rename(source, target)
    except BaseException:
        os.rename(old, target)  # back as it was
        raise
    remove(old)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_text(target: str | Path, text: str) -> Path:
    """A text file, written beside and renamed into place."""
    with written_beside(target) as temporary:
        temporary.write_text(text)
    return Path(target)


def write_json(target: str | Path, content: Any) -> Path:
    return write_text(target, json.dumps(content, indent=2))


def check_ours(folder: Path, option: str, known: Sequence[str] = ()) -> None:
    """A UserError unless `folder` is missing, empty, or written by ldm_train (the marker, or one
    of the `known` files that marked such a folder before the marker existed)."""
    if not folder.exists():
        return
    if not folder.is_dir():
        raise UserError(
            f"{option} {folder} is a file; give a folder (a new one, or one ldm_train wrote)"
        )
    if (folder / MARKER).is_file() or any((folder / name).exists() for name in known):
        return
    if any(folder.iterdir()):
        raise UserError(
            f"{option} {folder} holds files ldm_train did not write; nothing of them is touched: "
            "give a new or empty folder"
        )


def mark(folder: Path, what: str) -> None:
    (folder / MARKER).write_text(json.dumps({"written_by": "ldm_train", "what": what}) + "\n")


def write_folder(
    target: str | Path,
    write: Callable[[Path], object],
    what: str,
    option: str = "the output folder",
    known: Sequence[str] = (),
    ours: bool = False,
    may_skip: bool = False,
) -> Path | None:
    """write(folder) fills a fresh folder beside `target`, which then takes target's place whole;
    returns target. An existing target must be ours (check_ours, `option` naming it in the error;
    ours=True: the caller owns it, e.g. a run directory's export/). may_skip: write returns None
    when there is nothing to write (a stage without an export): target is left as it was and
    None returned."""
    target = Path(target)
    if not ours:
        check_ours(target, option, known)
    elif target.exists() and not target.is_dir():
        raise UserError(f"{option} {target} is a file; move it away")
    try:
        with written_beside(target) as temporary:
            temporary.mkdir()
            if write(temporary) is None and may_skip:
                raise _Nothing
            mark(temporary, what)
    except _Nothing:
        return None
    return target


class _Nothing(Exception):
    """write_folder's writer had nothing to write: the temporary folder is dropped."""


def claim_folder(
    folder: str | Path, what: str, option: str = "the output folder", known: Sequence[str] = ()
) -> Path:
    """A folder that is filled piece by piece (each piece written_beside, so an interrupted run
    keeps what it finished): created and marked, or an earlier one of ours (check_ours)."""
    folder = Path(folder)
    check_ours(folder, option, known)
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / MARKER).is_file():
        mark(folder, what)
    return folder
