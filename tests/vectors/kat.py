"""Known-answer checks through the plane API, shared by the tests and
``scripts/vector_report.py``.

One function per vector family turns a file into a ``Tally``. Every vector is judged by
the same rule (``judge``):

- ``valid``: the plane gives exactly the expected output, in both directions where the
  operation has two (encrypt and decrypt, mac and verify_mac);
- ``invalid``: the plane refuses it with a typed error (a ``cp.CryptoplaneError``);
- ``acceptable``: either, but when accepted the output must still be the expected one;
- unsupported by design (a tag, nonce or key size the API does not offer): counted under
  its reason, and the plane must still refuse it, whatever the vector's own verdict.

A foreign exception (``ValueError`` from ``cryptography``, ``TypeError``...) is always a
failure: every request ends in a value or a typed error.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from loaders import NistVector, WycheproofCase, load_nist, load_wycheproof

import cryptoplane as cp
from cryptoplane.kernels.digests import MIN_TAG_BYTES

Run = Callable[[], object]


class Wrong(AssertionError):
    """The plane returned, but not what the vector expects (or accepted what it must not)."""


def _show(b: bytes) -> str:
    h = bytes(b).hex()
    return h if len(h) <= 48 else f"{h[:40]}...({len(b)} bytes)"


def expect(got: Any, want: bytes, what: str) -> None:
    if got is None or bytes(got) != want:
        shown = "None" if got is None else _show(got)
        raise Wrong(f"{what}: got {shown}, expected {_show(want)}")


def differs(got: Any, forbidden: bytes, what: str) -> None:
    """For invalid vectors: the forward operation may run, but must not reproduce the
    rejected input (that would mean the plane itself produces what it refuses)."""
    if got is not None and bytes(got) == forbidden:
        raise Wrong(f"{what} reproduced the invalid vector's value")


def refused(fn: Run, what: str) -> Run:
    """``fn`` must end in a typed error; returning is ``Wrong``."""

    def run() -> None:
        try:
            fn()
        except cp.CryptoplaneError:
            return
        raise Wrong(f"{what} was accepted")

    return run


@dataclass
class Tally:
    """Counts for one file. Every vector lands in exactly one bucket (or in ``failed``)."""

    source: str
    name: str
    expected_total: int | None = None
    seen: int = 0
    valid: int = 0
    invalid_rejected: int = 0
    acceptable_accepted: int = 0
    acceptable_rejected: int = 0
    unsupported: Counter[tuple[str, str]] = field(default_factory=Counter)  # (reason, result)
    rejected_as: Counter[str] = field(default_factory=Counter)
    notes: Counter[str] = field(default_factory=Counter)
    failed: int = 0
    failures: list[str] = field(default_factory=list)

    def fail(self, ident: str, message: str) -> None:
        self.failures.append(f"{ident}: {message}")

    def finish(self) -> Tally:
        if self.expected_total is not None and self.seen != self.expected_total:
            self.fail("file", f"judged {self.seen} vectors, the file declares "
                      f"{self.expected_total}")
        return self

    @property
    def ok(self) -> bool:
        return not self.failures


class _Broken:
    """Sentinel: the attempt already recorded a failure."""


BROKEN = _Broken()


def _attempt(t: Tally, ident: str, fn: Run, what: str) -> cp.CryptoplaneError | _Broken | None:
    """None when ``fn`` returned, the typed error it raised, or BROKEN (recorded)."""
    try:
        fn()
    except cp.CryptoplaneError as e:
        return e
    except Wrong as e:
        t.fail(ident, f"{what}: {e}")
        return BROKEN
    except Exception as e:  # the point of the exercise: nothing foreign may escape
        t.fail(ident, f"{what}: foreign exception {type(e).__module__}.{type(e).__name__}: "
                      f"{e}")
        return BROKEN
    return None


def judge(t: Tally, ident: str, result: str, run: Run | None, *,
          unsupported: str | None = None, also: Run | None = None) -> None:
    """Judge one vector. ``run`` is the operation whose outcome the verdict is about (for
    valid vectors it also compares outputs); ``also`` is a second check that may pass or
    refuse but must never give a wrong value or a foreign exception."""
    t.seen += 1
    before = len(t.failures)
    outcome = _attempt(t, ident, run, "check") if run is not None else None
    if isinstance(outcome, _Broken):
        pass
    elif unsupported is not None:
        if run is not None and outcome is None:
            t.fail(ident, f"the API was expected to refuse this ({unsupported}) but it "
                          "accepted it: update the test's expectations")
        else:
            t.unsupported[unsupported, result] += 1
            if outcome is not None:
                t.rejected_as[type(outcome).__name__] += 1
    elif result == "valid":
        if outcome is None:
            t.valid += 1
        else:
            t.fail(ident, f"valid vector refused: {type(outcome).__name__}: {outcome}")
    elif result == "invalid":
        if outcome is None:
            t.fail(ident, "invalid vector accepted")
        else:
            t.invalid_rejected += 1
            t.rejected_as[type(outcome).__name__] += 1
    elif result == "acceptable":
        if outcome is None:
            t.acceptable_accepted += 1
        else:
            t.acceptable_rejected += 1
            t.rejected_as[type(outcome).__name__] += 1
    else:
        t.fail(ident, f"unknown result {result!r}")
    if also is not None:
        _attempt(t, ident, also, "cross-check")
    if len(t.failures) > before:
        t.failed += 1


# -- NIST CAVP and IEEE 1619 ---------------------------------------------------------------

def _nist_result(v: NistVector) -> str:
    return "invalid" if v.fail else "valid"


def _gcm(plane: cp.Plane, t: Tally, v: NistVector) -> None:
    key, iv, aad, ct, tag = (v.hex(n) for n in ("key", "iv", "aad", "ct", "tag"))
    pt = v.hex("pt") if "pt" in v.fields else None
    name = f"aes-{len(key) * 8}-gcm"
    alg = cp.lookup(name)
    assert alg.nonce_sizes is not None
    sealed = ct + tag

    def enc() -> bytes:
        return plane.encrypt(cp.Key(name, key), pt or b"", nonce=iv, aad=aad)

    def dec() -> bytes:
        return plane.decrypt(cp.Key(name, key), sealed, nonce=iv, aad=aad)

    if len(iv) not in alg.nonce_sizes:
        reason = f"IV outside {alg.nonce_sizes.describe()} bytes (the declared sizes)"
        judge(t, v.ident, _nist_result(v), dec, unsupported=reason,
              also=refused(enc, "encrypt") if pt is not None else None)
    elif len(tag) != alg.tag_size:
        also = None
        if pt is not None:
            def also() -> None:
                out = enc()
                expect(out[:-alg.tag_size], ct, "encrypt (ciphertext part)")
                expect(out[-alg.tag_size:][:len(tag)], tag, "encrypt (tag prefix)")
            t.notes["short tag checked as the prefix of the 16-byte tag"] += 1
        judge(t, v.ident, _nist_result(v), dec,
              unsupported="tag shorter than 16 bytes (the API returns ct||16-byte tag)",
              also=also)
    elif v.fail:
        judge(t, v.ident, "invalid", dec)
    else:
        assert pt is not None

        def run() -> None:
            expect(enc(), sealed, "encrypt")
            expect(dec(), pt, "decrypt")

        judge(t, v.ident, "valid", run)


def _block(mode: str) -> Callable[[cp.Plane, Tally, NistVector], None]:
    def check(plane: cp.Plane, t: Tally, v: NistVector) -> None:
        key, iv, pt, ct = (v.hex(n) for n in ("key", "iv", "plaintext", "ciphertext"))
        name = f"aes-{len(key) * 8}-{mode}"

        def run() -> None:
            k = cp.Key(name, key)
            expect(plane.encrypt(k, pt, nonce=iv), ct, "encrypt")
            expect(plane.decrypt(k, ct, nonce=iv), pt, "decrypt")

        judge(t, v.ident, _nist_result(v), run)

    return check


SECTOR_SIZES = (512, 4096)


def _xts(plane: cp.Plane, t: Tally, v: NistVector) -> None:
    key, pt, ct = v.hex("key"), v.hex("pt"), v.hex("ct")
    name = f"aes-{len(key) * 4}-xts"
    bits = int(v["dataunitlen"])
    seqno = int(v["dataunitseqnumber"]) if "dataunitseqnumber" in v.fields else None
    tweak = v.hex("i") if seqno is None else seqno.to_bytes(16, "little")
    if bits % 8:
        # the API speaks bytes; a data unit of 130 bits has no byte-string form
        judge(t, v.ident, "valid", None,
              unsupported="data unit not a whole number of bytes (the API speaks bytes)")
        return
    if key[: len(key) // 2] == key[len(key) // 2:]:
        judge(t, v.ident, "valid", lambda: cp.Key(name, key),
              unsupported="equal XTS key halves (refused by design)")
        return

    def run() -> None:
        k = cp.Key(name, key)
        if seqno is not None and len(pt) in SECTOR_SIZES:
            expect(plane.encrypt_sectors(k, pt, sector=seqno, sector_size=len(pt)), ct,
                   "encrypt_sectors")
            expect(plane.decrypt_sectors(k, ct, sector=seqno, sector_size=len(pt)), pt,
                   "decrypt_sectors")
        expect(plane.encrypt(k, pt, nonce=tweak), ct, "encrypt")
        expect(plane.decrypt(k, ct, nonce=tweak), pt, "decrypt")

    also = None
    if seqno is not None:
        n = len(pt)
        if n in SECTOR_SIZES:
            t.notes["data unit is a whole sector: also via encrypt_sectors"] += 1
        elif n % 16 == 0 and seqno < 1 << 64:
            # XTS enciphers each 16-byte block of a data unit on its own (stealing only
            # touches a partial last block), so a block-aligned data unit is the head of
            # a sector with the same sequence number: the sector kernel is checked too
            def also() -> None:
                k = cp.Key(name, key)
                for size in SECTOR_SIZES:
                    out = plane.encrypt_sectors(k, pt + bytes(size - n), sector=seqno,
                                                sector_size=size)
                    expect(out[:n], ct, f"encrypt_sectors({size}) head")
                    back = plane.decrypt_sectors(k, ct + bytes(size - n), sector=seqno,
                                                 sector_size=size)
                    expect(back[:n], pt, f"decrypt_sectors({size}) head")

            t.notes["block-aligned data unit: also as the head of a 512/4096-byte sector "
                    "(encrypt_sectors)"] += 1
        else:
            t.notes["data unit not block-aligned: encrypt with the 16-byte LE tweak only"] += 1
    judge(t, v.ident, "valid", run, also=also)


NistCheck = Callable[[cp.Plane, Tally, NistVector], None]


def _nist_files() -> dict[str, NistCheck]:
    files: dict[str, NistCheck] = {}
    for bits in (128, 192, 256):
        files[f"ciphers/AES/GCM/gcmEncryptExtIV{bits}.rsp"] = _gcm
        files[f"ciphers/AES/GCM/gcmDecrypt{bits}.rsp"] = _gcm
        files[f"ciphers/AES/CTR/aes-{bits}-ctr.txt"] = _block("ctr")
        for kind in ("GFSbox", "KeySbox", "MMT", "VarKey", "VarTxt"):
            files[f"ciphers/AES/CBC/CBC{kind}{bits}.rsp"] = _block("cbc")
    for tweak in ("tweak-128hexstr", "tweak-dataunitseqno"):
        for bits in (128, 256):
            files[f"ciphers/AES/XTS/{tweak}/XTSGenAES{bits}.rsp"] = _xts
    return files


NIST_FILES = _nist_files()


def check_nist(plane: cp.Plane, relpath: str) -> Tally:
    vectors = load_nist(relpath)
    t = Tally("NIST", relpath.removeprefix("ciphers/AES/"), expected_total=len(vectors))
    if not vectors:
        t.fail("file", "no vectors loaded")
    check = NIST_FILES[relpath]
    for v in vectors:
        check(plane, t, v)
    return t.finish()


# -- Wycheproof ------------------------------------------------------------------------------

WycheproofCheck = Callable[[cp.Plane, Tally, WycheproofCase], None]


def _wp_aead(family: str) -> WycheproofCheck:
    def check(plane: cp.Plane, t: Tally, c: WycheproofCase) -> None:
        g = c.group
        name = "chacha20-poly1305" if family == "chacha" else f"aes-{g['keySize']}-gcm"
        alg = cp.lookup(name)
        assert alg.nonce_sizes is not None
        key, iv, aad, msg, ct, tag = (c.hex(n) for n in ("key", "iv", "aad", "msg", "ct",
                                                         "tag"))
        sealed = ct + tag

        def enc() -> bytes:
            return plane.encrypt(cp.Key(name, key), msg, nonce=iv, aad=aad)

        def dec() -> bytes:
            return plane.decrypt(cp.Key(name, key), sealed, nonce=iv, aad=aad)

        if len(iv) not in alg.nonce_sizes:
            judge(t, c.ident, c.result, dec,
                  unsupported=f"nonce outside {alg.nonce_sizes.describe()} bytes (the declared "
                              "sizes)",
                  also=refused(enc, "encrypt"))
        elif len(tag) != alg.tag_size:
            judge(t, c.ident, c.result, dec,
                  unsupported="tag not 16 bytes (the API returns ct||16-byte tag)")
        elif c.result == "valid":
            def run() -> None:
                expect(enc(), sealed, "encrypt")
                expect(dec(), msg, "decrypt")

            judge(t, c.ident, "valid", run)
        else:
            judge(t, c.ident, c.result, dec,
                  also=lambda: differs(enc(), sealed, "encrypt"))

    return check


def _wp_cbc(plane: cp.Plane, t: Tally, c: WycheproofCase) -> None:
    name = f"aes-{c.group['keySize']}-cbc"
    key, iv, msg, ct = (c.hex(n) for n in ("key", "iv", "msg", "ct"))

    def enc() -> bytes:
        return plane.encrypt(cp.Key(name, key), msg, nonce=iv, padding=True)

    def dec() -> bytes:
        return plane.decrypt(cp.Key(name, key), ct, nonce=iv, padding=True)

    if c.result == "valid":
        def run() -> None:
            expect(enc(), ct, "encrypt")
            expect(dec(), msg, "decrypt")

        judge(t, c.ident, "valid", run)
    else:
        judge(t, c.ident, c.result, dec, also=lambda: differs(enc(), ct, "encrypt"))


def _wp_xts(plane: cp.Plane, t: Tally, c: WycheproofCase) -> None:
    key, iv, msg, ct = (c.hex(n) for n in ("key", "iv", "msg", "ct"))
    name = f"aes-{len(key) * 4}-xts"
    if name not in cp.algorithms.CATALOGUE:
        judge(t, c.ident, c.result, lambda: cp.Key(name, key),
              unsupported=f"{name.upper()} not in the catalogue")
        return
    # Wycheproof's XTS IV is the leading bytes of the tweak (a little-endian data-unit
    # number): shorter ones are zero-extended to the 16-byte tweak the API takes
    tweak = iv.ljust(16, b"\0")
    if len(iv) < 16:
        t.notes["IV shorter than 16 bytes: zero-extended to the tweak"] += 1

    def run() -> None:
        k = cp.Key(name, key)
        expect(plane.encrypt(k, msg, nonce=tweak), ct, "encrypt")
        expect(plane.decrypt(k, ct, nonce=tweak), msg, "decrypt")

    if c.result == "valid":
        judge(t, c.ident, "valid", run)
    else:
        judge(t, c.ident, c.result,
              lambda: plane.decrypt(cp.Key(name, key), ct, nonce=tweak))


_SHA = {"SHA-256": "sha256", "SHA-384": "sha384", "SHA-512": "sha512"}


def _wp_signature(name: str) -> WycheproofCheck:
    """Signature verification with the group's DER public key."""
    alg = cp.lookup(name)
    keys: dict[int, cp.Key] = {}

    def check(plane: cp.Plane, t: Tally, c: WycheproofCase) -> None:
        g = c.group
        msg, sig = c.hex("msg"), c.hex("sig")

        def key() -> cp.Key:
            k = keys.get(id(g))
            if k is None:
                k = keys[id(g)] = cp.Key.load_der(name, bytes.fromhex(g["publicKeyDer"]))
            return k

        def run() -> None:
            out = plane.verify(key(), msg, sig)  # type: ignore[func-returns-value]
            if out is not None:
                raise Wrong(f"verify returned {out!r}, not None")

        unsupported = None
        if "sha" in g and _SHA.get(g["sha"]) != alg.hash_name:
            unsupported = f"hash {g['sha']} (the algorithm fixes {alg.hash_name})"
        elif "mgfSha" in g and _SHA.get(g["mgfSha"]) != alg.hash_name:
            unsupported = f"MGF1 hash {g['mgfSha']} (the algorithm fixes {alg.hash_name})"
        elif "sLen" in g and g["sLen"] != alg.digest_size:
            unsupported = f"PSS salt of {g['sLen']} bytes (the algorithm fixes " \
                          f"{alg.digest_size})"
        elif alg.key_bits is not None and g.get("keySize", 2048) < alg.key_bits.min:
            unsupported = f"RSA key below {alg.key_bits.min} bits"
        judge(t, c.ident, c.result, run, unsupported=unsupported)

    return check


