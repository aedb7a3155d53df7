"""``cryptoplane``: the entry point that gathers the command groups."""

from __future__ import annotations

import click

from .. import __version__
from .engines import engines
from .keys import keys
from .keystore import keystore
from .manager import fabric, manager_cmd, quota
from .remote_speed import remote_speed
from .serve import serve
from .server import server_cmd, tenants, tokens
from .stats import stats
from .stream import decrypt_cmd, encrypt_cmd, keygen_cmd, stream
from .stream_bench import bench as stream_bench
from .volume import volume
from .volume_bench import bench as volume_bench
from .volume_convert import convert_ivs_cmd


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="cryptoplane")
def cli() -> None:
    """cryptoplane: a user-space crypto data plane.

    One API for ciphers, AEAD, hashes, MACs, signatures and key agreement, scheduled on
    the engine that is best for each request. Primitives come from OpenSSL (through the
    `cryptography` package) and a small native sector kernel.
    """


cli.add_command(engines)
cli.add_command(stats)
cli.add_command(remote_speed)  # a fabric server's figures
volume.add_command(volume_bench)
volume.add_command(convert_ivs_cmd)
cli.add_command(volume)
cli.add_command(serve)
cli.add_command(keys)  # a fabric server's named keys
cli.add_command(keystore)  # its schema and master keys
# age-format streams: `cryptoplane encrypt|decrypt|keygen`, as age's own commands, and
# the same under `cryptoplane stream` beside its bench
for command in (encrypt_cmd, decrypt_cmd, keygen_cmd):
    cli.add_command(command)
stream.add_command(stream_bench)
cli.add_command(stream)
# the fabric: the crypto server, and operator commands acting on its keystore
for command in (server_cmd, tokens, tenants):
    cli.add_command(command)
# the fabric's manager: run it, ask it for grants, show its pool
for command in (manager_cmd, quota, fabric):
    cli.add_command(command)

try:  # the speed command lives in its own module
    from .speed import speed

    cli.add_command(speed)
except ImportError:  # pragma: no cover - only while the module is being written
    pass


def main() -> None:
    cli(prog_name="cryptoplane")


if __name__ == "__main__":
    main()
