"""Transit: Vault transit's operations (encrypt, decrypt, rewrap, data keys, sign,
verify, HMAC, digests, random; key create/import/rotate/config/trim/export) over a plane
and a tenant keystore.

    source.py    the KeySource protocol, the rules every source enforces, MemoryKeySource
    blobs.py     the binary framing of ciphertexts, signatures and HMAC tags
    material.py  key material per type, import checks, BYOK wrapping
    keyring.py   the per-key cache of plane Keys per version, derived keys
    signing.py   signature schemes and which of them the plane runs
    manage.py    key management (KeyAdmin)
    service.py   Transit: the data operations
    batch.py     batch_input: per-item results and errors
"""

from __future__ import annotations

from .blobs import (
    CIPHERTEXT_OVERHEAD,
    ciphertext_version,
    pack_ciphertext,
    pack_signature,
    pack_tag,
    parse_ciphertext,
    parse_signature,
    parse_tag,
)
from .keyring import derive
from .material import wrap_for_import
from .service import Transit
from .source import KeySource, MemoryKeySource, Use

__all__ = [
    "CIPHERTEXT_OVERHEAD",
    "KeySource",
    "MemoryKeySource",
    "Transit",
    "Use",
    "ciphertext_version",
    "derive",
    "pack_ciphertext",
    "pack_signature",
    "pack_tag",
    "parse_ciphertext",
    "parse_signature",
    "parse_tag",
    "wrap_for_import",
]
