"""Who may write a volume's data: one writer, or any number of readers, across processes.

qemu refuses a second writer of an image with an open-file-description (OFD) lock, and
so do we: a read-write ``Volume`` (``serve``, ``convert-ivs``) holds a write lock, a
read-only one a read lock, for as long as it is open. The lock covers one byte far past
any image's end, so it is about the data and never about bytes, and it does not meet
the ``flock`` that keyslot commands take on the header: adding a key while a volume is
served is allowed, as cryptsetup allows it on an active device.

OFD locks belong to the open file, not to the process (closing another descriptor of
the same file, as a header read does, does not drop them); the refusal names the holder
from ``/proc/PID/fdinfo``, where the kernel lists each open file's locks.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from cryptoplane.exceptions import Busy

LOCK_BYTE = 1 << 62  # past the end of any image: a lock on the data as a whole
# struct flock on Linux x86-64 and arm64: l_type, l_whence, l_start, l_len, l_pid
_FLOCK = "hh4xqqi4x"


def lock_data(fd: int, *, write: bool, path: str | os.PathLike[str]) -> None:
    """Take the data lock on ``fd`` (a write lock needs it open for writing); ``Busy``,
    naming the holder, if another open file holds a conflicting one."""
    kind = fcntl.F_WRLCK if write else fcntl.F_RDLCK
    request = struct.pack(_FLOCK, kind, os.SEEK_SET, LOCK_BYTE, 1, 0)
    try:
        fcntl.fcntl(fd, fcntl.F_OFD_SETLK, request)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES):
            raise
        who = holder(fd) or "another process"
        if write:
            raise Busy(f"{os.fspath(path)} is in use by {who}: refusing a second writer "
                       f"(stop it, or open read-only while nothing writes)") from None
        raise Busy(f"{os.fspath(path)} is being written by {who}: refusing to read "
                   f"data that changes underneath") from None


def holder(fd: int) -> str | None:
    """``pid N (command line)`` of a process holding a data lock on ``fd``'s file; None
    where that cannot be told. Kernels list OFD locks in ``/proc/locks`` with pid -1
    (the lock belongs to an open file, which many processes may share), but each open
    file shows its locks in its holders' ``/proc/PID/fdinfo``."""
    st = os.fstat(fd)
    inode = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    me = os.getpid()
    for pid in sorted(os.listdir("/proc"), key=lambda p: (len(p), p)):
        if not pid.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{pid}/fdinfo")
        except OSError:
            continue  # gone, or not ours to read
        for name in fds:
            try:
                with open(f"/proc/{pid}/fdinfo/{name}") as f:
                    info = f.read()
            except OSError:
                continue
            if int(pid) == me and int(name) == fd:
                continue
            for line in info.splitlines():
                # "lock:\t1: OFDLCK ADVISORY  WRITE -1 fe:00:2162690 4611686... 4611686..."
                fields = line.split()
                if len(fields) >= 9 and fields[0] == "lock:" and fields[2] == "OFDLCK" \
                        and fields[6] == inode and fields[7] == str(LOCK_BYTE):
                    return f"pid {pid} ({_command(pid)})"
    return None


def _command(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return "?"
    return " ".join(a.decode(errors="replace") for a in argv if a)[:200]


__all__ = ["LOCK_BYTE", "holder", "lock_data"]
