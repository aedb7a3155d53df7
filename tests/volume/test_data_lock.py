"""One writer or many readers of a volume's data, across processes (qemu's rule for
images): a second read-write ``Volume`` or ``serve`` is refused with the holder named;
keyslot commands still work while a volume is served, as cryptsetup allows them on an
active device."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cryptoplane.exceptions import Busy
from cryptoplane.volume import luks
from cryptoplane.volume.device import Volume

PW = b"lock test"


@pytest.fixture
def img(tmp_path: Path) -> Path:
    path = tmp_path / "vol.img"
    with open(path, "wb") as f:
        f.truncate(18 << 20)
    luks.format(path, PW, kdf="pbkdf2", kdf_params={"iterations": 1000})
    return path


def test_one_writer_or_many_readers(img: Path) -> None:
    layout = luks.unlock(img, passphrase=PW)
    with Volume(img, layout) as writer:
        writer.pwrite(0, b"x" * 4096)
        with pytest.raises(Busy, match=rf"in use by pid {os.getpid()} .*second writer"):
            Volume(img, layout)
        with pytest.raises(Busy, match="being written"):
            Volume(img, layout, read_only=True)
        # a header read (another descriptor of the file, opened and closed) keeps the lock
        luks.unlock(img, passphrase=PW)
        with pytest.raises(Busy):
            Volume(img, layout)
    with Volume(img, layout, read_only=True) as a, Volume(img, layout, read_only=True) as b:
        assert a.read(0, 4096) == b.read(0, 4096) == b"x" * 4096
        with pytest.raises(Busy, match="second writer"):
            Volume(img, layout)
    with Volume(img, layout) as again:  # every lock went with its volume
        assert again.read(0, 1) == b"x"


def test_a_second_serve_is_refused_and_names_the_first(img: Path, tmp_path: Path) -> None:
    key_file = tmp_path / "pass"
    key_file.write_bytes(PW)
    sock = tmp_path / "a.sock"
    first = subprocess.Popen([sys.executable, "-m", "cryptoplane", "serve", "--socket",
                              str(sock), "--key-file", str(key_file), str(img)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        second = subprocess.run([sys.executable, "-m", "cryptoplane", "serve", "--socket",
                                 str(tmp_path / "b.sock"), "--key-file", str(key_file),
                                 str(img)], capture_output=True, timeout=60, check=False)
        assert second.returncode != 0
        err = second.stderr.decode()
        assert f"pid {first.pid}" in err and "serve" in err and "second writer" in err, err
        assert "Traceback" not in err
        # keyslots may change meanwhile (cryptsetup allows it on an active device)
        new = tmp_path / "new"
        new.write_bytes(b"another")
        assert luks.add_key(img, key_file=key_file, new_key_file=new, kdf="pbkdf2",
                            kdf_params={"iterations": 1000}) == 1
    finally:
        first.terminate()
        first.wait(15)
        assert first.stderr is not None
        first.stderr.close()
