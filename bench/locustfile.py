"""Load the Open Inference Protocol endpoint with Locust, the load tool most teams already run.

    locust -f bench/locustfile.py --headless --host http://127.0.0.1:8000 -u 64 -r 64 -t 30s --csv /tmp/load
    LOAD_MODEL=resnet38 LOAD_ENCODING=json LOAD_RPS_PER_USER=2 locust -f bench/locustfile.py ...

Each user sends ``POST /v2/models/$LOAD_MODEL/infer`` with ``$LOAD_INPUTS_PER_REQUEST`` inputs at a
constant ``$LOAD_RPS_PER_USER`` requests per second (Locust's ``constant_throughput``: with enough users
the arrivals do not wait for answers, close to the open loop of ``serve.loadgen``). Inputs are the
rows of ``$LOAD_INPUTS`` (a ``.npy`` array ``[n, *input_shape]``, normalised as the model expects) or,
without it, standard normal rows of the shape the model's metadata gives. A request answered later
than ``$LOAD_SLO_MS`` counts as a failure named "over the objective", so Locust's failure ratio is one
minus SLO attainment, the figure ``bench/serve_load.py`` reports (429/503 shed and 504 expired count
as failures too, each under its status). Locust prints the latency percentiles and rates; ``--csv``
writes them.
"""

from __future__ import annotations

import os

import numpy as np
from locust import FastHttpUser, constant_throughput, task

from serve.loadgen import encode_infer

MODEL = os.environ.get("LOAD_MODEL", "cascade")
ENCODING = os.environ.get("LOAD_ENCODING", "binary")
PER_REQUEST = int(os.environ.get("LOAD_INPUTS_PER_REQUEST", "16"))
SLO_MS = float(os.environ.get("LOAD_SLO_MS", "100"))
RATE = float(os.environ.get("LOAD_RPS_PER_USER", "1"))


_BODIES: list[tuple[bytes, dict[str, str]]] = []  # encoded once per process and shared by its users


def _bodies(client) -> list[tuple[bytes, dict[str, str]]]:
    """The request bodies: loading and encoding them per user took seconds of the client's CPU when
    80 users started at once, inside the measured window."""
    if not _BODIES:
        path = os.environ.get("LOAD_INPUTS")
        if path:
            x = np.load(path).astype("<f4")
        else:
            meta = client.get(f"/v2/models/{MODEL}", name="metadata").json()
            shape = [d for d in meta["inputs"][0]["shape"][1:]]
            x = np.random.default_rng(0).standard_normal((256, *shape)).astype("<f4")
        bodies = [encode_infer(x[(i * PER_REQUEST + np.arange(PER_REQUEST)) % len(x)], ENCODING, ["label"])
                  for i in range(max(1, len(x) // PER_REQUEST))]
        if not _BODIES:  # another user may have filled it while this one waited for the metadata
            _BODIES.extend(bodies)
    return _BODIES


class ProtocolUser(FastHttpUser):
    """One client sending protocol ``infer`` requests at a constant rate."""

    wait_time = constant_throughput(RATE)

    def on_start(self) -> None:
        self.bodies = _bodies(self.client)
        self.i = hash(self) % len(self.bodies)  # users start at different inputs

    @task
    def infer(self) -> None:
        body, headers = self.bodies[self.i % len(self.bodies)]
        self.i += 1
        with self.client.post(f"/v2/models/{MODEL}/infer", data=body, headers=headers, name=f"infer {MODEL}",
                              catch_response=True) as r:
            if r.status_code != 200:
                r.failure(f"HTTP {r.status_code}")
            elif r.request_meta["response_time"] > SLO_MS:
                r.failure("over the objective")
            else:
                r.success()
