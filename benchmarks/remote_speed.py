"""The fabric's yardstick as a script: the same run and output as `cryptoplane remote-speed`.

    python benchmarks/remote_speed.py [--quick] [--duration 3] [--skip-kmip]
        [--tls both|on|off] [--stream-clients 100] [--stream-size 64M] [--in-flight 1024]
        [--load-processes 1] [--server URL --token T [--ca --cert --key]] [--json] [--check]

Starts `cryptoplane server` subprocesses on loopback (plain, mutual TLS, and one pinned to
core 1 for the remote engine), PyKMIP's server (cryptoplane/yardstick/kmip_peer.py), and
prints every figure of issue 16's acceptance 4 with its target, and the ratios. Runs from
a checkout without installing (the servers are started with this interpreter's
`-m cryptoplane`, so the checkout must be importable: run it from the checkout's root).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run from a checkout without installing: the package sits next to benchmarks/.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from cryptoplane.cli.remote_speed import remote_speed

if __name__ == "__main__":
    remote_speed.main(args=sys.argv[1:], prog_name="remote_speed.py")
