"""NBD: the sans-I/O protocol codec and the asyncio server that exports block devices."""

from cryptoplane.nbd.codec import ExportInfo, ProtocolError, ServerConnection

__all__ = ["ExportInfo", "ProtocolError", "ServerConnection"]
