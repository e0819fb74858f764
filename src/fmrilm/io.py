"""Atomic writing: outputs appear complete or not at all, and existing outputs are never damaged."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Iterator

from fmrilm.errors import FmrilmError


def check_output_dir(path: str | os.PathLike, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``; call before any work so a refusal costs nothing.

    A run killed between the two renames that replace an output left the previous output aside: it is put back
    first, so it is never lost.
    """
    path = Path(path)
    _put_back_set_aside(path)
    if path.exists() and not overwrite:
        raise FmrilmError(f"output {path} already exists; choose another --out or pass --overwrite")
    if path.exists() and not path.is_dir():
        raise FmrilmError(f"output {path} exists and is not a directory; remove it or choose another --out")
    return path


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path`` that replaces ``path`` only when the block succeeds.

    On any exception the temporary directory is removed and an existing ``path`` is left as it was. A process
    killed with SIGKILL cannot clean up: its temporary directory (named after this host and its pid) is removed
    by the next run writing ``path`` once that process is gone.
    """
    path = check_output_dir(path, overwrite).absolute()
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_siblings(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{_owner()}-", dir=path.parent))
    plain_mode(tmp, directory=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _swap_in(tmp, path)


def _swap_in(new: Path, path: Path) -> None:
    """Replace ``path`` by the directory ``new``: two renames, the old output set aside in between (a run killed
    there leaves it aside under a name that :func:`check_output_dir` recognises and puts back)."""
    old = None
    if path.exists():
        old = path.with_name(f".{path.name}.old-{_owner()}-")
        os.replace(path, old)
    os.replace(new, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _put_back_set_aside(path: Path) -> None:
    if not path.exists():
        for old in _stale_siblings(path, "old"):
            with contextlib.suppress(FileNotFoundError):  # another process of the same launch put it back first
                os.replace(old, path)
            break


def _owner() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def _stale_siblings(path: Path, kind: str) -> list[Path]:
    """``.<name>.<kind>-<host>-<pid>-*`` directories beside ``path`` left by ended processes of this host."""
    if not path.parent.is_dir():
        return []
    pattern = re.compile(rf"\.{re.escape(path.name)}\.{kind}-{re.escape(socket.gethostname())}-(\d+)-")
    matches = ((p, pattern.match(p.name)) for p in path.parent.iterdir())
    return [p for p, match in matches if match and p.is_dir() and not _alive(int(match.group(1)))]


def _remove_stale_siblings(path: Path) -> None:
    for stale in _stale_siblings(path, "tmp") + _stale_siblings(path, "old"):
        shutil.rmtree(stale, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(path: str | os.PathLike, directory: bool = False) -> None:
    """Give ``path`` the mode a plainly created file (0o666) or directory (0o777) would get under the umask:
    ``mkstemp`` and ``mkdtemp`` make private 0600 / 0700 entries, which would keep a shared lab out of outputs."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block succeeds it gets the umask's mode and is renamed onto
    ``path`` (readers see the old file or the whole new one), otherwise it is removed and ``path`` is untouched."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        plain_mode(tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, obj: object) -> None:
    """Write JSON to ``path`` through a temporary file and a rename."""
    with atomic_file(path) as tmp, open(tmp, "w") as handle:
        json.dump(obj, handle, indent=2, sort_keys=False, default=_json_default)
        handle.write("\n")


