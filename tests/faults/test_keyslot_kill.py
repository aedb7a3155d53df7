"""A process SIGKILLed while it changes a keyslot's passphrase, again and again, at
random moments: the volume always opens with the old or the new passphrase, and its
data (the volume key) is the same. The header's two copies and sequence ids are what
make this hold (cryptsetup's own scheme)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cryptoplane.volume import luks
from cryptoplane.volume.errors import WrongPassphrase

KILLS = 12
FAST = {"hash": "sha256", "iterations": 1000}

# flips the passphrase of the volume between A and B forever (until killed)
FLIPPER = """
import sys
from cryptoplane.volume import luks
path = sys.argv[1]
a, b = b"passphrase-A", b"passphrase-B"
print("ready", flush=True)
while True:
    for old, new in ((a, b), (b, a)):
        try:
            luks.change_key(path, old, new, kdf_name="pbkdf2",
                            kdf_params={"hash": "sha256", "iterations": 1000})
        except luks.WrongPassphrase:
            pass  # a previous run was killed after the change: the other way round
"""


def unlock_either(path: Path) -> bytes:
    for pw in (b"passphrase-A", b"passphrase-B"):
        try:
            return luks.unlock(path, passphrase=pw).volume_key
        except WrongPassphrase:
            continue
    pytest.fail("the volume opens with neither the old nor the new passphrase")


@pytest.mark.parametrize("version", [1, 2])
def test_sigkill_during_keyslot_changes_leaves_an_openable_volume(tmp_path: Path,
                                                                   version: int) -> None:
    img = tmp_path / "vol.img"
    img.touch()
    os.truncate(img, 17 << 20)  # room for the header (data at 16 MiB at most) and 1 MiB
    info = luks.format(img, b"passphrase-A", version=version, sector_size=512,
                       kdf="pbkdf2", kdf_params=FAST)
    os.truncate(img, info.data_offset + (1 << 20))
    key = unlock_either(img)
    rng = random.Random(version)
    changed = 0
    for _ in range(KILLS):
        proc = subprocess.Popen([sys.executable, "-c", FLIPPER, str(img)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == b"ready"
            time.sleep(rng.uniform(0.005, 0.15))  # a few changes happen, one is cut
        finally:
            proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
        assert unlock_either(img) == key
        changed += 1
    assert changed == KILLS
    if version == 2:
        assert luks.dump(img)["keyslots"]  # the header still lists its keyslot
