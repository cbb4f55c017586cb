#!/usr/bin/env python3
"""Independent decryptor of kmsfs encrypted directories (formats 1, 2 and 3).

Written from the format specification alone (man/kmsfs-format.5), not from
kmsfs's sources, to show that the page is enough for a stranger.

    kmsfs_decrypt.py CIPHERDIR [--key-file FILE] [--out DIR]
                     [--known-volumes FILE]

Prints a manifest on standard output, one JSON object per line, sorted by the
plaintext path bytes, for every entry below the top directory:

    {"path": hex, "type": "file"|"dir"|"symlink"|"other",
     "size": n, "sha256": hex,            (files)
     "target": hex,                       (symbolic links)
     "xattrs": {hex name: hex value}}     (files and directories)

Nothing is printed unless the whole volume decrypts and verifies.  Any
authentication failure or malformed structure ends the run with exit status 1
and one line on standard error naming the path and the reason.  With --out DIR
the decrypted tree is also written there (each file is written under a
temporary name and renamed only once all its chunks verified; on a failure the
run stops, and DIR holds only what verified before it).

Empty files: a file whose header has flag bit 0 (format 3 volumes only) keeps
as the body of an empty file the 16-byte empty-file marker made with the
volume key; its backing size H..H+15, or a 16-byte body that is not its
marker, is damaged.  A file without the flag is empty when its body is empty.

Name binding: in a volume whose config has nameBinding "xattr" or
"xattr+symlinks", every regular file and directory but the top, reached by
backing name B in the directory whose ID is D, must carry tag(D, node ID, B)
among the 16-byte tags of its backing attribute user.kmsfs.names; otherwise
the run fails.  With "xattr+symlinks" a symbolic link's stored target is
base64url(I || sealed X) with I || D || B appended to its associated data (I:
the 16-byte link ID), so a link under another name fails.  That attribute
is kmsfs's own in every volume with encrypted names and never reported.

An interrupted rotation (kmsfs.conf.rewrap-journal at the top) is applied in
memory, never to CIPHERDIR: the file it names is read as if the journal's step
had been redone (its new header over the first bytes, or the contents of
kmsfs.conf.rewrap-copy).  A journal that is not valid JSON (a leftover), of
kind "copy" whose copy is missing (already applied), or naming a file that no
longer exists (done), is ignored; one that is valid JSON but not of the
journal's form is refused.

Config members: unknown members are ignored (as kmsfs does); a repeated
member and a number with a fraction (4096.0) are refused, which the page
allows a reader ("A reader may refuse all three").  A null endpoint is absent.

Only the local key provider is supported (AWS KMS would need the network).
--key-file may be repeated (a volume whose rotation was interrupted needs the
old key for the config's volume key and the new one for files already moved).
The key file defaults to the config's keyFile, else
$XDG_CONFIG_HOME/kmsfs/keys/VOLUME-ID.key.
Needs Python 3 and the `cryptography` package (AESGCM, AESSIV, HKDF, HMAC).
"""

import argparse
import base64
import binascii
import errno
import hashlib
import hmac
import json
import os
import stat
import string
import struct
import sys

try:
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM, AESSIV
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF
except ImportError as e:  # pragma: no cover
    sys.stderr.write("kmsfs_decrypt: needs the Python 'cryptography' package "
                     "with AESSIV (%s)\n" % e)
    sys.exit(1)

