"""AES-256-GCM sealing: values open only for their own tenant, event and key."""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
from decimal import Decimal

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hypothesis import given
from hypothesis import strategies as st

from tally.crypto import sealing
from tally.crypto.keyring import MasterKey
from tally.crypto.sealing import Hmac, SealBroken, TenantCipher
from tally.events.model import canonical_json, canonical_value

KEY = bytes(range(32))


def cipher(tenant: str = "acme", key: bytes = KEY) -> TenantCipher:
    return TenantCipher(tenant, key)


@given(st.text(max_size=300))
def test_attributes_round_trip_and_never_appear_in_the_sealed_bytes(text: str) -> None:
    sealed = cipher().seal(application="vm", event_id="e1", attributes_json=text)
    assert cipher().open(application="vm", event_id="e1", sealed=sealed) == text
    if len(text) >= 8:
        assert text.encode() not in sealed
    assert sealed[:1] == sealing.VERSION


def test_sealing_twice_gives_different_bytes() -> None:
    one = cipher().seal(application="vm", event_id="e1", attributes_json="{}")
    two = cipher().seal(application="vm", event_id="e1", attributes_json="{}")
    assert one != two


@pytest.mark.parametrize(
    ("tenant", "application", "event_id"),
    [("globex", "vm", "e1"), ("acme", "db", "e1"), ("acme", "vm", "e2"), ("acm", "evm", "e1")],
)
def test_a_sealed_value_opens_only_for_its_own_row(
    tenant: str, application: str, event_id: str
) -> None:
    sealed = cipher().seal(application="vm", event_id="e1", attributes_json='{"a":1}')
    with pytest.raises(SealBroken):
        cipher(tenant).open(application=application, event_id=event_id, sealed=sealed)


def test_a_flipped_bit_or_another_key_does_not_open() -> None:
    sealed = bytearray(cipher().seal(application="vm", event_id="e1", attributes_json="{}"))
    sealed[-1] ^= 1
    with pytest.raises(SealBroken):
        cipher().open(application="vm", event_id="e1", sealed=bytes(sealed))
    good = cipher().seal(application="vm", event_id="e1", attributes_json="{}")
    with pytest.raises(SealBroken):
        cipher(key=bytes(32)).open(application="vm", event_id="e1", sealed=good)
    with pytest.raises(SealBroken, match="format"):
        cipher().open(application="vm", event_id="e1", sealed=b"\x02" + good[1:])


def test_plaintext_from_before_encryption_at_rest_still_reads() -> None:
    assert cipher().open(application="vm", event_id="e1", sealed=b'{"a":1}') == '{"a":1}'


def test_a_wrapped_data_key_opens_only_with_its_master_key_and_tenant() -> None:
    master = MasterKey("mk-1", bytes(32))
    wrapped = sealing.wrap(master, tenant="acme", data_key=KEY)
    assert sealing.unwrap(master, tenant="acme", wrapped=wrapped) == KEY
    with pytest.raises(SealBroken):
        sealing.unwrap(master, tenant="globex", wrapped=wrapped)
    with pytest.raises(SealBroken):
        sealing.unwrap(MasterKey("mk-1", KEY), tenant="acme", wrapped=wrapped)
    with pytest.raises(SealBroken):
        sealing.unwrap(MasterKey("mk-2", bytes(32)), tenant="acme", wrapped=wrapped)


def test_digests_are_keyed_by_the_tenant_key() -> None:
    content = b'{"tenant":"acme"}'
    assert cipher().digest(content) == cipher().digest(content)
    assert cipher().digest(content) != cipher(key=bytes(32)).digest(content)
    assert cipher().digest(content) != hashlib.sha256(content).digest()


@given(st.binary(max_size=200), st.binary(max_size=3000))
def test_the_hmac_is_rfc_2104_hmac_sha256(key: bytes, message: bytes) -> None:
    made = Hmac(key)
    assert made.digest(message) == hmac.digest(key, message, "sha256")
    assert made.digest(message) == hmac.digest(key, message, "sha256")  # its states kept


