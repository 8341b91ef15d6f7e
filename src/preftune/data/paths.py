"""What a data path is, checked before it is opened: a regular file or a folder, or a clear error.

Opening a FIFO with no writer blocks forever and a device can stream without end, so anything
but a regular file or a folder is refused; a symbolic link loop and a broken link are named as
such (``stat`` alone reports both as a missing file).
"""

from __future__ import annotations

import errno
import os
import stat as stat_module
from pathlib import Path

from preftune.errors import DataError


def check_readable(path: Path, name: str) -> str:
    """``"file"`` or ``"folder"`` when ``path`` is a regular file or a folder; otherwise a DataError
    that says what it is (a symbolic link loop, a broken link, a FIFO or a device)."""
    try:
        mode = path.stat().st_mode
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise DataError("a symbolic link loop (the link leads, through others, back to itself)", file=name,
                            reason="missing_file") from None
        if path.is_symlink():
            raise DataError(f"a broken symbolic link (to '{os.readlink(path)}', which does not exist)", file=name,
                            reason="missing_file") from None
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            where = "" if path.is_absolute() else f" (relative to {Path.cwd()})"
            raise DataError(f"no such file or folder{where}", file=name, reason="missing_file") from None
        raise DataError(f"the file cannot be read: {err.strerror}", file=name, reason="unreadable") from None
    if not (stat_module.S_ISREG(mode) or stat_module.S_ISDIR(mode)):
        kind = "a FIFO (named pipe)" if stat_module.S_ISFIFO(mode) else "a socket" if stat_module.S_ISSOCK(mode) else "a device"
        raise DataError(f"{kind}, not a regular file: preftune reads data from regular files and folders only "
                        "(a pipe could block forever; save the stream to a file first)", file=name, reason="unreadable")
    return "folder" if stat_module.S_ISDIR(mode) else "file"
