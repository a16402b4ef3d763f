"""Encryption of forget data at rest and keyed hashes of identifiers.

One master key (settings.data_encryption_key) is split with HKDF into an AES-256-GCM
key and an HMAC key, so the same secret is never used for two purposes. Ciphertexts
carry a version byte and are bound to their row by the associated data (a ciphertext
copied into another row does not decrypt).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from functools import lru_cache
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from service.config import get_settings

_VERSION = b"\x01"
_NONCE_BYTES = 12


def canonical_json(value: Any) -> bytes:
    """Stable serialisation for hashing: sorted keys, no whitespace, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class DecryptionError(Exception):
    pass


def _derive(master: bytes, purpose: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(master)


class DataCipher:
    def __init__(self, master_key: bytes) -> None:
        self._aead = AESGCM(_derive(master_key, b"unlearn/forget-data/aes-gcm"))
        self._hmac_key = _derive(master_key, b"unlearn/identifiers/hmac")

    def encrypt(self, plaintext: bytes, *, bound_to: str) -> bytes:
        nonce = os.urandom(_NONCE_BYTES)
        return _VERSION + nonce + self._aead.encrypt(nonce, plaintext, bound_to.encode())

    def decrypt(self, blob: bytes, *, bound_to: str) -> bytes:
        if blob[:1] != _VERSION:
            raise DecryptionError("unknown ciphertext version")
        nonce, body = blob[1 : 1 + _NONCE_BYTES], blob[1 + _NONCE_BYTES :]
        try:
            return self._aead.decrypt(nonce, body, bound_to.encode())
        except InvalidTag as exc:
            raise DecryptionError("ciphertext does not match key or row") from exc

    def encrypt_json(self, value: Any, *, bound_to: str) -> bytes:
        return self.encrypt(canonical_json(value), bound_to=bound_to)

    def decrypt_json(self, blob: bytes, *, bound_to: str) -> Any:
        return json.loads(self.decrypt(blob, bound_to=bound_to))

    def keyed_hash(self, value: str) -> str:
        """HMAC-SHA256 of an identifier: comparable, not reversible without the key."""
        return hmac.new(self._hmac_key, value.encode(), hashlib.sha256).hexdigest()


@lru_cache
def get_cipher() -> DataCipher:
    return DataCipher(get_settings().encryption_key_bytes)


def salted_item_hashes(items: list[dict[str, Any]], salt: bytes) -> list[str]:
    """Per-item SHA-256 over salt + canonical JSON: lets a client check which items a
    request holds without the service ever returning them."""
    return [sha256_hex(salt + canonical_json(item)) for item in items]