PROG = "kmsfs_decrypt"
MIN_CHUNK, MAX_CHUNK = 4096, 1048576
MAX_HEADER = 1048576
MIN_HEADER = 99
TAG = 16
NONCE = 12
OVERHEAD = NONCE + TAG  # 28
FLAG_EMPTY_MARKER = 0x0001  # header flag bit 0 (format 3)
MARKER_LEN = 16
B64URL_ALPHABET = frozenset(
    (string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_")
    .encode())


# ---------------------------------------------------------------------------
# Errors and small helpers
# ---------------------------------------------------------------------------

class Fail(Exception):
    """A failure to report: where (a plaintext or backing path) and why."""

    def __init__(self, where, reason):
        super().__init__(reason)
        self.where = where
        self.reason = reason


def show(b):
    """One-line printable form of arbitrary path bytes (never raises)."""
    if isinstance(b, str):
        b = os.fsencode(b)
    out = []
    for c in b:
        if 0x20 <= c < 0x7F and c != 0x5C:
            out.append(chr(c))
        else:
            out.append("\\x%02x" % c)
    return "".join(out)


def where_of(plain, backing):
    """Name a place as its plaintext path (when known) and its backing path."""
    if plain is None:
        return "backing %s" % show(backing)
    return "/%s (backing %s)" % (show(plain), show(backing))


def hkdf(ikm, salt, info, length):
    return HKDF(algorithm=hashes.SHA256(), length=length, salt=salt,
                info=info).derive(ikm)


def hmac256(key, data):
    return hmac.new(key, data, hashlib.sha256).digest()


def ct_eq(a, b):
    return hmac.compare_digest(a, b)


def u8(n):
    return struct.pack(">B", n)


def u16(n):
    return struct.pack(">H", n)


def u32(n):
    return struct.pack(">I", n)


def b64url_decode_strict(s):
    """base64url without padding, strictly: alphabet only, length not 1 mod 4,
    unused trailing bits zero.  Returns None if s is not such an encoding."""
    if not s or any(c not in B64URL_ALPHABET for c in s) or len(s) % 4 == 1:
        return None
    try:
        data = base64.urlsafe_b64decode(s + b"=" * (-len(s) % 4))
    except (binascii.Error, ValueError):
        return None
    # Canonical form only (this also rejects non-zero unused trailing bits).
    if base64.urlsafe_b64encode(data).rstrip(b"=") != s:
        return None
    return data


def b64_std_decode(s):
    """Standard base64 (RFC 4648 section 4), with padding or without it (as
    kmsfs reads the config's blobs).  Returns None if s is not base64."""
    if not isinstance(s, str):
        return None
    try:
        b = s.encode("ascii")
    except UnicodeEncodeError:
        return None
    if len(b) % 4 == 1:
        return None
    if b"=" not in b:
        b += b"=" * (-len(b) % 4)
    try:
        return base64.b64decode(b, validate=True)
    except (binascii.Error, ValueError):
        return None


def b64url_encode(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def is_lower_hex(s, n):
    return (isinstance(s, str) and len(s) == n
            and all(c in "0123456789abcdef" for c in s))


def is_hex(s, n):
    return (isinstance(s, str) and len(s) == n
            and all(c in string.hexdigits for c in s))


def is_power_of_two_in(n, lo, hi):
    return lo <= n <= hi and n & (n - 1) == 0


def canonical_context(pairs):
    """u16 n, then pairs sorted by key bytes: u16 len, key, u16 len, value."""
    out = [u16(len(pairs))]
    for k, v in sorted(pairs, key=lambda kv: kv[0]):
        out += [u16(len(k)), k, u16(len(v)), v]
    return b"".join(out)


def read_file_bytes(path, where, limit=None):
    try:
        with open(path, "rb") as f:
            return f.read() if limit is None else f.read(limit)
    except OSError as e:
        raise Fail(where, "cannot read: %s" % e.strerror)


# ---------------------------------------------------------------------------
# Local key provider
# ---------------------------------------------------------------------------

def open_protected_key(line, passphrase, where):
    """The master key of a passphrase-protected key line (kmsfs-format(5),
    Local provider): scrypt logN=L r=R p=P salt=S key=K."""
    fields = line.split(b" ")
    names = [b"scrypt", b"logN=", b"r=", b"p=", b"salt=", b"key="]
    if len(fields) != 6 or fields[0] != b"scrypt" or not all(
            f.startswith(n) for f, n in zip(fields[1:], names[1:])):
        raise Fail(where, "the key line is not a scrypt line")
    vals = [f[len(n):] for f, n in zip(fields[1:], names[1:])]
    nums = []
    for v in vals[:3]:
        if not (1 <= len(v) <= 3 and v.isdigit()):
            raise Fail(where, "scrypt parameter is not a decimal number")
        nums.append(int(v))
    ln, r, p = nums
    if not (10 <= ln <= 22 and 1 <= r <= 32 and 1 <= p <= 16) or \
            128 * r * ((1 << ln) + p + 2) > 1 << 30:
        raise Fail(where, "scrypt parameters out of range")
    hexd = b"0123456789abcdefABCDEF"
    if len(vals[3]) != 32 or len(vals[4]) != 120 or not all(
            c in hexd for c in vals[3] + vals[4]):
        raise Fail(where, "salt or key is not hex of the right length")
    salt = bytes.fromhex(vals[3].decode())
    k = bytes.fromhex(vals[4].decode())
    if passphrase is None:
        raise Fail(where, "the key file is protected by a passphrase "
                   "(give --passfile)")
    dk = hashlib.scrypt(passphrase, salt=salt, n=1 << ln, r=r, p=p,
                        maxmem=128 * r * ((1 << ln) + p + 2) + (1 << 20),
                        dklen=32)
    ad = b"kmsfs key file v1" + bytes([ln, r, p]) + salt
    try:
        master = AESGCM(dk).decrypt(k[:12], k[12:], ad)
    except InvalidTag:
        raise Fail(where, "wrong passphrase")
    return master


class LocalProvider:
    def __init__(self, key_file, passphrase=None):
        where = "key file %s" % show(key_file)
        data = read_file_bytes(key_file, where, 4097)
        if len(data) > 4096:
            raise Fail(where, "key file longer than 4096 bytes")
        master = None
        # Lines separated by LF, each trimmed of spaces, tabs and CR at both
        # ends; empty lines and lines starting with "#" skipped; the first
        # other line must be exactly 64 hex digits (either case), and
        # anything after it is ignored.
        for line in data.split(b"\n"):
            hexkey = line.strip(b" \t\r")
            if not hexkey or hexkey.startswith(b"#"):
                continue
            if hexkey.startswith(b"scrypt "):
                master = open_protected_key(hexkey, passphrase, where)
                break
            if len(hexkey) != 64 or not all(
                    c in b"0123456789abcdefABCDEF" for c in hexkey):
                raise Fail(where, "the first line that is neither empty nor "
                           "a comment is not 64 hex digits")
            master = bytes.fromhex(hexkey.decode("ascii"))
            break
        if master is None:
            raise Fail(where, "no key line (64 hex digits) in the key file")
        self.key_id = "local:" + hmac256(master, b"kmsfs local key id")[:8].hex()
        self.wrap_key = hkdf(master, b"", b"kmsfs local wrap key", 32)

    def unwrap(self, key_id, blob, context_encoding):
        """Unwrap a 61-byte local blob; None if it is not ours or fails."""
        if key_id != self.key_id:
            return None
        if len(blob) != 61 or blob[0] != 0x01:
            return None
        kid = key_id.encode()
        ad = b"kmsfs local v1" + u16(len(kid)) + kid + context_encoding
        try:
            dek = AESGCM(self.wrap_key).decrypt(blob[1:13], blob[13:], ad)
        except InvalidTag:
            return None
        return dek if len(dek) == 32 else None


class LocalKeys:
    """The master keys of one or more key files (more than one is needed in
    the middle of a rotation: the config's volume key is still wrapped under
    the old key while the files already moved are wrapped under the new)."""

    def __init__(self, providers):
        self.by_id = {}
        for p in providers:
            self.by_id.setdefault(p.key_id, p)
        self.key_id = ", ".join(self.by_id)  # for messages

    def has(self, key_id):
        return key_id in self.by_id

    def unwrap(self, key_id, blob, context_encoding):
        p = self.by_id.get(key_id)
        return None if p is None else p.unwrap(key_id, blob,
                                                context_encoding)


def order_wrapped(wrapped, key_ids):
    """Configured key IDs first (in the config's order), then any others."""
    first, rest = [], []
    for w in key_ids:
        first += [x for x in wrapped if x[1] == w]
    rest = [x for x in wrapped if x[1] not in key_ids]
    return first + rest


# ---------------------------------------------------------------------------
# Volume config
# ---------------------------------------------------------------------------

def _no_duplicates(pairs):
    d = {}
    for k, v in pairs:
        if k in d:
            raise ValueError("duplicate member %r" % k)
        d[k] = v
    return d


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


class Volume:
    pass


def load_config(cipherdir):
    path = os.path.join(cipherdir, b"kmsfs.conf")
    where = "config %s" % show(path)
    raw = read_file_bytes(path, where)
    try:
        conf = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as e:
        raise Fail(where, "not a JSON object: %s" % e)

    def bad(why):
        return Fail(where, "malformed config: " + why)

    if not isinstance(conf, dict):
        raise bad("not a JSON object")
    v = Volume()
    fv = conf.get("formatVersion")
    if not _is_int(fv):
        raise bad("formatVersion missing or not an integer")
    if fv not in (1, 2, 3):
        raise bad("unsupported formatVersion %d" % fv)
    v.format = fv

    vid = conf.get("volumeId")
    if not is_lower_hex(vid, 32):
        raise bad("volumeId is not 32 lower-case hex digits")
    v.volume_id_hex = vid
    v.volume_id = bytes.fromhex(vid)

    cs = conf.get("chunkSize")
    if not _is_int(cs) or not is_power_of_two_in(cs, MIN_CHUNK, MAX_CHUNK):
        raise bad("chunkSize is not a power of two from 4096 to 1048576")
    v.chunk_size = cs

    ctx = conf.get("encryptionContext")
    if not isinstance(ctx, dict):
        raise bad("encryptionContext missing or not an object")
    pairs = []
    for k, val in ctx.items():
        if not isinstance(val, str):
            raise bad("encryptionContext value of %r is not a string" % k)
        kb, vb = k.encode("utf-8"), val.encode("utf-8")
        if not kb:
            raise bad("encryptionContext has an empty key")
        if kb.startswith(b"kmsfs:"):
            raise bad("encryptionContext key %r is reserved" % k)
        if len(kb) > 1024 or len(vb) > 1024:
            raise bad("encryptionContext key or value longer than 1024 bytes")
        pairs.append((kb, vb))
    v.user_context = pairs

    if "headerLength" in conf:
        hl = conf["headerLength"]
        if fv == 1:
            raise bad("headerLength in a format 1 config")
        if not _is_int(hl) or hl % 512 or not 512 <= hl <= MAX_HEADER:
            raise bad("headerLength is not a multiple of 512 from 512 to "
                      "1048576")
        v.header_length = hl
    else:
        v.header_length = None

    kp = conf.get("keyProvider")
    if not isinstance(kp, dict):
        raise bad("keyProvider missing or not an object")
    ptype = kp.get("type")
    if ptype not in ("local", "aws-kms"):
        raise bad("keyProvider.type is not \"local\" or \"aws-kms\"")
    key_ids = kp.get("keyIds")
    if (not isinstance(key_ids, list) or not key_ids or len(key_ids) > 255
            or not all(isinstance(x, str) for x in key_ids)):
        raise bad("keyProvider.keyIds is not an array of 1 to 255 strings")
    # keyFile, region, profile and endpoint may be absent or null (the
    # same thing: null is absent for the MAC's encoding and for the format 3
    # endpoint rule).
    for opt in ("keyFile", "region", "profile", "endpoint"):
        if kp.get(opt) is not None and not isinstance(kp[opt], str):
            raise bad("keyProvider.%s is not a string or null" % opt)
    if ptype == "local":
        # "a key ID that cannot belong to the type is refused at mount":
        # local key IDs are "local:" and 16 lower-case hex digits.
        for kid in key_ids:
            if not (kid.startswith("local:") and is_lower_hex(kid[6:], 16)):
                raise bad("keyProvider.keyIds holds %r, which is not a local "
                          "key ID" % kid)
    v.provider_type = ptype
    v.key_ids = key_ids
    v.key_file = kp.get("keyFile")  # None when absent or null
    v.kp = kp

    v.name_binding = None
    if fv in (1, 2):
        for f in ("names", "volumeKey", "mac", "nameBinding"):
            if f in conf:
                raise bad("%s in a format %d config" % (f, fv))
        v.names_encrypted = False
    else:
        if kp.get("endpoint") is not None:
            raise bad("a format 3 config has an endpoint")
        names = conf.get("names")
        if names not in ("encrypted", "plaintext"):
            raise bad("names is not \"encrypted\" or \"plaintext\"")
        v.names = names
        v.names_encrypted = names == "encrypted"
        if "nameBinding" in conf:
            # Optional; only "xattr" or "xattr+symlinks", and only with
            # encrypted names.  null is not one of the members that may be
            # null (keyFile, region, profile, endpoint), so it is refused.
            if conf["nameBinding"] not in ("xattr", "xattr+symlinks"):
                raise bad("nameBinding is not \"xattr\" or \"xattr+symlinks\"")
            if not v.names_encrypted:
                raise bad("nameBinding in a volume whose names is not "
                          "\"encrypted\"")
            v.name_binding = conf["nameBinding"]
        vk = conf.get("volumeKey")
        if not isinstance(vk, dict):
            raise bad("no volumeKey")
        wks = vk.get("wrappedKeys")
        if not isinstance(wks, list) or not wks:
            raise bad("no wrapped volume key")
        v.wrapped_volume_keys = []
        for wk in wks:
            if (not isinstance(wk, dict)
                    or not isinstance(wk.get("provider"), str)
                    or not isinstance(wk.get("keyId"), str)
                    or not isinstance(wk.get("blob"), str)):
                raise bad("a wrapped volume key is not an object of provider, "
                          "keyId and blob strings")
            blob = b64_std_decode(wk["blob"])
            if blob is None:
                raise bad("a wrapped volume key's blob is not base64")
            v.wrapped_volume_keys.append((wk["provider"], wk["keyId"], blob))
        # Written in lower case; the Checks ask for "64 hex digits" only.
        com = vk.get("commitment")
        if not is_hex(com, 64):
            raise bad("volumeKey.commitment is not 64 hex digits")
        v.commitment = bytes.fromhex(com)
        mac = conf.get("mac")
        if mac is None:
            raise bad("no mac")
        if not is_hex(mac, 64):
            raise bad("mac is not 64 hex digits")
        v.mac = bytes.fromhex(mac)
    v.where = where
    return v


def config_mac_input(v):
    def opt(name):
        val = v.kp.get(name)
        if val is None:
            return u8(0)
        b = val.encode("utf-8")
        return u8(1) + u16(len(b)) + b

    names = v.names.encode()
    ptype = v.provider_type.encode()
    parts = [b"kmsfs v3 config", u32(3), v.volume_id, u32(v.chunk_size),
             u32(v.header_length or 0), u8(len(names)) + names,
             canonical_context(v.user_context),
             u8(len(ptype)) + ptype, u16(len(v.key_ids))]
    for kid in v.key_ids:
        b = kid.encode("utf-8")
        parts.append(u16(len(b)) + b)
    parts += [opt("keyFile"), opt("region"), opt("profile"), v.commitment]
    if v.name_binding is not None:
        # Only when present: configs written before the field existed keep
        # their MAC.
        nb = v.name_binding.encode()
        parts.append(b"binding" + u8(len(nb)) + nb)
    return b"".join(parts)


def open_volume_key(v, provider):
    """Format 3: unwrap, check the commitment, derive the keys, check the MAC."""
    context = canonical_context([
        (b"kmsfs:purpose", b"volume-key"),
        (b"kmsfs:volume-id", v.volume_id_hex.encode()),
    ])
    tried = False
    for prov, kid, blob in order_wrapped(v.wrapped_volume_keys, v.key_ids):
        if prov != "local":
            continue
        tried = tried or provider.has(kid)
        vk = provider.unwrap(kid, blob, context)
        if vk is None:
            continue
        com = hkdf(vk, v.volume_id, b"kmsfs v3 volume key commitment", 32)
        if not ct_eq(com, v.commitment):
            continue
        v.name_key = hkdf(vk, v.volume_id, b"kmsfs v3 name key", 64)
        v.xattr_name_key = hkdf(vk, v.volume_id, b"kmsfs v3 xattr name key", 64)
        v.metadata_key = hkdf(vk, v.volume_id, b"kmsfs v3 metadata key", 32)
        v.dirid_key = hkdf(vk, v.volume_id, b"kmsfs v3 directory id key", 32)
        v.empty_file_key = hkdf(vk, v.volume_id, b"kmsfs v3 empty file key",
                                32)
        v.name_binding_key = hkdf(vk, v.volume_id,
                                  b"kmsfs v3 name binding key", 32)
        config_key = hkdf(vk, v.volume_id, b"kmsfs v3 config key", 32)
        if not ct_eq(hmac256(config_key, config_mac_input(v)), v.mac):
            raise Fail(v.where, "bad MAC: the config was changed by someone "
                       "without the volume key")
        return
    if not tried:
        raise Fail(v.where, "no wrapped volume key for the key files' keys "
                   "%s" % provider.key_id)
    raise Fail(v.where, "commitment mismatch: no wrapped volume key unwraps "
               "with %s to the committed volume key" % provider.key_id)


# ---------------------------------------------------------------------------
# Format 3 metadata: sealing, names, directory IDs, symbolic links, xattrs
# ---------------------------------------------------------------------------

def open_sealed(key, sealed, ad):
    if len(sealed) < OVERHEAD:
        return None
    try:
        return AESGCM(key).decrypt(sealed[:NONCE], sealed[NONCE:], ad)
    except InvalidTag:
        return None


def siv_open_padded(key, s, ad):
    """AES-SIV open of IV||C with one AD element, then PKCS#7 unpadding."""
    if s is None or len(s) < 32 or (len(s) - 16) % 16:
        return None, "not a whole number of 16-byte blocks after the IV"
    try:
        p = AESSIV(key).decrypt(s, [ad])
    except InvalidTag:
        return None, "does not authenticate (AES-SIV)"
    k = p[-1]
    if not 1 <= k <= 16 or p[-k:] != bytes([k]) * k:
        return None, "bad padding"
    return p[:-k], None


def valid_name(n):
    return (1 <= len(n) <= 255 and n not in (b".", b"..")
            and b"/" not in n and b"\0" not in n)


def decrypt_short_name(v, t, dirid):
    s = b64url_decode_strict(t)
    if s is None:
        return None, "not strict base64url"
    n, why = siv_open_padded(v.name_key, s, dirid)
    if n is None:
        return None, why
    if not valid_name(n):
        return None, "decrypts to an invalid name"
    return n, None


def read_dirid(v, backing_dir, plain):
    path = os.path.join(backing_dir, b"kmsfs.dirid")
    where = where_of(plain, path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise Fail(where, "directory has no kmsfs.dirid")
    except OSError as e:
        raise Fail(where, "cannot stat: %s" % e.strerror)
    if not stat.S_ISREG(st.st_mode):
        raise Fail(where, "kmsfs.dirid is not a regular file")
    data = read_file_bytes(path, where, 63)
    if len(data) != 62:
        raise Fail(where, "kmsfs.dirid is not 62 bytes")
    if data[:14] != b"kmsfs dirid v3":
        raise Fail(where, "kmsfs.dirid has a bad magic")
    if not ct_eq(hmac256(v.dirid_key, data[:30]), data[30:62]):
        raise Fail(where, "kmsfs.dirid MAC does not verify")
    return data[14:30]


def decrypt_symlink(v, stored, parent_id, bname, where):
    if len(stored) > 4095:
        raise Fail(where, "stored symbolic link target longer than 4095")
    sealed = b64url_decode_strict(stored)
    if sealed is None:
        raise Fail(where, "symbolic link target is not strict base64url")
    ad = b"kmsfs v3 symlink" + v.volume_id
    if v.name_binding == "xattr+symlinks":
        # SYMBOLIC LINKS, bound form: I || sealed, AD adds I || D || B.
        if len(sealed) <= 16:
            raise Fail(where, "bound symbolic link target too short")
        link_id, sealed = sealed[:16], sealed[16:]
        ad += link_id + parent_id + bname
    x = open_sealed(v.metadata_key, sealed, ad)
    if x is None:
        raise Fail(where, "symbolic link target does not authenticate")
    if not x:
        raise Fail(where, "symbolic link target opens to nothing")
    return x


XATTR_NAMESPACES = (b"user.", b"trusted.")


NAME_BINDING_XATTR = b"user.kmsfs.names"
MAX_BINDING_TAGS = 256


def list_backing_xattrs(v, path, where):
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
            return []
        raise Fail(where, "cannot list extended attributes: %s" % e.strerror)
    out = []
    for name in names:
        nb = os.fsencode(name)
        if not any(nb.startswith(ns) for ns in XATTR_NAMESPACES):
            continue  # kmsfs stores only user.* and trusted.*
        if v.names_encrypted and nb == NAME_BINDING_XATTR:
            # kmsfs's own name binding tags (ENCRYPTED NAMES, Name binding),
            # never a user's attribute: with encrypted names a user's
            # attribute name is stored as NS || base64url(...), which has no
            # further ".".  With plaintext names it is the user's own.
            continue
        try:
            val = os.getxattr(path, name, follow_symlinks=False)
        except OSError as e:
            raise Fail(where, "cannot read extended attribute %s: %s"
                       % (show(nb), e.strerror))
        out.append((nb, val))
    return out


def decrypt_xattrs(v, raw, node_id, where):
    if not v.names_encrypted:
        return {n: val for n, val in raw}
    out = {}
    for name, val in raw:
        dot = name.index(b".")
        ns, enc = name[:dot + 1], name[dot + 1:]
        s = b64url_decode_strict(enc)
        if s is None:
            raise Fail(where, "extended attribute name %s is not strict "
                       "base64url" % show(name))
        r, why = siv_open_padded(v.xattr_name_key, s, ns)
        if r is None:
            raise Fail(where, "extended attribute name %s: %s"
                       % (show(name), why))
        if not r or b"\0" in r:
            raise Fail(where, "extended attribute name %s decrypts to an "
                       "invalid name" % show(name))
        full = ns + r
        plain = open_sealed(v.metadata_key, val,
                            b"kmsfs v3 xattr" + node_id + full)
        if plain is None:
            raise Fail(where, "value of extended attribute %s does not "
                       "authenticate" % show(full))
        if full in out:
            raise Fail(where, "extended attribute %s stored twice"
                       % show(full))
        out[full] = plain
    return out


def check_name_binding(v, path, parent_id, node_id, bname, where):
    """Name binding (ENCRYPTED NAMES): a regular file or directory reached by
    backing name bname in the directory whose ID is parent_id must carry
    tag(parent_id, node ID, bname) in its backing user.kmsfs.names."""
    if v.name_binding is None:
        return
    try:
        val = os.getxattr(path, NAME_BINDING_XATTR, follow_symlinks=False)
    except OSError as e:
        if e.errno == errno.ENODATA:
            raise Fail(where, "name binding: no %s attribute (the node is "
                       "not bound to any name)" % NAME_BINDING_XATTR.decode())
        raise Fail(where, "name binding: cannot read %s: %s"
                   % (NAME_BINDING_XATTR.decode(), e.strerror))
    if not val or len(val) % 16 or len(val) // 16 > MAX_BINDING_TAGS:
        raise Fail(where, "name binding: %s is %d bytes, not 1 to %d "
                   "16-byte tags" % (NAME_BINDING_XATTR.decode(), len(val),
                                     MAX_BINDING_TAGS))
    want = hmac256(v.name_binding_key,
                   b"kmsfs v3 name" + parent_id + node_id + bname)[:16]
    found = False
    for i in range(0, len(val), 16):
        found |= ct_eq(val[i:i + 16], want)  # no early exit
    if not found:
        raise Fail(where, "name binding: the node carries no tag for this "
                   "backing name in this directory (names exchanged, or the "
                   "entry put back under another name)")


# ---------------------------------------------------------------------------
# Regular files
# ---------------------------------------------------------------------------

class FileHeader:
    pass


def parse_header(f, size, v, where):
    prefix = f.read(16)
    if len(prefix) < 16:
        raise Fail(where, "truncated header (file shorter than 16 bytes)")
    magic, version, flags, hlen, csize = struct.unpack(">4sHHII", prefix)
    if magic != b"KMFS":
        raise Fail(where, "bad header magic")
    if version != 1:
        raise Fail(where, "unsupported header version %d" % version)
    if flags & ~FLAG_EMPTY_MARKER:
        raise Fail(where, "header flags 0x%04x have a bit other than bit 0 "
                   "set" % flags)
    if flags & FLAG_EMPTY_MARKER and v.format != 3:
        raise Fail(where, "header flag bit 0 (empty-file marker) in a format "
                   "%d volume, whose files kmsfs never marks" % v.format)
    if not MIN_HEADER <= hlen <= MAX_HEADER:
        raise Fail(where, "header length %d outside 99...1048576" % hlen)
    if not is_power_of_two_in(csize, MIN_CHUNK, MAX_CHUNK):
        raise Fail(where, "chunk size %d is not a power of two from 4096 to "
                   "1048576" % csize)
    if v.header_length is not None and hlen != v.header_length:
        raise Fail(where, "header length %d differs from the volume's "
                   "headerLength %d" % (hlen, v.header_length))
    if size < hlen:
        raise Fail(where, "truncated header (file of %d bytes, header length "
                   "%d)" % (size, hlen))
    hdr = prefix + f.read(hlen - 16)
    if len(hdr) != hlen:
        raise Fail(where, "truncated header")

    pos = 64

    def take(n):
        nonlocal pos
        if pos + n > hlen:
            raise Fail(where, "header content longer than its header length")
        b = hdr[pos:pos + n]
        pos += n
        return b

    h = FileHeader()
    h.flags = flags
    h.length = hlen
    h.chunk_size = csize
    h.file_id = hdr[16:32]
    h.commitment = hdr[32:64]
    (npairs,) = struct.unpack(">H", take(2))
    ctx_start = 64
    pairs = []
    prev = None
    for _ in range(npairs):
        (kl,) = struct.unpack(">H", take(2))
        k = take(kl)
        (vl,) = struct.unpack(">H", take(2))
        val = take(vl)
        if prev is not None and not prev < k:
            raise Fail(where, "header context keys are not strictly sorted")
        try:
            k.decode("utf-8")
        except UnicodeDecodeError:
            raise Fail(where, "a header context key is not UTF-8")
        prev = k
        pairs.append((k, val))
    h.context_encoding = hdr[ctx_start:pos]
    h.context = dict(pairs)
    mac_off = pos
    h.mac = take(32)
    h.mac_input = hdr[:8] + b"\0\0\0\0" + hdr[12:mac_off]
    (nkeys,) = struct.unpack(">B", take(1))
    if not 1 <= nkeys <= 255:
        raise Fail(where, "header holds no wrapped key")
    h.wrapped = []
    for _ in range(nkeys):
        (pl,) = struct.unpack(">B", take(1))
        prov = take(pl)
        (kl,) = struct.unpack(">H", take(2))
        kid = take(kl)
        (bl,) = struct.unpack(">H", take(2))
        blob = take(bl)
        try:
            h.wrapped.append((prov.decode("utf-8"), kid.decode("utf-8"), blob))
        except UnicodeDecodeError:
            raise Fail(where, "wrapped key provider or key ID is not UTF-8")
    if any(hdr[pos:]):
        raise Fail(where, "header padding is not all zero")

    # The kmsfs pairs: kmsfs:volume-id is the config's volumeId exactly,
    # kmsfs:file-id the header's file ID in 32 lower-case hex digits, and
    # they are the only keys starting with "kmsfs:".
    if b"kmsfs:volume-id" not in h.context:
        raise Fail(where, "header context lacks kmsfs:volume-id")
    if h.context[b"kmsfs:volume-id"] != v.volume_id_hex.encode():
        raise Fail(where, "header context names another volume")
    if b"kmsfs:file-id" not in h.context:
        raise Fail(where, "header context lacks kmsfs:file-id")
    if h.context[b"kmsfs:file-id"] != h.file_id.hex().encode():
        raise Fail(where, "header context names another file ID (it must "
                   "be the header's file ID in lower-case hex)")
    for k in h.context:
        if k.startswith(b"kmsfs:") and k not in (b"kmsfs:volume-id",
                                                 b"kmsfs:file-id"):
            raise Fail(where, "header context has the reserved key %s"
                       % show(k))
    return h


def open_file_key(h, v, provider, where):
    for prov, kid, blob in order_wrapped(h.wrapped, v.key_ids):
        if prov != "local":
            continue
        dek = provider.unwrap(kid, blob, h.context_encoding)
        if dek is None:
            continue
        com = hkdf(dek, h.file_id, b"kmsfs v1 key commitment", 32)
        if not ct_eq(com, h.commitment):
            continue
        header_key = hkdf(dek, h.file_id, b"kmsfs v1 header key", 32)
        if not ct_eq(hmac256(header_key, h.mac_input), h.mac):
            raise Fail(where, "header MAC does not verify")
        return hkdf(dek, h.file_id, b"kmsfs v1 chunk key", 32)
    if not any(p == "local" and provider.has(k) for p, k, _ in h.wrapped):
        raise Fail(where, "no wrapped data key for the key files' keys %s"
                   % provider.key_id)
    raise Fail(where, "no wrapped data key unwraps (under this file's "
               "context) to a key matching the header's key commitment")


def body_layout(h, size, where):
    """Return (plaintext size, [(index, offset, stored length, is_last)],
    whether the body is an empty-file marker)."""
    c = h.chunk_size
    body = size - h.length  # size >= h.length (checked by parse_header)
    if h.flags & FLAG_EMPTY_MARKER:
        # Format 3, flag bit 0: an empty file's body is exactly the 16-byte
        # marker; a backing size of H to H+15 is damaged.
        if body < MARKER_LEN:
            raise Fail(where, "truncated file: a marked (flag bit 0) file "
                       "has a body of %d bytes, less than the 16-byte "
                       "empty-file marker" % body)
        if body == MARKER_LEN:
            return 0, [], True
    elif body == 0:
        return 0, [], False
    n, r = divmod(body, c + OVERHEAD)
    if 1 <= r <= OVERHEAD:
        raise Fail(where, "truncated or damaged file: its body ends %d bytes "
                   "into a chunk" % r)
    chunks = [(i, h.length + i * (c + OVERHEAD), c + OVERHEAD, False)
              for i in range(n)]
    if r:
        chunks.append((n, h.length + n * (c + OVERHEAD), r, False))
    i, off, ln, _ = chunks[-1]
    chunks[-1] = (i, off, ln, True)
    return n * c + max(r - OVERHEAD, 0), chunks, False


def empty_file_marker(v, file_id):
    return hmac256(v.empty_file_key, b"kmsfs v3 empty file" + file_id)[:16]


def decrypt_file(path, v, provider, where, sink, journal):
    """Decrypt one backing file, feeding plaintext to sink(bytes) (or
    sink(None, n) for a hole of n zero bytes).  Returns (size, sha256 hex,
    file ID)."""
    try:
        raw = open(path, "rb")
    except OSError as e:
        raise Fail(where, "cannot open: %s" % e.strerror)
    with raw:
        st = os.fstat(raw.fileno())
        f, size = raw, st.st_size
        if journal is not None and journal.names(st):
            f, size = journal.source(raw, st.st_size, where)
        h = parse_header(f, size, v, where)
        psize, chunks, marked_empty = body_layout(h, size, where)
        chunk_key = AESGCM(open_file_key(h, v, provider, where))
        if marked_empty:
            f.seek(h.length)
            body = f.read(MARKER_LEN + 1)
            if len(body) != MARKER_LEN:
                raise Fail(where, "empty-file marker truncated")
            if not ct_eq(body, empty_file_marker(v, h.file_id)):
                raise Fail(where, "the 16-byte body of this empty file is "
                           "not its empty-file marker")
        digest = hashlib.sha256()
        zero_chunk = bytes(h.chunk_size + OVERHEAD)
        zero_plain = bytes(h.chunk_size)
        total = 0
        for i, off, ln, last in chunks:
            f.seek(off)
            data = f.read(ln)
            if len(data) != ln:
                raise Fail(where, "chunk %d truncated" % i)
            if not last and data == zero_chunk:
                plain = zero_plain  # a hole
                digest.update(plain)
                sink(None, len(plain))
                total += len(plain)
                continue
            nonce = data[:NONCE]
            if nonce == bytes(NONCE):
                raise Fail(where, "chunk %d has a zero nonce and is not a "
                           "hole" % i)
            ad = h.file_id + struct.pack(">Q", i) + (b"\x01" if last else b"\x00")
            try:
                plain = chunk_key.decrypt(nonce, data[NONCE:], ad)
            except InvalidTag:
                raise Fail(where, "chunk %d does not authenticate%s"
                           % (i, " as the last chunk" if last else ""))
            digest.update(plain)
            sink(plain, len(plain))
            total += len(plain)
        if total != psize:  # cannot happen; belt and braces
            raise Fail(where, "size mismatch")
    return psize, digest.hexdigest(), h.file_id


# ---------------------------------------------------------------------------
# Rewrap journal (an interrupted rotation), applied in memory
# ---------------------------------------------------------------------------

class OverlaySource:
    """A backing file read as if `data` had been written at offset 0."""

    def __init__(self, f, base_size, data):
        self.f = f
        self.data = data
        self.size = max(base_size, len(data))
        self.pos = 0

    def seek(self, off):
        self.pos = off

    def read(self, n):
        end = min(self.pos + n, self.size)
        out = b""
        if self.pos < len(self.data):
            out = self.data[self.pos:min(end, len(self.data))]
        start = self.pos + len(out)
        if start < end:
            self.f.seek(start)
            out += self.f.read(end - start)
        self.pos += len(out)
        return out


class Journal:
    """A pending step of kmsfs.conf.rewrap-journal: kind "header" (write the
    new header at offset 0 of the file) or "copy" (the file's contents are
    those of kmsfs.conf.rewrap-copy).  CIPHERDIR is never changed: the file
    the journal names is read with the step applied."""

    def __init__(self, kind, rel, ident, header, copy_path):
        self.kind = kind
        self.rel = rel
        self.ident = ident  # (st_dev, st_ino) of the file it names
        self.header = header
        self.copy_path = copy_path
        self.copy = None

    def names(self, st):
        return (st.st_dev, st.st_ino) == self.ident

    def source(self, raw, size, where):
        if self.kind == "header":
            return OverlaySource(raw, size, self.header), max(
                size, len(self.header))
        if self.copy is None:
            try:
                self.copy = open(self.copy_path, "rb")
            except OSError as e:
                raise Fail(where, "cannot open the rewrap copy %s: %s"
                           % (show(self.copy_path), e.strerror))
        return self.copy, os.fstat(self.copy.fileno()).st_size


def load_journal(cipherdir):
    path = os.path.join(cipherdir, b"kmsfs.conf.rewrap-journal")
    where = "rewrap journal %s" % show(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise Fail(where, "cannot stat: %s" % e.strerror)
    if not stat.S_ISREG(st.st_mode):
        raise Fail(where, "not a regular file")
    raw = read_file_bytes(path, where)
    try:
        json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return None  # never completed: a leftover (REWRAP JOURNAL)
    try:
        j = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except ValueError as e:
        raise Fail(where, "malformed journal: %s" % e)

    def bad(why):
        return Fail(where, "malformed journal: " + why)

    if not isinstance(j, dict):
        raise bad("not a JSON object")
    kind = j.get("kind")
    if kind not in ("header", "copy"):
        raise bad("kind is not \"header\" or \"copy\"")
    rel = j.get("path")
    if not isinstance(rel, str) or not rel:
        raise bad("path is not a non-empty string")
    # A backing path as stored; a name that is not UTF-8 can only come here
    # escaped, and Python's surrogate escapes give its bytes back.
    relb = os.fsencode(rel)
    parts = relb.split(b"/")
    if relb.startswith(b"/") or b"\0" in relb or any(
            c in (b"", b".", b"..") for c in parts):
        raise bad("path %s is not a relative path inside CIPHERDIR"
                  % show(relb))
    header = None
    if kind == "header":
        header = b64_std_decode(j.get("header"))
        if not header:
            raise bad("kind \"header\" without a base64 header")
    copy_path = os.path.join(cipherdir, b"kmsfs.conf.rewrap-copy")
    if kind == "copy":
        try:
            cst = os.lstat(copy_path)
        except FileNotFoundError:
            return None  # its copy is gone: the step was already applied
        except OSError as e:
            raise Fail(where, "cannot stat the rewrap copy: %s" % e.strerror)
        if not stat.S_ISREG(cst.st_mode):
            raise Fail(where, "the rewrap copy is not a regular file")
    cur = cipherdir
    for i, c in enumerate(parts):
        cur = os.path.join(cur, c)
        try:
            cst = os.lstat(cur)
        except (FileNotFoundError, NotADirectoryError):
            return None  # names a file that no longer exists: done
        except OSError as e:
            raise Fail(where, "the file it names, %s, cannot be reached: %s"
                       % (show(relb), e.strerror))
        last = i == len(parts) - 1
        if not last and not stat.S_ISDIR(cst.st_mode):
            # Nothing can exist below a non-directory: the file it names no
            # longer exists, so the journal is done.
            return None
        if last and not stat.S_ISREG(cst.st_mode):
            raise Fail(where, "the path it names, %s, is not a regular file"
                       % show(relb))
    return Journal(kind, relb, (cst.st_dev, cst.st_ino), header, copy_path)


# ---------------------------------------------------------------------------
# The tree
# ---------------------------------------------------------------------------

class Entry:
    __slots__ = ("plain", "backing", "st", "kind", "bname", "parent_id")


def list_directory(v, backing_dir, plain_dir, is_top, dirid):
    """Yield (plaintext name, backing name) of the entries of a directory."""
    where = where_of(plain_dir, backing_dir)
    try:
        names = os.listdir(backing_dir)
    except OSError as e:
        raise Fail(where, "cannot list: %s" % e.strerror)
    out = []
    for b in names:
        if is_top and (b == b"kmsfs.conf" or b.startswith(b"kmsfs.conf.")):
            # The reserved names at the top (DESCRIPTION): exactly
            # kmsfs.conf and every name starting with "kmsfs.conf." (the
            # lease, the rewrap journal and copy, temporary files).  Other
            # names such as kmsfs.confx are ordinary entries.
            continue
        if b.startswith(b".kmsfs-new."):
            continue  # a backing file being made, or a crash leftover
        if not v.names_encrypted:
            out.append((b, b))
            continue
        ew = where_of(None, os.path.join(backing_dir, b))
        if 43 <= len(b) <= 255 and b"." not in b:
            n, why = decrypt_short_name(v, b, dirid)
            if n is None:
                raise Fail(ew, "name does not decrypt in its directory "
                           "%s: %s" % (where, why))
            out.append((n, b))
        elif b.startswith(b"kmsfs.long.") and not b.endswith(b".name"):
            sib = os.path.join(backing_dir, b + b".name")
            try:
                st = os.lstat(sib)
            except FileNotFoundError:
                raise Fail(ew, "long name without its .name sibling")
            except OSError as e:
                raise Fail(ew, "cannot stat .name sibling: %s" % e.strerror)
            if not stat.S_ISREG(st.st_mode) or st.st_size > 1024:
                raise Fail(ew, ".name sibling is not a regular file of at "
                           "most 1024 bytes")
            t = read_file_bytes(sib, ew, 1025)
            if len(t) > 1024:
                raise Fail(ew, ".name sibling longer than 1024 bytes")
            if b"kmsfs.long." + b64url_encode(hashlib.sha256(t).digest()) != b:
                raise Fail(ew, ".name sibling does not match the long name")
            if len(t) <= 255:
                raise Fail(ew, "long name whose stored name is a short one")
            n, why = decrypt_short_name(v, t, dirid)
            if n is None:
                raise Fail(ew, "long name does not decrypt in its "
                           "directory: %s" % why)
            out.append((n, b))
        # anything else is kmsfs's own (kmsfs.dirid, .name siblings) or
        # foreign, and never shown
    seen = set()
    for n, b in out:
        if n in seen:
            raise Fail(where, "name %s stored twice" % show(n))
        seen.add(n)
    return out


def walk(v, cipherdir):
    """Return a list of Entry for every entry below the top, plus dir IDs."""
    entries = []
    dirids = {}
    stack = [(cipherdir, b"", True, None, None)]
    while stack:
        bdir, pdir, is_top, parent_id, bname = stack.pop()
        dirid = read_dirid(v, bdir, pdir if not is_top else b"") \
            if v.names_encrypted else None
        if not is_top:
            # A directory's node ID is its own ID; checked before it is used
            # (listed).  The top is not bound.
            check_name_binding(v, bdir, parent_id, dirid, bname,
                               where_of(pdir, bdir))
        dirids[bdir] = dirid
        for n, b in list_directory(v, bdir, pdir, is_top, dirid):
            e = Entry()
            e.plain = n if is_top else pdir + b"/" + n
            e.backing = os.path.join(bdir, b)
            e.bname = b
            e.parent_id = dirid
            try:
                e.st = os.lstat(e.backing)
            except OSError as ex:
                raise Fail(where_of(e.plain, e.backing),
                           "cannot stat: %s" % ex.strerror)
            m = e.st.st_mode
            if stat.S_ISDIR(m):
                e.kind = "dir"
                stack.append((e.backing, e.plain, False, dirid, b))
            elif stat.S_ISREG(m):
                e.kind = "file"
            elif stat.S_ISLNK(m):
                e.kind = "symlink"
            else:
                e.kind = "other"
            entries.append(e)
    entries.sort(key=lambda e: e.plain)
    return entries, dirids


# ---------------------------------------------------------------------------
# Output tree
# ---------------------------------------------------------------------------

class Writer:
    def __init__(self, out):
        self.out = out
        self.links = {}
        self.dirs = []
        os.makedirs(out, exist_ok=True)

    def target(self, plain):
        return os.path.join(self.out, plain)

    def set_xattrs(self, path, xattrs):
        for n, val in xattrs.items():
            if not n.startswith(b"user."):
                continue
            try:
                os.setxattr(path, n, val, follow_symlinks=False)
            except OSError as e:
                sys.stderr.write("%s: warning: cannot set %s on %s: %s\n"
                                 % (PROG, show(n), show(path), e.strerror))

    def mkdir(self, e, xattrs):
        p = self.target(e.plain)
        os.makedirs(p, exist_ok=True)
        self.set_xattrs(p, xattrs)
        self.dirs.append((p, e.st))

    def symlink(self, e, target):
        p = self.target(e.plain)
        if os.path.lexists(p):
            os.unlink(p)
        os.symlink(target, p)

    def other(self, e):
        p = self.target(e.plain)
        m = e.st.st_mode
        try:
            if stat.S_ISFIFO(m):
                os.mkfifo(p, stat.S_IMODE(m))
            elif stat.S_ISCHR(m) or stat.S_ISBLK(m):
                os.mknod(p, m, e.st.st_rdev)
        except OSError as ex:
            sys.stderr.write("%s: warning: cannot make %s: %s\n"
                             % (PROG, show(p), ex.strerror))

    def hardlink_of(self, e):
        return self.links.get((e.st.st_dev, e.st.st_ino))

    def file_begin(self, e):
        p = self.target(e.plain)
        tmp = os.path.join(os.path.dirname(p),
                           b".kmsfs_decrypt-tmp." + str(os.getpid()).encode())
        self.cur = (p, tmp, open(tmp, "wb"))
        return self.sink

    def sink(self, data, n):
        f = self.cur[2]
        if data is None:
            f.seek(n, os.SEEK_CUR)  # keep holes sparse
        else:
            f.write(data)

    def file_abort(self):
        p, tmp, f = self.cur
        f.close()
        os.unlink(tmp)

    def file_end(self, e, xattrs):
        p, tmp, f = self.cur
        f.truncate(f.tell())
        f.close()
        os.chmod(tmp, stat.S_IMODE(e.st.st_mode))
        self.set_xattrs(tmp, xattrs)
        os.utime(tmp, ns=(e.st.st_atime_ns, e.st.st_mtime_ns))
        os.replace(tmp, p)
        self.links[(e.st.st_dev, e.st.st_ino)] = p

    def link(self, e, first):
        p = self.target(e.plain)
        if os.path.lexists(p):
            os.unlink(p)
        os.link(first, p)

    def finish(self):
        for p, st in reversed(self.dirs):
            os.chmod(p, stat.S_IMODE(st.st_mode))
            os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns))


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def check_pin(v, known_volumes):
    """Compare the config with this host's pin of the volume (kmsfs(1), HOST
    PINS), before any key is used.  Read-only: an unpinned volume is refused
    (as kmsfs --require-pinned does), never pinned."""
    path = os.fsencode(known_volumes)
    where = "known volumes %s" % show(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise Fail(where, "cannot stat: %s" % e.strerror)
    if not stat.S_ISREG(st.st_mode):
        raise Fail(where, "not a regular file")
    if st.st_mode & 0o022 or st.st_uid not in (0, os.getuid()):
        raise Fail(where, "users other than its owner may write it")
    pin = None
    for no, raw in enumerate(read_file_bytes(path, where).split(b"\n"), 1):
        line = raw.decode("utf-8", "replace")
        if not line or line.startswith("#"):
            continue
        parts = line.split(" ")
        fields = {}
        for part in parts[1:]:
            k, eq, val = part.partition("=")
            if not eq or k in fields or k not in (
                    "provider", "keys", "commitment", "endpoint"):
                fields = None
                break
            fields[k] = val
        if (not is_lower_hex(parts[0], 32) or fields is None
                or not {"provider", "keys", "commitment"} <= set(fields)
                or not (fields["commitment"] == "none"
                        or is_hex(fields["commitment"], 64))):
            raise Fail(where, "line %d is not a pin" % no)
        if parts[0] == v.volume_id_hex:
            pin = fields
    if pin is None:
        raise Fail(v.where, "volume %s is not pinned in %s"
                   % (v.volume_id_hex, show(path)))
    if pin["provider"] != v.provider_type:
        raise Fail(v.where, "pin mismatch: the config names provider %s, the "
                   "host pinned %s" % (v.provider_type, pin["provider"]))
    pinned_keys = pin["keys"].split(",")
    for kid in v.key_ids:
        if kid not in pinned_keys:
            raise Fail(v.where, "pin mismatch: key %s is not pinned" % kid)
    if pin["commitment"] == "none":
        if v.format == 3:
            raise Fail(v.where, "pin mismatch: pinned as a format 1 or 2 "
                       "volume, the config is format 3")
        if pin.get("endpoint") != v.kp.get("endpoint"):
            raise Fail(v.where, "pin mismatch: the config names another "
                       "endpoint")
    else:
        if v.format != 3:
            raise Fail(v.where, "pin mismatch: a format %d config over a "
                       "pinned format 3 volume (a downgrade)" % v.format)
        if bytes.fromhex(pin["commitment"]) != v.commitment:
            raise Fail(v.where, "pin mismatch: another volume key "
                       "(commitment differs from the pinned one)")


def refuse_downgrade(v, cipherdir):
    """A format 1 or 2 config over a volume whose top holds a directory ID
    file: the format 3 config was replaced (its names would show as stored).
    The page does not ask for this check (THREAT MODEL even says such a
    config is accepted), but the mount makes it, and without it we would
    print backing names as plaintext names."""
    path = os.path.join(cipherdir, b"kmsfs.dirid")
    try:
        st = os.lstat(path)
    except OSError:
        return
    if stat.S_ISREG(st.st_mode) and st.st_size == 62:
        head = read_file_bytes(path, where_of(None, path), 14)
        if head == b"kmsfs dirid v3":
            raise Fail(v.where, "the config says format %d, but the top "
                       "directory holds a format 3 directory ID file "
                       "(kmsfs.dirid): the config was replaced" % v.format)


def run(args):
    cipherdir = os.fsencode(args.cipherdir)
    v = load_config(cipherdir)
    if v.provider_type != "local":
        raise Fail(v.where, "the volume uses the %s key provider; this "
                   "decryptor supports only the local provider (AWS KMS "
                   "needs the network)" % v.provider_type)
    if args.known_volumes:
        check_pin(v, args.known_volumes)
    key_files = args.key_file or ([v.key_file] if v.key_file else [])
    if not key_files:
        base = os.environ.get("XDG_CONFIG_HOME") or os.path.expanduser(
            "~/.config")
        key_files = [os.path.join(base, "kmsfs", "keys",
                                  v.volume_id_hex + ".key")]
    passphrase = None
    if args.passfile:
        with open(args.passfile, "rb") as f:
            passphrase = f.read().split(b"\n")[0]
        if passphrase.endswith(b"\r"):
            passphrase = passphrase[:-1]
    provider = LocalKeys([LocalProvider(os.fsencode(k), passphrase)
                          for k in key_files])
    if v.format == 3:
        open_volume_key(v, provider)
    else:
        refuse_downgrade(v, cipherdir)

    journal = load_journal(cipherdir)

    entries, dirids = walk(v, cipherdir)
    writer = Writer(os.fsencode(args.out)) if args.out else None

    lines = []
    for e in entries:
        where = where_of(e.plain, e.backing)
        rec = {"path": e.plain.hex(), "type": e.kind}
        if e.kind == "file":
            first = writer.hardlink_of(e) if writer else None
            raw_x = list_backing_xattrs(v, e.backing, where)
            sink = (lambda d, n: None)
            if writer and first is None:
                sink = writer.file_begin(e)
            try:
                size, digest, file_id = decrypt_file(e.backing, v, provider,
                                                     where, sink, journal)
                # The node ID of a file is its header's file ID.
                check_name_binding(v, e.backing, e.parent_id, file_id,
                                   e.bname, where)
                xattrs = decrypt_xattrs(v, raw_x, file_id, where)
            except BaseException:
                if writer and first is None:
                    writer.file_abort()
                raise
            if writer:
                if first is None:
                    writer.file_end(e, xattrs)
                else:
                    writer.link(e, first)
            rec["size"] = size
            rec["sha256"] = digest
            rec["xattrs"] = {k.hex(): val.hex() for k, val in
                             sorted(xattrs.items())}
        elif e.kind == "dir":
            raw_x = list_backing_xattrs(v, e.backing, where)
            xattrs = decrypt_xattrs(v, raw_x, dirids.get(e.backing), where)
            if writer:
                writer.mkdir(e, xattrs)
            rec["xattrs"] = {k.hex(): val.hex() for k, val in
                             sorted(xattrs.items())}
        elif e.kind == "symlink":
            try:
                stored = os.readlink(e.backing)
            except OSError as ex:
                raise Fail(where, "cannot read link: %s" % ex.strerror)
            target = decrypt_symlink(v, stored, e.parent_id, e.bname, where) \
                if v.names_encrypted else stored
            if writer:
                writer.symlink(e, target)
            rec["target"] = target.hex()
        else:
            if writer:
                writer.other(e)
        lines.append(json.dumps(rec, sort_keys=True))
    if writer:
        writer.finish()
    sys.stdout.write("".join(line + "\n" for line in lines))
    sys.stdout.flush()


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog=PROG,
        description="Decrypt and verify a kmsfs CIPHERDIR (local provider).")
    ap.add_argument("cipherdir")
    ap.add_argument("--key-file", action="append",
                    help="the local provider's master key file (default: "
                    "the config's keyFile, else "
                    "$XDG_CONFIG_HOME/kmsfs/keys/VOLUME-ID.key); may be "
                    "given more than once, e.g. for a volume whose rotation "
                    "was interrupted (old and new keys)")
    ap.add_argument("--out", help="also write the decrypted tree here")
    ap.add_argument("--passfile", help="the passphrase of protected key "
                    "files, on the first line of this file")
    ap.add_argument("--known-volumes", metavar="FILE",
                    help="check the config against this host pin file "
                    "(kmsfs(1), HOST PINS) before any key is used; the "
                    "volume must be pinned there (the file is only read)")
    args = ap.parse_args(argv)
    try:
        run(args)
    except Fail as f:
        sys.stderr.write("%s: %s: %s\n" % (PROG, f.where, f.reason))
        return 1
    except OSError as e:
        sys.stderr.write("%s: %s: %s\n" % (PROG, show(e.filename or ""),
                                            e.strerror))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