def _wp_oaep() -> WycheproofCheck:
    keys: dict[int, cp.Key] = {}  # loading an RSA private key checks it: ~10 ms
    name = "rsa-oaep-sha256"

    def check(plane: cp.Plane, t: Tally, c: WycheproofCase) -> None:
        g = c.group

        def key() -> cp.Key:
            k = keys.get(id(g))
            if k is None:
                k = keys[id(g)] = cp.Key.load_der(name, bytes.fromhex(g["privateKeyPkcs8"]))
            return k

        _oaep_case(plane, t, c, key)

    return check


def _oaep_case(plane: cp.Plane, t: Tally, c: WycheproofCase, key: Callable[[], cp.Key]
               ) -> None:
    g = c.group
    msg, ct, label = c.hex("msg"), c.hex("ct"), c.hex("label")

    unsupported = None
    if _SHA.get(g["sha"]) != "sha256" or _SHA.get(g["mgfSha"]) != "sha256":
        unsupported = f"OAEP with {g['sha']}/MGF1-{g['mgfSha']} (the algorithm fixes SHA-256)"
    elif g["keySize"] < 2048:
        unsupported = "RSA key below 2048 bits"

    if c.result == "valid" and unsupported is None:
        def run() -> None:
            k = key()
            expect(plane.decrypt(k, ct, aad=label), msg, "decrypt")
            # the other direction: OAEP is randomised, so encrypt and decrypt back
            again = plane.encrypt(k.public_key(), msg, aad=label)
            expect(plane.decrypt(k, again, aad=label), msg, "encrypt then decrypt")

        judge(t, c.ident, "valid", run)
    else:
        judge(t, c.ident, c.result, lambda: plane.decrypt(key(), ct, aad=label),
              unsupported=unsupported)


