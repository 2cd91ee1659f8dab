"""Text that came from outside, made safe to keep, log and print.

Request fields are attacker-chosen: a newline forges a log line, an escape sequence rewrites
an operator's terminal, a NUL is refused by PostgreSQL, and 16 KiB of scope fills a disk
when it is written for every refused request. Three tools, used wherever such text leaves
the request:

- :func:`has_control_characters`: the parse-time check (a request carrying one is refused);
- :func:`escape` / :func:`bounded`: what a log line, an audit row or a terminal gets;
- :func:`masked_url`: a database or Redis URL with its password hidden.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

# C0 controls, DEL and C1 controls: no OAuth parameter may carry one (RFC 6749 Appendix A
# allows only visible characters and spaces), and none belongs in a log.
CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# What is kept of one attacker-chosen field in a log line or an audit record.
MAX_FIELD = 128


def has_control_characters(text: str) -> bool:
    return CONTROL_CHARACTERS.search(text) is not None


def _escaped(char: str) -> str:
    code = ord(char)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def escape(text: str) -> str:
    """``text`` with every unprintable character (controls, line and paragraph separators,
    bidirectional overrides) written as a visible ``\\xNN`` / ``\\uNNNN`` escape."""
    if text.isprintable():  # the common case, checked in C
        return text
    return "".join(c if c.isprintable() else _escaped(c) for c in text)


def escape_lines(text: str) -> str:
    """:func:`escape` for each line of a multi-line text meant for a terminal."""
    return "\n".join(escape(line) for line in text.split("\n"))


def bounded(text: str | None, limit: int = MAX_FIELD) -> str | None:
    """Attacker-chosen text as it may be kept: escaped, and cut to ``limit`` characters."""
    if text is None:
        return None
    return escape(text[:limit])[:limit]


def masked_url(url: str) -> str:
    """``url`` with the password of its user-info part replaced by ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    if parts.password is None:
        return url
    userinfo, _, hostport = parts.netloc.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{hostport}"))


def without_password(text: str, url: str) -> str:
    """``text`` (an error message, say) with the password of ``url`` masked wherever it
    appears: drivers quote the whole connection URL in some of their errors."""
    try:
        password = urlsplit(url).password
    except ValueError:
        return text
    if not password:
        return text
    return text.replace(password, "***")
