"""Crypto over the network: a server that runs a plane for remote clients, its wire
protocol, the tenant keystore, and the client and ``remote`` engine that reach it.

    codec.py      the wire protocol, sans-I/O (docs/wire-protocol.md)
    errors.py     the fabric's typed errors and their one-to-one wire statuses
    keytypes.py   key types, policies and key records shared by keystore and transit
    keystore/     named, versioned keys per tenant, wrapped under a master key
    transit/      the operations (encrypt, sign, rewrap, data keys...) over a keyring
    server.py     the asyncio server
    client.py     the pipelined client (sync and asyncio); remote.py: the engine
"""

from .client import AsyncClient
from .client_sync import Client

__all__ = ["AsyncClient", "Client"]
