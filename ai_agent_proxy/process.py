"""Process-wide matters: the open-files limit and how the C heap gives memory back (applied
at start-up), thread names the system shows, and telling a service manager how the server
is doing (`notify`)."""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import resource
import socket
import sys

log = logging.getLogger("ai_agent_proxy.process")

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MMAP_THRESHOLD = 128 * 1024


def raise_open_files_limit() -> int:
    """Lift the soft RLIMIT_NOFILE to the hard limit; return the soft limit in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            log.info("open_files_limit raised from=%d to=%d", soft, target)
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("open_files_limit not raised soft=%d hard=%d error=%s", soft, hard, exc)
    return soft


def return_large_allocations() -> None:
    """Have glibc serve every allocation of MMAP_THRESHOLD or more with its own mapping,
    given back to the system when freed. By default glibc raises that threshold after each
    large free, so the buffers of a few large bodies end up in the heap and stay there
    (README, Reliability, has the measurements)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to tune
        pass


_PR_SET_NAME = 15  # Linux prctl option


def name_this_thread(name: str) -> None:
    """Give the calling thread a name the system shows (`top -H`, /proc/PID/task/TID/comm;
    at most 15 bytes), so its CPU can be told from the event loop's (tools/bench.py)."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).prctl(_PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def notify(state: str) -> bool:
    """Tell systemd (`Type=notify`) something like READY=1 or STOPPING=1, when it asked to
    be told (NOTIFY_SOCKET is set). The sd_notify protocol: one datagram on a unix socket,
    an address starting with @ being in the abstract namespace. Returns whether it was sent.
    """
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.connect(address)
            sock.sendall(state.encode())
        return True
    except OSError as exc:
        log.warning("notify_failed state=%s error=%s", state.split("\n")[0], exc)
        return False
