"""Each tenant's data key: made on first use, wrapped by the newest master key, unwrapped on
demand and kept in memory; moved to a newer master key by `tally reencrypt`; destroyed by
`tally tenants shred`.

The store holds only wrapped data keys; the keyring holds the master keys. Shredding deletes
the wrapped key, so every copy of the tenant's sealed data is unreadable from then on. Which
tenants are shredded is read from the store with the tenant (IngestService keeps that copy for
at most TALLY_CACHE_SECONDS, freshness.py), so a shred done by another process takes effect
within that bound, and at once through this one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import datetime

from tally.crypto import sealing
from tally.crypto.keyring import Keyring, KeyringError, KeyringSource
from tally.crypto.records import DataKey
from tally.crypto.sealing import SealBroken, TenantCipher
from tally.registry.audit import AuditEntry
from tally.store.interface import TenantKeyStore

CACHE_SIZE = 10_000


class TenantKeys:
    def __init__(
        self, *, store: TenantKeyStore, keyring: KeyringSource, clock: Callable[[], datetime]
    ) -> None:
        self._store = store
        self._source = keyring
        self._clock = clock
        # Keyed by the wrapped bytes too: a rewrapped key is a new entry, a shredded one has
        # none, so the cache can never answer for a key the store no longer holds. A plain
        # dict without a lock (its get and set are atomic): a lock taken per request makes
        # threads queue for the GIL under load.
        self._cache: dict[tuple[str, bytes], TenantCipher] = {}

    @property
    def keyring(self) -> Keyring:
        return self._source.current()

    def ciphers(self, keys: Mapping[str, DataKey | None]) -> dict[str, TenantCipher | None]:
        """A cipher for each tenant of `keys` (its data key as just read from the store with
        the tenant, `DataKeys.tenants_with_keys`), None for a shredded tenant.

        A tenant without a data key gets one now, wrapped with the newest master key; when
        two processes race to make it, both use the one stored first. Raises SealBroken if a
        data key does not open with this keyring, StoreUnavailable if the store is down.
        """
        return {
            tenant: self._cipher(key or self._store.add_data_key(self._new_key(tenant)))
            for tenant, key in keys.items()
        }

    def ciphers_of(self, tenants: Iterable[str]) -> dict[str, TenantCipher | None]:
        """`ciphers` for registered `tenants`, read from the store now."""
        found = self._store.tenants_with_keys(sorted(set(tenants)))
        return self.ciphers({tenant: key for tenant, (_, key) in found.items()})

    def verify(self) -> None:
        """Check that this keyring opens the store's data keys (one per master key in use).

        Raises KeyringError saying what to set when it does not, so a server with the wrong
        keyring stops at start-up instead of failing every request (or sealing new data under
        keys nobody else can open).
        """
        keyring = self._source.current()
        for record in self._store.sample_data_keys():
            assert record.master_key_id is not None  # noqa: S101 - samples are never shredded
            master = keyring.get(record.master_key_id)
            if master is None:
                raise KeyringError(
                    f"The store holds data keys wrapped by master key '{record.master_key_id}', "
                    f"which keyring {keyring.source} does not have: set TALLY_KEYRING to "
                    "the keyring this store was created with (old master keys must stay in it "
                    "until 'tally reencrypt' has moved every data key off them)."
                )
            try:
                self._unwrap(record)
            except SealBroken:
                raise KeyringError(
                    f"Master key '{master.id}' in keyring {keyring.source} does not open "
                    "this store's data keys: it is not the keyring this store was created with."
                ) from None

    def pending(self) -> dict[str, int]:
        """Master key id -> how many live data keys are still wrapped by an older key."""
        usage = self._store.data_key_usage()
        return {key: count for key, count in usage.items() if key != self.keyring.newest.id}

    def rewrap(self, *, limit: int, audit: Callable[[int], AuditEntry] | None = None) -> int:
        """Move up to `limit` data keys to the newest master key; returns how many moved
        (0: none is left). Each key moves in its own compare-and-set, so this is safe beside
        running servers and resumable after any interruption.
        """
        newest = self.keyring.newest
        moved = 0
        for record in self._store.data_keys_to_rewrap(newest.id, limit=limit):
            assert record.wrapped is not None  # noqa: S101 - shredded keys are not listed
            data_key = self._unwrap(record)
            wrapped = sealing.wrap(newest, tenant=record.tenant, data_key=data_key)
            if self._store.rewrap_data_key(
                record.tenant,
                expected_master=record.master_key_id or "",
                master_key_id=newest.id,
                wrapped=wrapped,
                at=self._clock(),
            ):
                moved += 1
        if moved and audit is not None:
            self._store.record_audit(audit(moved))
        return moved

    def _new_key(self, tenant: str) -> DataKey:
        newest = self.keyring.newest
        return DataKey(
            tenant=tenant,
            master_key_id=newest.id,
            wrapped=sealing.wrap(newest, tenant=tenant, data_key=sealing.new_data_key()),
            created_at=self._clock(),
            shredded_at=None,
        )

    def _cipher(self, record: DataKey) -> TenantCipher | None:
        if record.wrapped is None:
            return None
        entry = (record.tenant, record.wrapped)
        cipher = self._cache.get(entry)
        if cipher is None:
            cipher = TenantCipher(record.tenant, self._unwrap(record))
            if len(self._cache) >= CACHE_SIZE:  # rare: more live tenants than it holds
                self._cache.clear()
            self._cache[entry] = cipher
        return cipher

    def _unwrap(self, record: DataKey) -> bytes:
        assert record.wrapped is not None  # noqa: S101 - callers pass live keys only
        key_id = record.master_key_id or ""
        master = self._source.current().get(key_id) or self._source.refresh().get(key_id)
        if master is None:
            raise SealBroken("A data key is wrapped by a master key this keyring does not hold.")
        return sealing.unwrap(master, tenant=record.tenant, wrapped=record.wrapped)
