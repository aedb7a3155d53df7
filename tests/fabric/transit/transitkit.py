"""What the transit tests share besides fixtures (a module of its own: several folders
have a conftest, and ``from conftest import`` would get whichever was imported first)."""

from __future__ import annotations

from cryptoplane.fabric.keytypes import KeyType

TENANT = "t1"
ALL_TYPES = list(KeyType)
AEAD_TYPES = [KeyType.AES256_GCM, KeyType.CHACHA20_POLY1305]
SIGNING_TYPES = [KeyType.RSA_2048, KeyType.RSA_3072, KeyType.RSA_4096,
                 KeyType.ECDSA_P256, KeyType.ECDSA_P384, KeyType.ED25519]
