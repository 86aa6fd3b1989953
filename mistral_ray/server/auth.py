"""Bearer API keys, kept only as SHA-256 digests and compared in constant time, and the tenant each names.

The router never stores or logs a key: it keeps `{digest: key id}` and reports the id. A key file line is
`<key id>:<key>`, optionally followed by the key's tenant attributes (`tier=<name> weight=<w> rpm=<n>
tpm=<n>`); a key id on several lines (a key being rotated) is one tenant.
"""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Mapping, Optional


@dataclass(frozen=True)
class Tenant:
    """Who a request's key belongs to, as fairness and limits see it."""

    key_id: str
    tier: str
    priority: int  # the tier's: lower runs first
    weight: float = 1.0  # its share of a busy replica relative to other keys
    rpm: Optional[int] = None  # its own requests/min and tokens/min, replacing router.limits'
    tpm: Optional[int] = None

    @property
    def limited(self) -> Optional[tuple[Optional[int], Optional[int]]]:
        """Its own (rpm, tpm), or None: the application's defaults."""
        return (self.rpm, self.tpm) if self.rpm or self.tpm else None


def _number(key_id: str, name: str, text: str, kind):
    try:
        value = kind(text)
    except ValueError:
        value = None
    low, high = (0.001, 1000.0) if kind is float else (1, 10 ** 12)
    if value is None or not low <= value <= high:
        raise ValueError(f"API key {key_id!r}: {name} must be a number from {low:g} to {high:g} (got {text[:20]!r})")
    return value


def tenant_of(key_id: str, attributes: list[str], tiers: Mapping[str, int], default_tier: str) -> Tenant:
    """The tenant a key file line's attributes describe; names the key id (never the key) when wrong."""
    seen: dict[str, str] = {}
    for attribute in attributes:
        name, sep, value = attribute.partition("=")
        if not sep:  # maybe part of a key with a space in it: never shown
            raise ValueError(f"API key {key_id!r}: after the key only `name=value` attributes may follow (the "
                             "rest of the line is not shown)")
        if name not in ("tier", "weight", "rpm", "tpm") or name in seen:
            raise ValueError(f"API key {key_id!r}: {name[:20]!r} is not an attribute (tier=, weight=, rpm=, tpm=, "
                             "each once)")
        seen[name] = value
    tier = seen.get("tier", default_tier)
    if tier not in tiers:
        raise ValueError(f"API key {key_id!r}: tier {tier!r} is not one of router.tenants.tiers ({', '.join(tiers)})")
    return Tenant(key_id, tier, tiers[tier],
                  weight=_number(key_id, "weight", seen["weight"], float) if "weight" in seen else 1.0,
                  rpm=_number(key_id, "rpm", seen["rpm"], int) if "rpm" in seen else None,
                  tpm=_number(key_id, "tpm", seen["tpm"], int) if "tpm" in seen else None)


class ApiKeys:
    def __init__(self, entries: list[str], tiers: Optional[Mapping[str, int]] = None,
                 default_tier: str = "standard"):
        tiers = tiers if tiers is not None else {default_tier: 0}
        self._keys: list[tuple[bytes, str]] = []
        self.tenants: dict[str, Tenant] = {}
        for entry in entries:
            key_id, sep, rest = entry.partition(":")
            key, *attributes = rest.split() or [""]
            if not sep or not key_id.strip() or not key:
                raise ValueError("API key entries must be `<key id>:<key>` (the entry is not shown)")
            key_id = key_id.strip()
            tenant = tenant_of(key_id, attributes, tiers, default_tier)
            if self.tenants.setdefault(key_id, tenant) != tenant:
                raise ValueError(f"API key {key_id!r}: its lines give it different attributes")
            self._keys.append((_digest(key), key_id))
        if not self._keys:
            raise ValueError("API keys are enabled but none were found (router.api_keys.file / env)")

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def ids(self) -> tuple[str, ...]:
        """The key ids, in the key file's order (no keys)."""
        return tuple(self.tenants)

    def identify(self, authorization: Optional[str]) -> Optional[str]:
        """The key id for an `Authorization: Bearer <key>` header, or None. Every stored digest is
        compared, with hmac.compare_digest, so timing does not tell which key (or how much) matched."""
        if not authorization:
            return None
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return None
        digest = _digest(presented.strip())
        found = None
        for stored, key_id in self._keys:
            if hmac.compare_digest(stored, digest):
                found = key_id
        return found


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()
