"""Logging: plain lines for people, or one JSON object per line (LEANAUTH_LOG_FORMAT=json).

Nothing secret is ever passed to a logger: no client secret, no token, no Authorization
header. Errors carry an internal ``detail`` for the log and a public description for clients.

Messages often quote request fields, which are attacker-chosen: both formats keep one record
on one line and let no control character through (a newline would forge a record, an escape
sequence would rewrite the terminal of whoever reads the log).
"""

from __future__ import annotations

import logging
import time

import orjson

from leanauth import requestid
from leanauth.safetext import escape, escape_lines

PLAIN_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request that caused it (if any)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = requestid.CURRENT.get()
        return True


class PlainFormatter(logging.Formatter):
    """The plain line with its unprintable characters escaped. A traceback keeps its lines,
    escaped and indented: an exception's message may quote a request too, and no line of it
    may pass for a record of its own (every record starts at the line's first column)."""

    def __init__(self) -> None:
        super().__init__(PLAIN_FORMAT)

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        line = super().formatMessage(record)
        request_id = getattr(record, "request_id", None)
        return escape(f"{line} [request {request_id}]" if request_id else line)

    def formatException(self, ei: logging._SysExcInfoType) -> str:  # noqa: N802
        return _indented(super().formatException(ei))

    def formatStack(self, stack_info: str) -> str:  # noqa: N802
        return _indented(super().formatStack(stack_info))


def _indented(text: str) -> str:
    return "\n".join("  " + line for line in escape_lines(text).split("\n"))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        audit = getattr(record, "audit", None)
        if audit is not None:
            # An audit record is an object of the line, not a string inside its message.
            entry["message"] = f"audit: {audit.get('audit')} {audit.get('outcome')}"
            entry["audit"] = audit
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        try:
            line = orjson.dumps(entry).decode()
        except orjson.JSONEncodeError:  # a lone surrogate, which orjson refuses
            line = orjson.dumps({k: _surrogates_escaped(v) for k, v in entry.items()}).decode()
        return _json_unprintable_escaped(line)


def _surrogates_escaped(value: object) -> object:
    return value.encode("utf-8", "backslashreplace").decode() if isinstance(value, str) else value


def _json_unprintable_escaped(line: str) -> str:
    """orjson escapes C0 controls but writes DEL, C1 controls (an 8-bit CSI), line separators
    and bidirectional overrides as they are: give them ``\\uXXXX`` escapes too. Outside
    strings a JSON line has only ASCII, so every such character is inside a string."""
    if line.isprintable():  # the common case, checked in C
        return line
    return "".join(c if c.isprintable() else _json_escaped(c) for c in line)


def _json_escaped(char: str) -> str:
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # a UTF-16 surrogate pair, as JSON spells characters past the BMP
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(JsonFormatter() if log_format == "json" else PlainFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    quiet_libraries(level)


# Libraries whose info lines are noise to an operator (Alembic's "Context impl SQLiteImpl.",
# "Will assume non-transactional DDL." and each migration run; httpx's line per request of
# `leanauth token`): shown at debug, when someone asks what happened.
CHATTY_LIBRARIES = ("alembic", "httpx")


def quiet_libraries(level: str) -> None:
    """Libraries' loggers at warning, unless ``level`` is debug. SQLAlchemy's stay at warning
    even then: at info its engine logs each statement with its parameters, and those hold
    secret hashes, encrypted keys and audit rows."""
    chatty = logging.NOTSET if level.lower() == "debug" else logging.WARNING
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(chatty)
    logging.getLogger("sqlalchemy").setLevel(logging.WARNING)
