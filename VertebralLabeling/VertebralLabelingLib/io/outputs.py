"""Output files of one call: checked before the work, written all-or-nothing after it.

Why: labeling takes seconds to minutes, and an output path whose folder is a file, a
read-only folder or a full disk used to fail only after the work -- with a traceback and some
outputs already written, which the next run then refused to replace ("may hold corrections").
``check_outputs`` refuses such paths (and two outputs on one path, or an output on the input)
before any work; ``write_all`` writes every output to a temporary file beside its target and
renames them into place only when all were written, so a failure leaves nothing behind.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import InputError


def _same(a: Path, b: Path) -> bool:
    try:
        if a.exists() and b.exists():
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.abspath(a) == os.path.abspath(b) or a.resolve() == b.resolve()


def check_outputs(outputs, inputs=(), overwrite: bool = False) -> list[Path]:
    """Refuse outputs that cannot or must not be written; ``outputs`` is [(option, path)].

    Checked: no two outputs on one file, no output on an input file, no existing output without
    ``overwrite`` (it may hold corrections), and the folder can be created and written.
    """
    chosen = [(option, Path(path)) for option, path in outputs if path]
    for i, (option, path) in enumerate(chosen):
        for other_option, other in chosen[:i]:
            if _same(path, other):
                raise InputError(f"{other_option} and {option} name the same file {path}; give each "
                                 "output its own path.")
        for source in inputs:
            if source and _same(path, Path(source)):
                raise InputError(f"{option} {path} is the input file; choose another output path.")
        if path.is_dir():
            raise InputError(f"{option} {path} is a folder; give a file name.")
    existing = [str(path) for _, path in chosen if path.exists()]
    if existing and not overwrite:
        raise InputError(f"Output exists: {', '.join(existing)}. It may hold corrections; "
                         "pass --overwrite to replace it.")
    for option, path in chosen:
        folder = path.parent
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        if not folder.is_dir():
            raise InputError(f"Cannot write {option} {path}: {folder} is a file, not a folder.")
        if not os.access(folder, os.W_OK | os.X_OK):
            raise InputError(f"Cannot write {option} {path}: folder {folder} is not writable.")
    return [path for _, path in chosen]


def _staged_name(path: Path) -> Path:
    """Temporary name beside ``path`` that keeps its extension (SimpleITK picks the format by it)."""
    return path.with_name(f".part-{os.getpid()}-{path.name}")


def _reason(error: BaseException) -> str:
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__


def write_all(jobs, before_commit=None) -> None:
    """Write every ``(path, write)`` job, where ``write(tmp_path)`` writes one file, or none.

    ``before_commit([(tmp_path, path), ...])`` runs after every temporary was written and before
    any rename (the batch records the new files' hashes there, as a journal).

    Each job writes a temporary file beside its target; only when all succeeded are they renamed
    into place.  On any failure the temporaries (and folders this call created) are removed and
    an InputError says which output failed and why; files that existed before are untouched.
    """
    staged, created = [], []
    try:
        for path, write in jobs:
            path = Path(path)
            missing = []
            folder = path.parent
            while not folder.exists():
                missing.append(folder)
                folder = folder.parent
            try:
                for new in reversed(missing):
                    new.mkdir()
                    created.append(new)
                tmp = _staged_name(path)
                staged.append((tmp, path))
                write(tmp)
            except (OSError, RuntimeError, ValueError) as error:
                raise InputError(f"Cannot write {path}: {_reason(error)}; no output was written.") from error
        if before_commit is not None:
            before_commit(list(staged))
        done = []
        for tmp, path in staged:
            existed = path.exists()
            try:
                os.replace(tmp, path)
            except OSError as error:
                for written, was_there in done:
                    if not was_there:
                        written.unlink(missing_ok=True)
                raise InputError(f"Cannot write {path}: {_reason(error)}.") from error
            done.append((path, existed))
        staged = []
    finally:
        for tmp, _ in staged:
            try:
                tmp.unlink()
            except OSError:
                pass
        if staged:
            for folder in reversed(created):
                try:
                    folder.rmdir()
                except OSError:
                    pass
