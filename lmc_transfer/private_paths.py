"""Owner-only directories and files for everything that holds KV or controls the daemon.

Directories are created 0700 and files 0600 whatever the umask. An existing directory is used
only when this uid owns it and neither group nor others can write it: whoever can write a
directory can swap or plant the files in it.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path


def ensure_private_dir(directory: str | os.PathLike[str], what: str = "runtime directory") -> Path:
    """Create ``directory`` (and missing parents) 0700, or check an existing one; returns it.

    Raises PermissionError naming ``what``, the owner and the mode when another uid owns it or
    group/others can write it.
    """
    path = Path(directory)
    missing = []
    ancestor = path
    while not os.path.lexists(ancestor):
        missing.append(ancestor)
        ancestor = ancestor.parent
    for new in reversed(missing):  # parents too: a writable parent would let others swap the directory
        try:
            new.mkdir(mode=0o700)
        except FileExistsError:
            continue  # created meanwhile by someone else: the check below decides
        os.chmod(new, 0o700)  # mkdir's mode went through the umask
    check_private_dir(path, what)
    return path


def check_private_dir(directory: str | os.PathLike[str], what: str = "runtime directory") -> None:
    """The check of ``ensure_private_dir`` on an existing directory (FileNotFoundError if none)."""
    st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o022:
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else "not a directory"
        raise PermissionError(
            f"{what} {directory} must be owned by uid {os.getuid()}, a directory and not group/other-writable, "
            f"got {kind} with owner uid {st.st_uid} and mode {oct(st.st_mode & 0o7777)}"
        )


def check_private_file(st: os.stat_result, what: str) -> None:
    """PermissionError unless ``st`` (an fstat of an open file) is a regular file of this uid
    that group and others cannot access (mode 0600 or stricter)."""
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(
            f"{what} must be a regular file owned by uid {os.getuid()} with mode 0600, got "
            f"{'a regular file' if stat.S_ISREG(st.st_mode) else 'no regular file'} owned by uid {st.st_uid} "
            f"with mode {oct(st.st_mode & 0o777)}"
        )


def create_private_file(path: str | os.PathLike[str]) -> int:
    """A new file opened for writing, mode 0600 whatever the umask; fails if ``path`` exists
    (also as a symlink). Returns the descriptor; the caller closes it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o600)
    except BaseException:
        os.close(fd)
        raise
    return fd
