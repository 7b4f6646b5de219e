"""Ed25519 signatures for model packages and registry events.

Hash chains show that a record was changed, but anyone who can write the files can recompute them from the
point they changed. A signature cannot be remade without the private key. So:

- ``vialinspect keys generate`` makes a key pair: ``NAME.key`` (private, PKCS#8 PEM, mode 0600, kept by the
  people who release models) and ``NAME.pub`` (public, PEM, given to every station and verifier).
- A package is signed over its ``SHA256SUMS`` (which lists model.onnx, model.json with the thresholds, and the
  weights): the signature lives in ``SIGNATURE.json`` beside it and does not change the version id.
- A registry event is signed over its hash (which chains every earlier event).
- A verifier holds a set of trusted public keys (a station: ``--trusted-key`` or the recipe's
  ``trusted_keys``) and accepts only what one of them signed.

Key ids are the first 16 hex digits of the SHA-256 of the raw 32-byte public key.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vialinspect.errors import VialinspectError

SIGNATURE_NAME = "SIGNATURE.json"
SIGNED_FILE = "SHA256SUMS"  # the package file a package signature covers
ALGORITHM = "ed25519"


class SigningError(VialinspectError):
    """A key that cannot be read, or a signature that is missing, malformed, untrusted or wrong."""


@dataclass(frozen=True)
class SigningKey:
    """A private key loaded for signing, with its id."""

    key_id: str
    private: Any  # cryptography's Ed25519PrivateKey


def _raw_public(public: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def key_id(public: Any) -> str:
    return hashlib.sha256(_raw_public(public)).hexdigest()[:16]


def generate_keypair(out_dir: str | Path, name: str, overwrite: bool = False) -> tuple[Path, Path, str]:
    """Write ``NAME.key`` (private, 0600) and ``NAME.pub`` into ``out_dir``; return both paths and the key id."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if not name or "/" in name or name.startswith("."):
        raise SigningError(f"key name {name!r} must be a plain file name")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    priv_path, pub_path = out / f"{name}.key", out / f"{name}.pub"
    for p in (priv_path, pub_path):
        if p.exists() and not overwrite:
            raise SigningError(f"{p} exists; refusing to overwrite a key (use --overwrite only if you mean it)")
    private = Ed25519PrivateKey.generate()
    pem = private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(priv_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    os.chmod(priv_path, 0o600)
    pub_path.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path, key_id(private.public_key())


def load_signing_key(path: str | Path) -> SigningKey:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    p = Path(path)
    try:
        key = serialization.load_pem_private_key(p.read_bytes(), password=None)
    except OSError as e:
        raise SigningError(f"{p}: cannot read the signing key ({e.strerror})") from None
    except (ValueError, TypeError) as e:
        raise SigningError(f"{p}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SigningError(f"{p}: not an Ed25519 key ({type(key).__name__})")
    if os.name == "posix" and p.stat().st_mode & 0o077:
        raise SigningError(f"{p}: a private key must be readable by its owner only (chmod 600 {p})")
    return SigningKey(key_id(key.public_key()), key)


def load_trusted_keys(paths: list[str | Path] | tuple[str | Path, ...]) -> dict[str, Any]:
    """Public keys by key id, from PEM files."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    out: dict[str, Any] = {}
    for path in paths:
        p = Path(path)
        try:
            key = serialization.load_pem_public_key(p.read_bytes())
        except OSError as e:
            raise SigningError(f"{p}: cannot read the trusted key ({e.strerror})") from None
        except (ValueError, TypeError) as e:
            raise SigningError(f"{p}: not a PEM public key ({e})") from None
        if not isinstance(key, Ed25519PublicKey):
            raise SigningError(f"{p}: not an Ed25519 public key ({type(key).__name__})")
        out[key_id(key)] = key
    return out


def sign(key: SigningKey, data: bytes) -> dict[str, str]:
    return {"algorithm": ALGORITHM, "key_id": key.key_id, "signature": key.private.sign(data).hex()}


def verify(trusted: dict[str, Any], sig: Any, data: bytes, what: str) -> str:
    """The key id that signed ``data``; ``SigningError`` naming ``what`` unless a trusted key did."""
    from cryptography.exceptions import InvalidSignature

    if not isinstance(sig, dict) or sig.get("algorithm") != ALGORITHM or not isinstance(sig.get("signature"), str):
        raise SigningError(f"{what} is not signed")
    kid = sig.get("key_id")
    if kid not in trusted:
        raise SigningError(f"{what} is signed by key {kid!r}, which is not trusted here "
                           f"(trusted: {', '.join(sorted(trusted)) or 'none'})")
    try:
        trusted[kid].verify(bytes.fromhex(sig["signature"]), data)
    except (InvalidSignature, ValueError):
        raise SigningError(f"{what}: the signature by {kid} does not match (altered after signing)") from None
    return kid


# ---------------------------------------------------------------- packages


def sign_package(package_dir: str | Path, key: SigningKey) -> dict[str, str]:
    """Sign a package's ``SHA256SUMS``; writes ``SIGNATURE.json`` (atomically) and returns it."""
    p = Path(package_dir)
    sums = (p / SIGNED_FILE).read_bytes()
    body = {**sign(key, sums), "signed": SIGNED_FILE, "sha256": hashlib.sha256(sums).hexdigest()}
    tmp = p / f".{SIGNATURE_NAME}.tmp"
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, p / SIGNATURE_NAME)
    return body


def package_signature(package_dir: str | Path) -> dict[str, Any] | None:
    f = Path(package_dir) / SIGNATURE_NAME
    try:
        body = json.loads(f.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError, UnicodeDecodeError):
        raise SigningError(f"{f}: damaged signature file") from None
    return body if isinstance(body, dict) else {}


def verify_package(package_dir: str | Path, trusted: dict[str, Any]) -> str:
    """The trusted key id that signed the package's checksums (which ``load_package`` checks against the
    files); ``SigningError`` when unsigned, signed by an unknown key, or altered after signing."""
    p = Path(package_dir)
    sig = package_signature(p)
    if sig is None:
        raise SigningError(f"{p}: the package is not signed ({SIGNATURE_NAME} missing)")
    return verify(trusted, sig, (p / SIGNED_FILE).read_bytes(), f"{p}")
