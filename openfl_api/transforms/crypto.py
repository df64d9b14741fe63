"""The cryptography of secure aggregation, from the ``cryptography`` package: X25519 key agreement,
HKDF-SHA256, AES-128-CTR as the mask generator, AES-256-GCM for shares, and Shamir's secret
sharing of 32-byte secrets over the prime field of ``p = 2**256 + 297``.

Every derived key names its purpose, run, round and the two parties in HKDF's ``info``, so no
key serves two streams; that makes the all-zero CTR nonce safe.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from typing import Dict, List, Sequence, Tuple

import numpy as np

from openfl_api.errors import ConfigurationError

__all__ = ["PRIME", "KeyPair", "derive", "mask", "seal", "open_sealed", "split", "combine", "share_digest",
           "mac", "check_mac", "require"]

#: The smallest prime above 2**256: every 32-byte secret is an element of its field.
PRIME = 2**256 + 297
SHARE_BYTES = 33


def require() -> None:
    """Raise ConfigurationError unless ``cryptography`` can be imported."""
    try:
        import cryptography  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the environment
        raise ConfigurationError("SecAgg needs the cryptography package: pip install 'cryptography>=41' (a requirement of openfl_api)") from None


class KeyPair:
    """An X25519 key pair: ``public`` is the 32 raw bytes to advertise."""

    def __init__(self, private: bytes = b"") -> None:
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

        self._key = X25519PrivateKey.from_private_bytes(private) if private else X25519PrivateKey.generate()
        self.private = self._key.private_bytes_raw()
        self.public = self._key.public_key().public_bytes_raw()

    def agree(self, public: bytes) -> bytes:
        """The shared secret with the holder of ``public``."""
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

        return self._key.exchange(X25519PublicKey.from_public_bytes(public))


def derive(secret: bytes, info: str) -> bytes:
    """32 bytes from HKDF-SHA256 of ``secret`` for the purpose named by ``info``."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info.encode("utf-8")).derive(secret)


def mask(seed: bytes, size: int) -> np.ndarray:
    """The mask of ``size`` uint32 words that ``seed`` expands to: the AES-128-CTR keystream."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    global _zeros
    out = np.empty(size, dtype=np.uint32)
    if len(_zeros) < 4 * size:
        _zeros = bytes(4 * size)  # the keystream is the encryption of zeros; kept for the next mask
    encryptor = Cipher(algorithms.AES(seed[:16]), modes.CTR(bytes(16))).encryptor()
    encryptor.update_into(memoryview(_zeros)[:4 * size], out.view(np.uint8))
    return out


_zeros = b""


def seal(key: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM: a random 12-byte nonce followed by the ciphertext and its tag."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = os.urandom(12)
    return nonce + AESGCM(key).encrypt(nonce, plaintext, aad)


def open_sealed(key: bytes, sealed: bytes, aad: bytes) -> bytes:
    """Undo :func:`seal`; raise ``cryptography.exceptions.InvalidTag`` for a wrong key or altered bytes."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    return AESGCM(key).decrypt(sealed[:12], sealed[12:], aad)


def split(secret: bytes, holders: Sequence[int], threshold: int) -> Dict[int, bytes]:
    """Shamir shares of a 32-byte ``secret``: any ``threshold`` of them give it back, fewer say nothing.

    Args:
        holders: the x coordinates of the share holders, distinct ints >= 1.
    """
    coefficients = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)]
    shares = {}
    for x in holders:
        y = 0
        for c in reversed(coefficients):
            y = (y * x + c) % PRIME
        shares[x] = y.to_bytes(SHARE_BYTES, "big")
    return shares


def combine(shares: Dict[int, bytes]) -> bytes:
    """The secret of which ``shares`` (x -> share) are at least the threshold many (Lagrange at 0)."""
    points: List[Tuple[int, int]] = [(x, int.from_bytes(y, "big")) for x, y in shares.items()]
    secret = 0
    for j, (xj, yj) in enumerate(points):
        num, den = 1, 1
        for m, (xm, _) in enumerate(points):
            if m != j:
                num = num * xm % PRIME
                den = den * (xm - xj) % PRIME
        secret = (secret + yj * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2**256:
        raise ValueError("the shares do not combine to a 32-byte secret")
    return secret.to_bytes(32, "big")


def share_digest(context: str, share: bytes) -> str:
    """The SHA-256 a dealer publishes for one share, so the backend can check that share alone."""
    return hashlib.sha256(context.encode("utf-8") + b"|" + share).hexdigest()


def mac(token: bytes, key: str, value: bytes) -> str:
    """HMAC-SHA256 of a store value under the admission token, bound to its key."""
    return hmac.new(token, key.encode("utf-8") + b"|" + value, hashlib.sha256).hexdigest()


def check_mac(token: bytes, key: str, value: bytes, tag: str) -> bool:
    return hmac.compare_digest(mac(token, key, value), tag)