def _wp_x25519(plane: cp.Plane, t: Tally, c: WycheproofCase) -> None:
    private, public, shared = c.hex("private"), c.hex("public"), c.hex("shared")
    unsupported = None
    if c.group.get("curve") != "curve25519":
        unsupported = f"curve {c.group.get('curve')}"

    def run() -> None:
        expect(plane.derive(cp.Key("x25519", private), public), shared, "derive")

    judge(t, c.ident, c.result, run, unsupported=unsupported)


def _wp_hkdf(plane: cp.Plane, t: Tally, c: WycheproofCase) -> None:
    ikm, salt, info, okm = (c.hex(n) for n in ("ikm", "salt", "info", "okm"))
    size = int(c.test["size"])

    def derive() -> bytes:
        return plane.derive(cp.Key("hkdf-sha256", ikm), length=size, salt=salt, info=info)

    if not ikm:
        judge(t, c.ident, c.result, derive, unsupported="empty IKM (zero-length key)")
    elif c.result == "valid":
        judge(t, c.ident, "valid", lambda: expect(derive(), okm, "derive"))
    else:
        judge(t, c.ident, c.result, derive)


def _wp_hmac(name: str) -> WycheproofCheck:
    def check(plane: cp.Plane, t: Tally, c: WycheproofCase) -> None:
        key, msg, tag = c.hex("key"), c.hex("msg"), c.hex("tag")

        def mac() -> bytes:
            return plane.mac(cp.Key(name, key), msg, tag_size=len(tag))

        def verify() -> None:
            out = plane.verify_mac(cp.Key(name, key), msg, tag)  # type: ignore[func-returns-value]
            if out is not None:
                raise Wrong(f"verify_mac returned {out!r}, not None")

        if not key:
            judge(t, c.ident, c.result, verify, unsupported="zero-length key")
        elif len(tag) < MIN_TAG_BYTES:
            judge(t, c.ident, c.result, verify,
                  unsupported=f"tag shorter than {MIN_TAG_BYTES} bytes",
                  also=refused(mac, "mac"))
        elif c.result == "valid":
            def run() -> None:
                expect(mac(), tag, "mac")
                verify()

            judge(t, c.ident, "valid", run)
        else:
            judge(t, c.ident, c.result, verify, also=lambda: differs(mac(), tag, "mac"))

    return check


