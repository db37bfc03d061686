"""Regenerate the Python modules for grpc_predict_v2.proto (run from anywhere; needs grpcio-tools).

    python fsserve/serving/protos/generate.py

The messages are registered in a private descriptor pool, not protobuf's default one: clients of
the same protocol (tritonclient, kserve) register their own ``inference.*`` messages in the
default pool, and two definitions of one symbol there make the second import fail. With a private
pool the server and such a client live in one process (tests, notebooks).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[2]
PROTO = "fsserve/serving/protos/grpc_predict_v2.proto"
PB2 = HERE / "grpc_predict_v2_pb2.py"
DEFAULT_POOL = "_descriptor_pool.Default().AddSerializedFile("
PRIVATE_POOL = "POOL = _descriptor_pool.DescriptorPool()\nDESCRIPTOR = POOL.AddSerializedFile("


def generate() -> None:
    """Run protoc (from grpcio-tools) and move the messages into a private descriptor pool."""
    cmd = [sys.executable, "-m", "grpc_tools.protoc", f"-I{REPO}", f"--python_out={REPO}", f"--pyi_out={REPO}", f"--grpc_python_out={REPO}", PROTO]
    subprocess.run(cmd, check=True, cwd=REPO)
    source = PB2.read_text(encoding="utf-8")
    if source.count(DEFAULT_POOL) != 1:
        raise RuntimeError(f"unexpected protoc output in {PB2}: cannot find the default-pool registration to replace")
    source = re.sub(r"DESCRIPTOR = _descriptor_pool\.Default\(\)\.AddSerializedFile\(", lambda _: PRIVATE_POOL, source)
    PB2.write_text(source, encoding="utf-8")


if __name__ == "__main__":
    generate()
