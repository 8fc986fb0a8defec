"""Files the library reads and writes: checks of input and output paths made before any work,
and atomic writes. Every failure is a :class:`~mmorepa.errors.PathError` naming the path."""
import os
import tempfile
from pathlib import Path
from typing import Sequence

from .errors import PathError


def check_input_file(path, what: str = 'file') -> Path:
    """``path`` as a ``Path`` if it is a readable file; else :class:`PathError` naming it."""
    path = Path(path)
    if not path.exists():
        raise PathError(f'{what} not found: {path}')
    if not path.is_file():
        raise PathError(f'{what} {path} is not a file')
    if not os.access(path, os.R_OK):
        raise PathError(f'{what} {path} is not readable')
    return path


def _nearest_existing(path: Path) -> Path:
    """``path`` or its closest ancestor that exists (the folder a new path would be made in)."""
    path = Path(os.path.abspath(path))
    while not os.path.exists(path):  # False for a name too long, where Path.exists raises
        path = path.parent
    return path


def _check_can_create_in(path: Path, target: Path, what: str) -> None:
    """``target`` (a new file or folder) can be made from ``path``, its closest existing
    ancestor: a folder in which we can create files. Tried for real (a temporary file), since
    permission bits do not tell for root or read-only file systems."""
    if not path.is_dir():
        raise PathError(f'cannot write {what} {target}: {path} is not a directory')
    try:
        fd, probe = tempfile.mkstemp(prefix='.mmorepa-probe-', dir=path)
    except OSError as e:
        raise PathError(f'cannot write {what} {target}: {path} is not writable '
                        f'({e.strerror})') from None
    os.close(fd)
    os.unlink(probe)


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError):
        return default


def check_name_lengths(path, what: str = 'output') -> Path:
    """Refuse a path with a name longer than the file system allows (``NAME_MAX`` bytes, 255 on
    Linux file systems) or too long as a whole (``PATH_MAX``), before any work."""
    path = Path(path)
    parent = _nearest_existing(path.parent)
    name_max = _pathconf(parent, 'PC_NAME_MAX', 255)
    for part in path.parts:
        size = len(os.fsencode(part))
        if size > name_max:
            raise PathError(f'{what} name too long ({size} bytes, the file system allows '
                            f'{name_max}): {part}')
    path_max = _pathconf(parent, 'PC_PATH_MAX', 4096)
    size = len(os.fsencode(os.path.abspath(path)))
    if size >= path_max:
        raise PathError(f'{what} path too long ({size} bytes, the limit is {path_max - 1}): {path}')
    return path


def check_output_file(path, inputs: Sequence = (), what: str = 'output') -> Path:
    """Refuse, before any work, an output file that cannot be written: a directory, a path under
    a file, a folder we may not write in, a name too long, or one of the ``inputs``."""
    path = Path(path)
    if str(path) == '':
        raise PathError(f'{what} path is empty')
    check_name_lengths(path, what)
    if path.is_dir():
        raise PathError(f'{what} {path} is a directory')
    for src in inputs:
        src = Path(src)
        if src.exists() and path.exists() and path.resolve() == src.resolve():
            raise PathError(f'refusing to overwrite the input {src} with the {what}')
    if path.exists() and not os.access(path, os.W_OK):
        raise PathError(f'cannot write {what} {path}: it is read-only')
    _check_can_create_in(_nearest_existing(path.parent), path, what)
    return path


def check_output_dir(path, what: str = 'work dir') -> Path:
    """Refuse, before any work, an output folder that is a file, has too long a name, or cannot
    be made or written."""
    path = Path(path)
    check_name_lengths(path, what)
    if path.exists() and not path.is_dir():
        raise PathError(f'{what} {path} is not a directory')
    _check_can_create_in(_nearest_existing(path), path, what)
    return path


def _umask() -> int:
    """The process's umask: read from /proc where it can be (setting it to read it back would
    briefly change it for other threads)."""
    try:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith('Umask:'):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, write_fn) -> Path:
    """Write ``path`` through ``write_fn(tmp_path)`` and rename into place: readers never see a
    partial file, and an interrupted write leaves the old one. The file gets the permissions the
    umask gives any new file (``0o666 & ~umask``), not the temporary file's 0600. A failure to
    write is a :class:`PathError` naming ``path``."""
    path = Path(path)
    if path.is_dir():
        raise PathError(f'cannot write {path}: it is a directory')
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # a short temporary name: any legal output name fits (NAME_MAX)
        fd, tmp = tempfile.mkstemp(prefix='.mmorepa-', suffix=path.suffix[:16],
                                   dir=path.parent)
    except OSError as e:
        raise PathError(f'cannot write {path}: {e.strerror or e}') from None
    os.close(fd)
    try:
        os.chmod(tmp, 0o666 & ~_umask())
        write_fn(tmp)
        os.replace(tmp, path)
    except OSError as e:
        raise PathError(f'cannot write {path}: {e.strerror or e}') from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