WYCHEPROOF_FILES: dict[str, Callable[[], WycheproofCheck]] = {
    "aes_gcm_test.json": lambda: _wp_aead("gcm"),
    "aes_cbc_pkcs5_test.json": lambda: _wp_cbc,
    "aes_xts_test.json": lambda: _wp_xts,
    "chacha20_poly1305_test.json": lambda: _wp_aead("chacha"),
    "ecdsa_secp256r1_sha256_test.json": lambda: _wp_signature("ecdsa-p256-sha256"),
    "ecdsa_secp384r1_sha384_test.json": lambda: _wp_signature("ecdsa-p384-sha384"),
    "ed25519_test.json": lambda: _wp_signature("ed25519"),
    "rsa_pss_2048_sha256_mgf1_32_test.json": lambda: _wp_signature("rsa-pss-sha256"),
    "rsa_signature_2048_sha256_test.json": lambda: _wp_signature("rsa-pkcs1v15-sha256"),
    "rsa_oaep_2048_sha256_mgf1sha256_test.json": _wp_oaep,
    "x25519_test.json": lambda: _wp_x25519,
    "hkdf_sha256_test.json": lambda: _wp_hkdf,
    "hmac_sha256_test.json": lambda: _wp_hmac("hmac-sha256"),
    "hmac_sha512_test.json": lambda: _wp_hmac("hmac-sha512"),
}


