"""The fake SGLang interpreter's body for the Slurm tests: ``FAKEPY -m sglang.launch_server --host H --port P ...``
serves tests/sglang_fake.py's protocol-exact fake on ``H:P`` (it loads the weights the trainer pushes, so a run
trains against it) until SIGTERM. ``$FAKE_SGLANG_MODE``: ``serve`` (default), ``die`` (exits 3 at start, as a server
that cannot load its model), ``hang`` (never listens: never healthy)."""

from __future__ import annotations

import os
import signal
import sys
import time

from tests.sglang_fake import FakeSGLang


def main(argv: list[str]) -> int:
    print("fake sglang", " ".join(argv), flush=True)
    if argv[:2] != ["-m", "sglang.launch_server"]:
        print(f"fake sglang: only -m sglang.launch_server is faked, got {argv[:2]}", flush=True)
        return 2
    mode = os.environ.get("FAKE_SGLANG_MODE", "serve")
    if mode == "die":
        print("RuntimeError: cannot load model (fake)", flush=True)
        return 3
    if mode == "hang":
        time.sleep(3600)
    host, port = argv[argv.index("--host") + 1], int(argv[argv.index("--port") + 1])
    fake = FakeSGLang(vocab_size=int(os.environ.get("FAKE_SGLANG_VOCAB", "24")))
    print("serving on", fake.start(host=host, port=port), flush=True)
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    while True:
        time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
