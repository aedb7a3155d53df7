"""NBD wire constants, fixed-size structures, and the messages the codec yields.

Numbers are the ones of the NBD protocol document (NetworkBlockDevice/nbd doc/proto.md).
Everything is big-endian. Only what the server speaks is here.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

from cryptoplane.exceptions import InvalidRequest

# handshake
NBDMAGIC: Final = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT: Final = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC: Final = 0x3E889045565A9  # option replies

FLAG_FIXED_NEWSTYLE: Final = 1 << 0
FLAG_NO_ZEROES: Final = 1 << 1
CLIENT_FIXED_NEWSTYLE: Final = 1 << 0
CLIENT_NO_ZEROES: Final = 1 << 1
KNOWN_CLIENT_FLAGS: Final = CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES

# options
OPT_EXPORT_NAME: Final = 1
OPT_ABORT: Final = 2
OPT_LIST: Final = 3
OPT_STARTTLS: Final = 5
OPT_INFO: Final = 6
OPT_GO: Final = 7
OPT_STRUCTURED_REPLY: Final = 8

# option reply types
REP_ACK: Final = 1
REP_SERVER: Final = 2
REP_INFO: Final = 3
REP_FLAG_ERROR: Final = 1 << 31
REP_ERR_UNSUP: Final = REP_FLAG_ERROR | 1
REP_ERR_POLICY: Final = REP_FLAG_ERROR | 2
REP_ERR_INVALID: Final = REP_FLAG_ERROR | 3
REP_ERR_PLATFORM: Final = REP_FLAG_ERROR | 4
REP_ERR_TLS_REQD: Final = REP_FLAG_ERROR | 5
REP_ERR_UNKNOWN: Final = REP_FLAG_ERROR | 6
REP_ERR_SHUTDOWN: Final = REP_FLAG_ERROR | 7
REP_ERR_BLOCK_SIZE_REQD: Final = REP_FLAG_ERROR | 8
REP_ERR_TOO_BIG: Final = REP_FLAG_ERROR | 9

# NBD_REP_INFO payload types
INFO_EXPORT: Final = 0
INFO_NAME: Final = 1
INFO_DESCRIPTION: Final = 2
INFO_BLOCK_SIZE: Final = 3

# transmission flags
TF_HAS_FLAGS: Final = 1 << 0
TF_READ_ONLY: Final = 1 << 1
TF_SEND_FLUSH: Final = 1 << 2
TF_SEND_FUA: Final = 1 << 3
TF_ROTATIONAL: Final = 1 << 4
TF_SEND_TRIM: Final = 1 << 5
TF_SEND_WRITE_ZEROES: Final = 1 << 6
TF_SEND_DF: Final = 1 << 7
TF_CAN_MULTI_CONN: Final = 1 << 8

# commands
REQUEST_MAGIC: Final = 0x25609513
SIMPLE_REPLY_MAGIC: Final = 0x67446698
STRUCTURED_REPLY_MAGIC: Final = 0x668E33EF

CMD_READ: Final = 0
CMD_WRITE: Final = 1
CMD_DISC: Final = 2
CMD_FLUSH: Final = 3
CMD_TRIM: Final = 4
CMD_CACHE: Final = 5
CMD_WRITE_ZEROES: Final = 6
CMD_BLOCK_STATUS: Final = 7

CMD_FLAG_FUA: Final = 1 << 0
CMD_FLAG_NO_HOLE: Final = 1 << 1
CMD_FLAG_DF: Final = 1 << 2
CMD_FLAG_REQ_ONE: Final = 1 << 3
CMD_FLAG_FAST_ZERO: Final = 1 << 4

# structured reply chunks
REPLY_FLAG_DONE: Final = 1 << 0
REPLY_TYPE_NONE: Final = 0
REPLY_TYPE_OFFSET_DATA: Final = 1
REPLY_TYPE_ERROR: Final = (1 << 15) | 1

# errno values on the wire (fixed by the protocol, not the host's errno)
EPERM: Final = 1
EIO: Final = 5
ENOMEM: Final = 12
EINVAL: Final = 22
ENOSPC: Final = 28
EOVERFLOW: Final = 75
ENOTSUP: Final = 95
ESHUTDOWN: Final = 108

# limits this server keeps to (bounded memory whatever the client sends)
MAX_OPTION_DATA: Final = 64 * 1024  # names are at most 4 KiB; anything bigger is refused
MAX_NAME: Final = 4096
MAX_PAYLOAD: Final = 32 * 1024 * 1024  # advertised as the maximum block size

# structures
GREETING: Final = struct.Struct(">QQH")  # NBDMAGIC, IHAVEOPT, handshake flags
CLIENT_FLAGS: Final = struct.Struct(">I")
OPTION_HEADER: Final = struct.Struct(">QII")  # IHAVEOPT, option, length
OPTION_REPLY: Final = struct.Struct(">QIII")  # magic, option, reply type, length
EXPORT_NAME_REPLY: Final = struct.Struct(">QH")  # size, transmission flags
INFO_EXPORT_BODY: Final = struct.Struct(">HQH")  # INFO_EXPORT, size, flags
INFO_BLOCK_SIZE_BODY: Final = struct.Struct(">HIII")  # INFO_BLOCK_SIZE, min, preferred, max
REQUEST: Final = struct.Struct(">IHHQQI")  # magic, flags, type, cookie, offset, length
SIMPLE_REPLY: Final = struct.Struct(">IIQ")  # magic, error, cookie
STRUCTURED_REPLY: Final = struct.Struct(">IHHQI")  # magic, flags, type, cookie, length
OFFSET_DATA_HEAD: Final = struct.Struct(">IHHQIQ")  # the chunk header and its offset
ERROR_CHUNK_BODY: Final = struct.Struct(">IH")  # error, message length

OPTION_NAMES: Final = {
    OPT_EXPORT_NAME: "EXPORT_NAME", OPT_ABORT: "ABORT", OPT_LIST: "LIST",
    OPT_STARTTLS: "STARTTLS", OPT_INFO: "INFO", OPT_GO: "GO",
    OPT_STRUCTURED_REPLY: "STRUCTURED_REPLY",
}


# ---- negotiation events ------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class ExportName:
    """NBD_OPT_EXPORT_NAME: answer with ``export_name_reply`` or close."""
    name: str


@dataclass(frozen=True, slots=True)
class Abort:
    """NBD_OPT_ABORT: answer with ``ack`` and close."""


@dataclass(frozen=True, slots=True)
class ListExports:
    """NBD_OPT_LIST: answer with ``list_reply``."""


@dataclass(frozen=True, slots=True)
class StartTLS:
    """NBD_OPT_STARTTLS: answer with ``ack``, run the TLS handshake, ``tls_established``."""


@dataclass(frozen=True, slots=True)
class StructuredReplies:
    """NBD_OPT_STRUCTURED_REPLY: answer with ``ack`` (replies are structured from then)."""


@dataclass(frozen=True, slots=True)
class InfoRequest:
    """NBD_OPT_INFO, or NBD_OPT_GO when ``go``: answer with ``info_reply``."""
    name: str
    requests: tuple[int, ...]
    go: bool


@dataclass(frozen=True, slots=True)
class OptionError:
    """An option that must be refused: answer with ``option_error(ev.option, ev.code, ...)``."""
    option: int
    code: int
    message: str


# ---- transmission events ------------------------------------------------------------

@dataclass(slots=True)
class Read:
    cookie: int
    offset: int
    length: int


@dataclass(slots=True)
class Write:
    cookie: int
    offset: int
    data: bytes | memoryview = field(repr=False)
    fua: bool


@dataclass(slots=True)
class Flush:
    cookie: int


@dataclass(slots=True)
class Trim:
    cookie: int
    offset: int
    length: int
    fua: bool


@dataclass(slots=True)
class WriteZeroes:
    cookie: int
    offset: int
    length: int
    fua: bool
    no_hole: bool


@dataclass(frozen=True, slots=True)
class Disconnect:
    """NBD_CMD_DISC: finish what is in flight, then close."""


@dataclass(frozen=True, slots=True)
class CommandError:
    """A request refused before it reached the device: reply ``error_reply(...)``."""
    cookie: int
    error: int
    message: str


Event = (ExportName | Abort | ListExports | StartTLS | StructuredReplies | InfoRequest
         | OptionError | Read | Write | Flush | Trim | WriteZeroes | Disconnect | CommandError)


@dataclass(frozen=True, slots=True)
class ExportInfo:
    """What the negotiation says about one export."""
    name: str
    size: int
    read_only: bool = False
    min_block: int = 1
    preferred_block: int = 4096
    max_payload: int = MAX_PAYLOAD
    description: str = ""
    multi_conn: bool = True

    def __post_init__(self) -> None:
        def pow2(n: int) -> bool:
            return n > 0 and n & (n - 1) == 0
        if not (pow2(self.min_block) and self.min_block <= 65536):
            raise InvalidRequest("the minimum block size must be a power of 2 up to 64 KiB")
        if not (pow2(self.preferred_block) and self.preferred_block >= self.min_block):
            raise InvalidRequest("the preferred block size must be a power of 2 >= minimum")
        if self.max_payload % self.min_block or not 0 < self.max_payload <= MAX_PAYLOAD:
            raise InvalidRequest("the maximum payload must be a multiple of the minimum "
                                 "and at most 32 MiB")
        if self.size < 0 or self.size >= 1 << 63:
            raise InvalidRequest("the export size is out of range")

    @property
    def flags(self) -> int:
        f = (TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM
             | TF_SEND_WRITE_ZEROES)
        if self.read_only:
            f |= TF_READ_ONLY
        if self.multi_conn:
            f |= TF_CAN_MULTI_CONN
        return f