def check_wycheproof(plane: cp.Plane, name: str) -> Tally:
    f = load_wycheproof(name)
    t = Tally("Wycheproof", name, expected_total=f.number_of_tests)
    check = WYCHEPROOF_FILES[name]()  # fresh per file: signature checks cache keys
    for c in f.cases:
        check(plane, t, c)
    return t.finish()


def all_checks() -> list[tuple[str, str]]:
    """(source, file) for every file the suite covers, in report order."""
    return ([("NIST", p) for p in NIST_FILES]
            + [("Wycheproof", n) for n in WYCHEPROOF_FILES])


def run_check(plane: cp.Plane, source: str, name: str) -> Tally:
    return check_nist(plane, name) if source == "NIST" else check_wycheproof(plane, name)


def unsupported_summary(t: Tally) -> list[str]:
    """One line per reason: ``2625 IV outside 8..128 bytes (1343 valid, 1282 invalid)``."""
    by_reason: dict[str, Counter[str]] = {}
    for (reason, result), n in t.unsupported.items():
        by_reason.setdefault(reason, Counter())[result] += n
    lines = []
    for reason, results in sorted(by_reason.items(), key=lambda kv: -kv[1].total()):
        split = ", ".join(f"{n} {r}" for r, n in sorted(results.items()))
        lines.append(f"{results.total()} {reason} ({split})")
    return lines


def failure_report(t: Tally, limit: int = 200) -> str:
    head = f"{t.source} {t.name}: {t.failed} failing vector(s)"
    lines = t.failures[:limit]
    more = len(t.failures) - len(lines)
    return "\n".join([head, *("  " + s for s in lines)]
                     + ([f"  ... and {more} more"] if more > 0 else []))
