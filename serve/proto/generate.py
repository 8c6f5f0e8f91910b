"""Regenerate the checked-in gRPC stubs from ``grpc_predict_v2.proto`` (needs ``grpcio-tools``).

    python -m serve.proto.generate

The stubs import each other as a package (``from serve.proto import ...``), so the generated absolute
import is rewritten, and the messages live in a private descriptor pool (see below); nothing else is
edited by hand.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

HERE = Path(__file__).parent


def main() -> int:
    from grpc_tools import protoc

    rc = protoc.main(["protoc", f"-I{HERE}", f"--python_out={HERE}", f"--pyi_out={HERE}", f"--grpc_python_out={HERE}",
                      str(HERE / "grpc_predict_v2.proto")])
    if rc:
        return rc
    # A private descriptor pool: Triton's and KServe's clients register the same ``inference.*`` names in
    # the default pool, and a process that imports both (a test, a gateway) would fail on duplicates.
    pb2 = HERE / "grpc_predict_v2_pb2.py"
    pb2.write_text(pb2.read_text().replace("_descriptor_pool.Default()", "_descriptor_pool.DescriptorPool()"))
    stub = HERE / "grpc_predict_v2_pb2_grpc.py"
    stub.write_text(re.sub(r"^import grpc_predict_v2_pb2 as", "from serve.proto import grpc_predict_v2_pb2 as",
                           stub.read_text(), flags=re.M))
    return 0


if __name__ == "__main__":
    sys.exit(main())
