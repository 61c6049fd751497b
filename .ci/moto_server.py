"""Runs moto's S3 emulation for the tests, on HOST PORT, with its writes taken one at a time.

moto checks a conditional write (`If-None-Match: *` on PutObject or CompleteMultipartUpload)
and then performs it in a second step, so two racing writers can both pass the check; S3
does both at once. Serializing every request but reads makes moto's conditional writes atomic,
as the tests of racing commits need.
"""

import os
import sys
import threading

from moto.moto_server.werkzeug_app import (
    DomainDispatcherApplication,
    MotoRequestHandler,
    create_backend_app,
)
from werkzeug.serving import run_simple


def main() -> None:
    host, port = sys.argv[1], int(sys.argv[2])
    os.environ.setdefault("MOTO_PORT", str(port))
    app = DomainDispatcherApplication(create_backend_app)
    writes = threading.Lock()

    def serialized(environ, start_response):
        if environ.get("REQUEST_METHOD") in ("GET", "HEAD"):
            return app(environ, start_response)
        with writes:
            return list(app(environ, start_response))

    run_simple(host, port, serialized, threaded=True, request_handler=MotoRequestHandler)


if __name__ == "__main__":
    main()
