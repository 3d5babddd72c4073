"""The two kinds of failure a user is told about in one line.

``UserError`` is the base of every error caused by something the user can fix: a malformed dataset,
corpus, config or request, an unknown model spec, a missing artifact. The CLI prints its message alone
(``error: <message>``, exit code 2) and Prefect does not retry the task that raised it, since the same
input fails the same way. Any other exception is a bug or a crash: the CLI shows its traceback (exit 1)
and a task keeps its retries.

``ServiceUnavailable`` is the one user error that is transient: a server the config points at did not
answer. The user may have to start it, but it may also just be restarting, so tasks do retry it.

A child process (an evaluation shard, a training rank) reports a user error to its parent as one line on
stderr, ``report_line(error)``; the parent turns it back into the same type with ``reported_error``. The
line needs no disk, so a full disk (``DiskFull``) reaches the parent as itself, and is retried as such.

Kept free of Prefect and of other packages, so every domain package can raise these.
"""

from __future__ import annotations

import json


class UserError(Exception):
    """A failure caused by input the user can fix; the message names the culprit (file:line, key, id)."""


class ServiceUnavailable(UserError):
    """A server named in the config (model endpoint, retriever) did not answer; worth retrying."""


class DiskFull(UserError):
    """A write found no space left on its file system; the message names the file. Transient like
    ``ServiceUnavailable`` (space may be freed meanwhile), so tasks retry it; what was written before stays."""


REPORT_MARK = "distillery-user-error: "
# The types a report line keeps, most specific first (the first that matches names the error).
_REPORTED = (DiskFull, ServiceUnavailable, UserError)


def report_line(error: UserError) -> str:
    """The one stderr line (newline included) by which a child process reports ``error`` to its parent."""
    kind = next(k.__name__ for k in _REPORTED if isinstance(error, k))
    return REPORT_MARK + json.dumps({"type": kind, "message": str(error)}) + "\n"


def reported_error(line: str, context: str = "") -> UserError | None:
    """The error a ``report_line`` carries (its type kept, ``context`` put before its message), else None.
    A line may carry a prefix before the mark (torch.distributed's ``[rank0]:``)."""
    at = line.find(REPORT_MARK)
    if at < 0:
        return None
    try:
        record = json.loads(line[at + len(REPORT_MARK):])
        kind = {k.__name__: k for k in _REPORTED}[record["type"]]
        message = str(record["message"])
    except (ValueError, KeyError, TypeError):
        return None
    return kind(f"{context}{message}")
