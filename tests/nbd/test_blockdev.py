"""``FileDevice``: the plain image an export serves, checked as a ``Volume`` is (the same
``BoundedDevice`` rules: ranges inside the device, no writes when read-only, nothing
after close), with typed errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from cryptoplane.exceptions import InvalidRequest
from cryptoplane.nbd.blockdev import BlockDevice, FileDevice


def test_a_file_device_checks_like_a_volume(tmp_path: Path) -> None:
    img = tmp_path / "x.img"
    img.write_bytes(bytes(range(256)) * 32)
    with FileDevice(img, block_size=512) as dev:
        assert isinstance(dev, BlockDevice)
        assert (dev.size, dev.block_size, dev.read_only) == (8192, 512, False)
        dev.pwrite(8190, b"ab")
        assert dev.pread(8190, 2) == b"ab"
        for offset, length in ((-1, 1), (8191, 2), (0, 8193)):
            with pytest.raises(InvalidRequest, match=r"outside the device \(8192 bytes\)"):
                dev.pread(offset, length)
        with pytest.raises(InvalidRequest, match="outside"):
            dev.trim(8000, 200)
    with pytest.raises(InvalidRequest, match="the device is closed"):
        dev.pread(0, 1)
    dev.close()  # again: nothing happens
    with FileDevice(img, read_only=True) as ro:
        assert ro.read_only
        with pytest.raises(InvalidRequest, match="the device is read-only"):
            ro.pwrite(0, b"x")
        with pytest.raises(InvalidRequest, match="read-only"):
            ro.write_zeroes(0, 512)
        assert ro.pread(8190, 2) == b"ab"
