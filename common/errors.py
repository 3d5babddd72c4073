"""The two kinds of failure a user is told about in one line.

``UserError`` is the base of every error caused by something the user can fix: a malformed dataset,
corpus, config or request, an unknown model spec, a missing artifact. The CLI prints its message alone
(``error: <message>``, exit code 2) and Prefect does not retry the task that raised it, since the same
input fails the same way. Any other exception is a bug or a crash: the CLI shows its traceback (exit 1)
and a task keeps its retries.

``ServiceUnavailable`` is the one user error that is transient: a server the config points at did not
answer. The user may have to start it, but it may also just be restarting, so tasks do retry it.

Kept free of Prefect and of other packages, so every domain package can raise these.
"""

from __future__ import annotations


class UserError(Exception):
    """A failure caused by input the user can fix; the message names the culprit (file:line, key, id)."""


class ServiceUnavailable(UserError):
    """A server named in the config (model endpoint, retriever) did not answer; worth retrying."""


class DiskFull(UserError):
    """A write found no space left on its file system; the message names the file. Transient like
    ``ServiceUnavailable`` (space may be freed meanwhile), so tasks retry it; what was written before stays."""
