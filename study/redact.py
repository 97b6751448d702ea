"""Passwords out of everything mannstudy logs, prints or writes: one function, used at every exit point.

A connection string may carry a password (``postgresql://user:secret@host/db``, or libpq's
``?password=secret``). Whatever leaves the process as text goes through :func:`redact` first: the
study run's MLflow params, tags and ``spec.json`` (``study.tracking.start_study_run``), the sweep's
progress lines, and the one-line errors of the ``mannstudy`` command. The password becomes ``***``;
the user, host and database stay, so the record still says which database a study used.

Tune pickles the searcher, with its Optuna storage, into its state files (``tuner.pkl``,
``searcher-state-*.pkl``) in ``results_dir``: the storage there is :class:`study.search.StudyStorage`,
which pickles its URL redacted and gets the password back, on unpickling, from the URL this process
was given (:func:`keep_secret`, :func:`recall_secret`).

The password is better never written into a study at all: the cluster gives it to PostgreSQL's
client library through a password file (``~/.pgpass``, or ``$PGPASSFILE``) or ``$PGPASSWORD``, and
the URLs name only the user (docs/cluster.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

MASK = "***"
# scheme://user:password@  (the password up to the last '@' before the host; no '/' in the userinfo part)
_USERINFO = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*://[^:/@\s]*:)(?P<secret>[^/\s]*)(?P<at>@)")
# password=... in a URL's query or a libpq key/value string
_KEYWORD = re.compile(r"(?P<head>\bpassword=)(?P<secret>[^&\s;]*)", re.IGNORECASE)


_REFERENCE = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*\}")  # a study file's ${VAR}: names the secret, holds none


def redact(text: str) -> str:
    """``text`` with every password of a connection string in it replaced by ``***``."""
    def mask(match: re.Match) -> str:
        secret = match["secret"]
        if not secret or _REFERENCE.fullmatch(secret):
            return match[0]
        at = match.start("secret") - match.start()
        return match[0][:at] + MASK + match[0][at + len(secret):]

    return _KEYWORD.sub(mask, _USERINFO.sub(mask, text))


def redact_values(data: Any) -> Any:
    """A copy of ``data`` (mappings, lists, tuples of values) with :func:`redact` applied to every string."""
    if isinstance(data, str):
        return redact(data)
    if isinstance(data, Mapping):
        return {k: redact_values(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return type(data)(redact_values(v) for v in data)
    return data


_GIVEN: dict[str, str] = {}  # redacted URL -> the URL as given, in this process only (never written anywhere)


def keep_secret(url: str) -> str:
    """Remember ``url`` for this process; return its redacted form (what may be written)."""
    public = redact(url)
    if public != url:
        _GIVEN[public] = url
    return public


def recall_secret(public: str) -> str:
    """The URL :func:`keep_secret` was given for ``public``; ``public`` itself when this process was given none (the
    password then comes from PostgreSQL's password file or ``$PGPASSWORD``, as on a cluster)."""
    return _GIVEN.get(public, public)
