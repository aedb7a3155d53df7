"""NBD wire values for the tests, typed in from the NBD protocol document
(NetworkBlockDevice/nbd doc/proto.md, read at commit 89ba7b5), never imported from the
server: a wrong constant in ``cryptoplane.nbd.protocol`` then disagrees with these
instead of agreeing with itself. ``test_codec.py`` checks the server's against them.
Names match the server's module so a test reads the same either way."""

from __future__ import annotations

import struct

# "Newstyle negotiation": S: 64 bits 0x4e42444d41474943 (ASCII 'NBDMAGIC'), 64 bits
# 0x49484156454F5054 (ASCII 'IHAVEOPT'), 16 bits handshake flags; C: 32 bits flags
NBDMAGIC = int.from_bytes(b"NBDMAGIC", "big")
IHAVEOPT = int.from_bytes(b"IHAVEOPT", "big")
assert (NBDMAGIC, IHAVEOPT) == (0x4E42444D41474943, 0x49484156454F5054)
GREETING = struct.Struct(">QQH")
CLIENT_FLAGS = struct.Struct(">I")
CLIENT_FIXED_NEWSTYLE = 1  # "bit 0, NBD_FLAG_C_FIXED_NEWSTYLE"
CLIENT_NO_ZEROES = 2  # "bit 1, NBD_FLAG_C_NO_ZEROES"
# C: IHAVEOPT, 32 bits option, 32 bits length, data
OPTION_HEADER = struct.Struct(">QII")
# "S: 64 bits, 0x3e889045565a9 (magic number for replies)", option, reply type, length
REPLY_MAGIC = 0x3E889045565A9
OPTION_REPLY = struct.Struct(">QIII")

# options: "NBD_OPT_EXPORT_NAME (1)" ... "NBD_OPT_STRUCTURED_REPLY (8)"
OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8

# option reply types: "NBD_REP_ACK (1)", "NBD_REP_SERVER (2)", "NBD_REP_INFO (3)"; the
# errors "have bit 31 set": NBD_REP_ERR_UNSUP (2^31 + 1) ... NBD_REP_ERR_TOO_BIG (2^31 + 9)
REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_ERR_UNSUP = 2**31 + 1
REP_ERR_POLICY = 2**31 + 2
REP_ERR_INVALID = 2**31 + 3
REP_ERR_TLS_REQD = 2**31 + 5
REP_ERR_UNKNOWN = 2**31 + 6
REP_ERR_SHUTDOWN = 2**31 + 7
REP_ERR_BLOCK_SIZE_REQD = 2**31 + 8
REP_ERR_TOO_BIG = 2**31 + 9

# NBD_REP_INFO: "NBD_INFO_EXPORT (0)": 16 bits type, 64 bits size, 16 bits flags;
# "NBD_INFO_BLOCK_SIZE (3)": 16 bits type, 32 bits min, preferred, maximum payload
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3
INFO_EXPORT_BODY = struct.Struct(">HQH")

# transmission flags: "bit 0, NBD_FLAG_HAS_FLAGS", "bit 1, NBD_FLAG_READ_ONLY",
# "bit 8, NBD_FLAG_CAN_MULTI_CONN"
TF_HAS_FLAGS = 1 << 0
TF_READ_ONLY = 1 << 1
TF_CAN_MULTI_CONN = 1 << 8

# "C: 32 bits, 0x25609513, magic (NBD_REQUEST_MAGIC)", 16 bits flags, 16 bits type,
# 64 bits cookie, 64 bits offset, 32 bits length
REQUEST_MAGIC = 0x25609513
REQUEST = struct.Struct(">IHHQQI")
# "S: 32 bits, 0x67446698, magic (NBD_SIMPLE_REPLY_MAGIC)", 32 bits error, 64 bits cookie
SIMPLE_REPLY_MAGIC = 0x67446698
SIMPLE_REPLY = struct.Struct(">IIQ")
# "S: 32 bits, 0x668e33ef, magic (NBD_STRUCTURED_REPLY_MAGIC)", 16 bits flags, 16 bits
# type, 64 bits cookie, 32 bits length
STRUCTURED_REPLY_MAGIC = 0x668E33EF
STRUCTURED_REPLY = struct.Struct(">IHHQI")
REPLY_FLAG_DONE = 1  # "bit 0, NBD_REPLY_FLAG_DONE"
REPLY_TYPE_NONE = 0  # "NBD_REPLY_TYPE_NONE (0)"
REPLY_TYPE_OFFSET_DATA = 1  # "NBD_REPLY_TYPE_OFFSET_DATA (1)"
REPLY_TYPE_ERROR = 2**15 + 1  # "NBD_REPLY_TYPE_ERROR (2^15 + 1)"
ERROR_CHUNK_BODY = struct.Struct(">IH")  # 32 bits error, 16 bits message length

# commands: "NBD_CMD_READ (0)" ... "NBD_CMD_BLOCK_STATUS (7)"
CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7
CMD_FLAG_FUA = 1 << 0  # "bit 0, NBD_CMD_FLAG_FUA"
CMD_FLAG_NO_HOLE = 1 << 1  # "bit 1, NBD_CMD_FLAG_NO_HOLE"
CMD_FLAG_FAST_ZERO = 1 << 4  # "bit 4, NBD_CMD_FLAG_FAST_ZERO"

# "Error values": NBD_EPERM (1), NBD_EIO (5), NBD_EINVAL (22), NBD_ENOSPC (28)
EPERM = 1
EIO = 5
EINVAL = 22
ENOSPC = 28
