"""Schemathesis against the server's own ``/openapi.json``: requests it generates for every route (valid and
invalid, in all its phases) find no 5xx, and every answer's status, content type, headers and body are
ones the document describes.

Run through Schemathesis' command line (its pytest plugin does not load under this pytest), with
``tests/schemathesis.toml``. Its ``positive_data_acceptance`` check is left out: it counts a schema-valid
request refused on meaning (a tensor shape that is not the model's, exit above enter threshold) as a
failure. Its ``negative_data_rejection`` check takes 413 as a rejection: the server bounds a request's size
before it reads the rest, so an oversized request with other faults too is refused for its size.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.serving import AUTH, make_app, served


def test_generated_requests_get_no_5xx_and_only_documented_answers(tmp_path):
    cli = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if cli is None:
        pytest.skip("schemathesis is not installed: pip install schemathesis")
    with served(make_app()) as url:
        out = subprocess.run([cli, "--config-file", str(Path(__file__).with_name("schemathesis.toml")), "run",
                              f"{url}/openapi.json", "--exclude-checks", "positive_data_acceptance",
                              "-n", "30", "--seed", "1", "-H", f"Authorization: {AUTH['Authorization']}",
                              "--no-color", "--report-dir", str(tmp_path)],
                             capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-8000:]
    assert "passed" in out.stdout and "failed" not in out.stdout.split("SUMMARY")[-1]