def _json_default(obj: object) -> object:
    import numpy as np

    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_training_output(out: Path, resume: bool, overwrite: bool, *, marker: str, what: str, train_dir: str,
                          owned: tuple[str, ...] | None = None, keep: tuple[str, ...] = (),
                          command: str = "this command") -> Path:
    """Before any work of a training stage: refuse a finished output (``marker`` exists) unless ``overwrite``,
    an unfinished run (checkpoints in ``train_dir``) unless ``resume`` or ``overwrite``, ``resume`` without a
    checkpoint and, when ``owned`` is given, a directory holding files the stage does not write (``keep``
    and hidden names allowed) unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise FmrilmError(f"output {out} exists and is not a directory; choose another --out")
    if (out / marker).exists() and not overwrite:
        raise FmrilmError(f"{out} already holds {what}; pass --overwrite to replace it or choose another --out")
    checkpoints = out / train_dir / "checkpoints"
    has_checkpoints = any(checkpoints.glob("step-*"))
    if has_checkpoints and not resume and not overwrite:
        raise FmrilmError(f"{out / train_dir} holds checkpoints of an unfinished run; pass --resume to continue it "
                          "or --overwrite to start again")
    if resume and not has_checkpoints:
        raise FmrilmError(f"--resume given but {checkpoints} holds no checkpoint; run without --resume to start")
    foreign = owned is not None and out.is_dir() and any(
        p.name not in (*owned, *keep) and not p.name.startswith(".") for p in out.iterdir())
    if foreign and not overwrite:
        raise FmrilmError(f"output {out} already exists and holds other files; choose another --out or pass "
                          f"--overwrite (only the files {command} writes are replaced)")
    return out


def check_same_run(path: Path, run: dict) -> None:
    """Refuse to resume when the settings in ``run`` differ from those saved in ``path`` (run.json)."""
    if not path.is_file():
        return  # a run started by an older version: nothing to compare with
    saved = json.loads(path.read_text())
    changed = [key for key in run if saved.get(key) != json.loads(json.dumps(run[key]))]
    if changed:
        raise FmrilmError(f"cannot resume {path.parent}: {', '.join(changed)} differ from the interrupted run; "
                          "use the run's settings (see run.json) or start a new --out")


# ------------------------------------------------------------------------------------- training outputs
def staging_dir(out: str | os.PathLike) -> Path:
    """Where a training run started with ``overwrite`` builds the replacement of ``out``: ``.<name>.overwrite``
    beside it (a fixed name, so that ``resume`` finds an overwrite in progress)."""
    out = Path(out)
    return out.parent / f".{out.name}.overwrite"


def training_output(out: Path, resume: bool, overwrite: bool, *, marker: str, what: str, train_dir: str,
                    owned: tuple[str, ...] | None = None, keep: tuple[str, ...] = (),
                    command: str = "this command") -> Path:
    """Check ``out`` (:func:`check_training_output`, same arguments) and return the directory to build in.

    A fresh run with ``overwrite`` of an existing, non-empty ``out`` builds in :func:`staging_dir` and leaves ``out``
    as it is until :func:`publish_output` swaps the finished run in: an overwrite that is killed, fails or stops at
    ``max_steps`` never touches the old output. ``resume`` continues such an overwrite (its staging directory holds
    checkpoints) before anything else; other runs build in ``out`` itself.
    """
    out, staging = Path(out), staging_dir(out)
    _put_back_set_aside(out)
    if resume and any((staging / train_dir / "checkpoints").glob("step-*")):
        return check_training_output(staging, True, True, marker=marker, what=what, train_dir=train_dir)
    check_training_output(out, resume, overwrite, marker=marker, what=what, train_dir=train_dir, owned=owned,
                          keep=keep, command=command)
    if overwrite and not resume and out.is_dir() and any(out.iterdir()):
        return staging
    return out


def publish_output(work: str | os.PathLike, out: str | os.PathLike) -> None:
    """Replace ``out`` by the finished run in ``work`` (nothing to do when they are the same directory).

    Entries of the old ``out`` that ``work`` lacks (files the stage does not write) are carried over first, as
    hard links where possible, so they survive the swap; then the two directories are swapped by renames.
    """
    work, out = Path(work).absolute(), Path(out).absolute()
    if work == out:
        return
    if out.is_dir():
        for entry in out.iterdir():
            target = work / entry.name
            if target.exists() or target.is_symlink():
                continue
            link_tree(entry, target)
    _swap_in(work, out)


def link_tree(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Copy a file or directory tree from ``source`` to ``target`` as hard links where possible (no extra space)."""
    if os.path.isdir(source) and not os.path.islink(source):
        shutil.copytree(source, target, symlinks=True, copy_function=_link_or_copy, dirs_exist_ok=True)
    else:
        _link_or_copy(source, target)


def _link_or_copy(source: str | os.PathLike, target: str | os.PathLike) -> None:
    if os.path.islink(source):
        shutil.copy2(source, target, follow_symlinks=False)
        return
    try:
        os.link(source, target)
    except OSError:  # another file system, or links not supported
        shutil.copy2(source, target)
