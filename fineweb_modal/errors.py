"""The two kinds of failure a shard can meet: ones a retry can pass, and ones it cannot."""

from __future__ import annotations

import errno


class ConfigError(ValueError):
    """A parameter or parameter combination is invalid; raised before any shard runs."""


class ServiceUnavailable(ConfigError):
    """A service the run needs (Modal) cannot be reached or refuses the credentials: said before any work, and never
    read as "nothing is there" by code that takes a ConfigError from a listing to mean an empty one."""


class DiskSpaceError(ConfigError):
    """The data dir's disk clearly lacks the room for what a stage will write; raised before it starts."""


class ShardBusyError(Exception):
    """Another run holds this shard's lease: it is being worked on now; this run leaves it alone."""


class WorkerLostError(Exception):
    """The process working on a shard died under it (killed by the OS, out of memory, crashed); a fresh one may pass."""


class Interrupted(Exception):
    """The run was asked to stop (Ctrl-C) before this shard finished: nothing was recorded done, a rerun resumes it."""


class BadDataError(Exception):
    """The input itself is wrong (missing column, unreadable file): retrying cannot help."""


class UnreadableFileError(BadDataError):
    """A file that cannot be decoded at all (truncated, garbled), as opposed to a readable file with wrong data."""


# OSErrors whose cause is the data or the setup, not the moment: retrying them only wastes time.
_PERMANENT_ERRNOS = {errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EACCES, errno.EPERM, errno.ENOSPC}


# What `modal` and `grpclib` raise when a client loses its link to Modal's servers (matched by class name here:
# no modal import in this package).
MODAL_LINK_ERRORS = frozenset({"ConnectionError", "ServiceError", "InternalError", "RetryTimeoutError", "StreamTerminatedError"})


def is_transient(exc: BaseException) -> bool:
    """True for errors that can pass on a retry (I/O hiccups, timeouts, lost connections)."""
    if isinstance(exc, (BadDataError, ConfigError, ShardBusyError, Interrupted)):
        return False
    if isinstance(exc, (TimeoutError, ConnectionError, WorkerLostError)):
        return True
    if isinstance(exc, OSError):
        return exc.errno not in _PERMANENT_ERRNOS
    # Exceptions re-raised across a process or Modal boundary keep their class name. Modal's own: a lost link to
    # its servers (the waiting call may still run and is re-attached to), and a call Modal itself calls retriable.
    return type(exc).__name__ in {"ReadTimeout", "ConnectTimeout", "RemoteProtocolError", "InternalFailure", *MODAL_LINK_ERRORS}
