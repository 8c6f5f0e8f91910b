"""A real server process for the shutdown tests: ``python -m tests.helpers.serve_fake PORT DELAY_S``.

Serves :func:`tests.helpers.serving.make_app` (``fake`` sleeps ``DELAY_S`` per batch) under uvicorn
with a 10 s graceful-shutdown limit, the way ``python -m experiments.serve`` runs.
"""

from __future__ import annotations

import sys

import uvicorn

from serve.frontend import header_timeout_protocol
from tests.helpers.serving import FakeCascade, make_app

if __name__ == "__main__":
    port, delay_s = int(sys.argv[1]), float(sys.argv[2])
    uvicorn.run(make_app(fake=FakeCascade(delay_s)), host="127.0.0.1", port=port, log_level="warning",
                timeout_graceful_shutdown=10, http=header_timeout_protocol(5.0))
