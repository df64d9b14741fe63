"""A round's Shamir shares: dealt and sealed by each member, opened by its holders, checked and
combined by the backend.

Each member deals shares of two secrets to its holders (itself and its neighbours): its mask key
(``"s"``) and its self-mask seed (``"b"``). A holder's two shares are sealed under a key agreed
with that holder, bound to the round and both share indices; the member publishes the digest of
every share, so the backend can check a share sent back to it on its own.
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Tuple

from openfl_api.transforms import crypto
from openfl_api.transforms.secagg.board import b64, unb64
from openfl_api.transforms.secagg.masking import share_context, share_info

__all__ = ["deal", "open_share", "checked", "combine"]


def _aad(run: str, round_id: str, dealer: int, holder: int) -> bytes:
    return f"{run}|{round_id}|{dealer}|{holder}".encode()


def deal(agreement: crypto.KeyPair, mask_key: crypto.KeyPair, seed: bytes, dealer: int,
         holders: Mapping[str, Tuple[int, str]], t: int, run: str,
         round_id: str) -> Tuple[Dict[str, str], Dict[str, Dict[str, str]]]:
    """Shares of ``mask_key`` and ``seed`` for each holder, any ``t`` of which rebuild them.

    Args:
        agreement: the dealer's key pair for sealing shares.
        mask_key: the dealer's key pair for pairwise masks (its private key is shared).
        seed: the dealer's self-mask seed.
        dealer: the dealer's share index.
        holders: holder -> (share index, its advertised sealing public key, base64).

    Returns:
        ``(sealed, digests)``: per holder, its two shares sealed for it (base64), and the digests
        of its ``"s"`` and ``"b"`` shares.
    """
    xs = [x for x, _ in holders.values()]
    s_shares = crypto.split(mask_key.private, xs, t)
    b_shares = crypto.split(seed, xs, t)
    sealed: Dict[str, str] = {}
    digests: Dict[str, Dict[str, str]] = {}
    for holder, (x, public) in holders.items():
        key = crypto.derive(agreement.agree(unb64(public)), share_info(run, round_id, dealer, x))
        sealed[holder] = b64(crypto.seal(key, s_shares[x] + b_shares[x], _aad(run, round_id, dealer, x)))
        digests[holder] = {
            "s": crypto.share_digest(share_context(run, round_id, dealer, x, "s"), s_shares[x]),
            "b": crypto.share_digest(share_context(run, round_id, dealer, x, "b"), b_shares[x]),
        }
    return sealed, digests


def open_share(agreement: crypto.KeyPair, dealer_public: str, text: Any, dealer: int, holder: int, run: str,
               round_id: str) -> Optional[Tuple[bytes, bytes]]:
    """The ``(mask-key share, seed share)`` that the dealer with share index ``dealer`` and
    sealing key ``dealer_public`` sealed for ``holder``; None if it fails authentication."""
    key = crypto.derive(agreement.agree(unb64(dealer_public)), share_info(run, round_id, dealer, holder))
    try:
        plain = crypto.open_sealed(key, unb64(text), _aad(run, round_id, dealer, holder))
    except Exception:  # cryptography's InvalidTag, or garbage that is no ciphertext
        return None
    return plain[:crypto.SHARE_BYTES], plain[crypto.SHARE_BYTES:]


def checked(returned: Mapping[str, Mapping[str, Any]], dealer: str, which: str, x_of: Mapping[str, int],
            digests: Mapping[str, Any], run: str, round_id: str) -> Tuple[Dict[int, bytes], List[str]]:
    """The shares of ``dealer``'s secret ``which`` that holders sent back (``returned``: holder ->
    its unmask value) and that match the dealer's ``digests``, by holder index; and, in order, the
    holders whose share does not match."""
    valid: Dict[int, bytes] = {}
    bad: List[str] = []
    for holder, value in returned.items():
        text = value.get(which, {}).get(dealer)
        if text is None:
            continue
        try:
            share = bytes.fromhex(text)
        except (TypeError, ValueError):
            share = b""
        context = share_context(run, round_id, x_of[dealer], x_of[holder], which)
        expected = digests.get(holder, {}).get(which)
        if len(share) != crypto.SHARE_BYTES or expected is None or crypto.share_digest(context, share) != expected:
            bad.append(holder)
            continue
        valid[x_of[holder]] = share
    return valid, bad


def combine(shares: Mapping[int, bytes], t: int) -> Optional[bytes]:
    """The secret that the first ``t`` of ``shares`` give; None when they give no 32-byte secret
    (a dealer that dealt shares of no secret, with digests to match)."""
    try:
        return crypto.combine(dict(list(shares.items())[:t]))
    except ValueError:
        return None
