"""A process SIGKILLed while it changes a keyslot's passphrase, again and again, in the
middle of its writes: the volume always opens with the old or the new passphrase, and
its data (the volume key) is the same. The header's two copies and sequence ids are what
make this hold (cryptsetup's own scheme).

Only kills that land while a write is in progress count: the changing process marks, in
a small shared file, the offset of each device write from its start until the fsync
after it has returned; the test waits for a mark, kills, and counts the kill only if the
mark is still there once the process is dead (the write, or its fsync, was cut). Which
write is aimed at is random (the first to start after a random number of writes), so
the cuts fall on the keyslot material and on the header copies alike."""

from __future__ import annotations

import mmap
import os
import random
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cryptoplane.volume import luks
from cryptoplane.volume.errors import WrongPassphrase

KILLS = 12           # kills that cut a write
MAX_ROUNDS = 20 * KILLS
FAST = {"hash": "sha256", "iterations": 1000}

# flips the passphrase of the volume between A and B forever (until killed); the state
# file holds the number of device writes started, then 1 + the offset of the write in
# progress (from the write's start to the end of the fsync after it), or 0
FLIPPER = """
import mmap, os, struct, sys
from cryptoplane.volume import luks, luks_io
path, state_path = sys.argv[1], sys.argv[2]
state = mmap.mmap(os.open(state_path, os.O_RDWR), 16)
write, sync = luks_io.Device.write, luks_io.Device.sync
started = 0
def marked_write(self, offset, data):
    global started
    started += 1
    state[:16] = struct.pack("<qq", started, offset + 1)
    write(self, offset, data)
def marked_sync(self):
    sync(self)
    state[8:16] = struct.pack("<q", 0)
luks_io.Device.write = marked_write
luks_io.Device.sync = marked_sync
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


def writes_started(state: mmap.mmap) -> int:
    value: int = struct.unpack("<q", state[:8])[0]
    return value


def marked(state: mmap.mmap) -> int:
    """1 + the offset of the write in progress, or 0."""
    value: int = struct.unpack("<q", state[8:16])[0]
    return value


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
    state_path = tmp_path / "state"
    state_path.write_bytes(bytes(16))
    state = mmap.mmap(os.open(state_path, os.O_RDWR), 16)
    cut: list[int] = []  # the offset of the write each counted kill cut
    rounds = 0
    while len(cut) < KILLS and rounds < MAX_ROUNDS:
        rounds += 1
        state[:16] = bytes(16)
        proc = subprocess.Popen([sys.executable, "-c", FLIPPER, str(img), str(state_path)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            assert proc.stdout.readline().strip() == b"ready"
            aim = rng.randrange(1, 12)  # kill in the aim-th write (or the first after it)
            deadline = time.monotonic() + 30.0
            while not (writes_started(state) >= aim and marked(state)):
                assert time.monotonic() < deadline, "the writes never came"
                # spin, no sleep: a small write and its fsync take well under a millisecond
        finally:
            proc.send_signal(signal.SIGKILL)
            _, err = proc.communicate(timeout=30)
        assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
        if marked(state):  # the process died with a write in progress
            cut.append(marked(state) - 1)
        assert unlock_either(img) == key
    assert len(cut) == KILLS, f"only {len(cut)} of {rounds} kills cut a write"
    # not always the same write: the header at offset 0 (LUKS1's phdr, LUKS2's primary
    # copy) and at least one other (keyslot material, the secondary copy, a wipe)
    assert 0 in cut and len(set(cut)) >= 2, cut
    if version == 2:
        assert luks.dump(img)["keyslots"]  # the header still lists its keyslot