def test_digests_and_tokens_are_those_stored_before() -> None:
    """Stored digests and tokens are compared with those made at every retry and query: the
    way they are computed may change, never their values (HMAC-SHA256 under HKDF keys)."""

    def derived(info: bytes) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(KEY)

    content, token = derived(b"tally/content-digest/v1"), derived(b"tally/attribute-token/v1")
    assert cipher().digest(b"{}") == hmac.digest(content, b"{}", "sha256")
    assert (
        cipher().key_token("zone") == "k" + hmac.digest(token, b"key\x00zone", "sha256").hex()[:16]
    )
    assert (
        cipher().value_token("zone", '"a"')
        == hmac.digest(token, b'value\x00zone\x00"a"', "sha256").hex()[:32]
    )


def test_one_hmac_serves_threads_at_once() -> None:
    made, messages = Hmac(KEY), [os.urandom(64) for _ in range(200)]
    expected = [hmac.digest(KEY, m, "sha256") for m in messages]
    found: list[list[bytes]] = []

    def digest_all() -> None:
        found.append([made.digest(m) for _ in range(20) for m in messages][-200:])

    threads = [threading.Thread(target=digest_all) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert found == [expected] * 4


def test_nonces_never_repeat_across_blocks_threads_or_a_fork() -> None:
    nonces: list[bytes] = []

    def take(count: int) -> None:
        nonces.extend(sealing._nonces.take() for _ in range(count))

    threads = [threading.Thread(target=take, args=(3000,)) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(nonces)) == len(nonces) == 12_000  # several blocks' worth, four threads

    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # the child: report its first nonce and leave at once
        os.write(write, sealing._nonces.take())
        os._exit(0)
    os.close(write)
    os.waitpid(child, 0)
    from_child = os.read(read, 12)
    os.close(read)
    assert from_child != sealing._nonces.take()  # the child did not reuse the parent's block


def test_the_token_memo_answers_what_the_cipher_computes_and_stays_bounded() -> None:
    from tally.services.ingest import TokenMemo  # noqa: PLC0415 - the one test of the memo

    acme, globex = cipher("acme", sealing.new_data_key()), cipher("globex", sealing.new_data_key())
    memo = TokenMemo(max_entries=3, max_sets=3, max_shapes=3)
    values: list[object] = ["eu", "us", Decimal(1), True, Decimal(0), Decimal("-0"), "1"]
    for _ in range(2):  # computed, then remembered
        for tenant in (acme, globex):
            for value in values:
                attributes = {"region": value, "plan": "pro"}
                found = memo.tokenised(tenant, attributes)
                assert found.attributes_json == canonical_json(attributes)
                expected = {
                    tenant.key_token(key): tenant.value_token(key, canonical_value(item))
                    for key, item in attributes.items()
                }
                assert found.tokens == json.dumps(expected, sort_keys=True, separators=(",", ":"))
                assert sorted(found.values) == sorted(
                    (tenant.value_token(key, canonical_value(item)), canonical_value(item))
                    for key, item in attributes.items()
                )
                assert found.value_tokens == {token for token, _ in found.values}
    # Values Python holds equal are not one set to the memo: True is not 1, -0 is not 0.
    one, true = memo.tokenised(acme, {"a": Decimal(1)}), memo.tokenised(acme, {"a": True})
    assert (one.attributes_json, true.attributes_json) == ('{"a":1}', '{"a":true}')
    zero, minus = (
        memo.tokenised(acme, {"a": Decimal(0)}),
        memo.tokenised(acme, {"a": Decimal("-0")}),
    )
    assert zero.attributes_json != minus.attributes_json
    # Tenants never share a token, whatever the memo held before.
    assert memo.tokenised(acme, {"r": "eu"}).tokens != memo.tokenised(globex, {"r": "eu"}).tokens
    assert len(memo._sets) <= 3
    assert len(memo._pairs) <= 3
    assert len(memo._shapes) <= 3
    # A shape serves every tenant; their tokens stay their own.
    shared = TokenMemo()
    first, second = shared.tokenised(acme, {"r": "eu"}), shared.tokenised(globex, {"r": "eu"})
    assert len(shared._shapes) == 1 and len(shared._sets) == 2
    assert first.attributes_json == second.attributes_json and first.tokens != second.tokens
