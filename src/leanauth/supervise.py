"""What ``leanauth serve`` becomes once the store is ready: uvicorn's supervisor, and nothing
else. The workers import the application; this process only binds the socket and watches
them, so it should not carry the application's memory. ``leanauth serve`` prepares the store
(which imports nearly everything) and then replaces itself with this module by ``exec``, a
fresh interpreter that imports uvicorn and the logging setup only (measured: about 85 MB
before, for a process that serves nothing).

Usage (by ``leanauth serve`` only, with settings it has checked):
``python -m leanauth.supervise HOST PORT WORKERS LOG_LEVEL LOG_FORMAT``; the workers read the
same ``LEANAUTH_*`` environment.
"""

from __future__ import annotations

import sys

import uvicorn

from leanauth.httpserver import LeanHttpProtocol
from leanauth.logs import configure_logging


def main(argv: list[str]) -> None:
    host, port, workers, level, log_format = argv
    configure_logging(level, log_format)
    uvicorn.run(
        "leanauth.app:serve_app",
        factory=True,
        host=host,
        port=int(port),
        workers=int(workers),
        # Access logs are off: query strings can carry credentials, and the audit trail
        # records requests without them.
        access_log=False,
        log_config=None,
        log_level=level,
        server_header=False,
        http=LeanHttpProtocol,
        # The source address of a request is decided by LEANAUTH_TRUSTED_PROXIES alone.
        proxy_headers=False,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
