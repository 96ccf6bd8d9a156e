"""The device's Ed25519 verification (the system OpenSSL through ``_ssl``) agrees with ``cryptography``'s, which
the control plane signs with, on valid and on every kind of invalid signature; keys that are not Ed25519 are
refused by name; and the service and updater never import ``cryptography``, nor any device module ``pydantic``
(11 MB of the service's 64 MB budget), the service not even once it has installed a bundle and served requests."""

from __future__ import annotations

import ast
import ssl
import subprocess
import sys
import textwrap

import pytest
from cryptography.exceptions import InvalidSignature as CryptographyInvalid
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge.errors import ConfigError
from edge.signing import InvalidSignature, PublicKey, key_id, read_public_key
from tests.conftest import REPO_ROOT


def _pem(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def _agree(private: Ed25519PrivateKey, device: PublicKey, signature: bytes, message: bytes) -> bool:
    """Both verifiers' verdicts, asserted equal; True when the signature verifies."""
    try:
        private.public_key().verify(signature, message)
        reference = True
    except CryptographyInvalid:
        reference = False
    try:
        device.verify(signature, message)
        ours = True
    except InvalidSignature:
        ours = False
    assert ours == reference, (signature.hex(), message)
    return ours


def test_the_device_verifies_exactly_what_cryptography_verifies():
    signer, other = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    device = PublicKey.from_pem(_pem(signer.public_key()))
    assert key_id(device) == key_id(signer.public_key())
    message = b'{"version": "v7"}'
    signature = signer.sign(message)
    assert _agree(signer, device, signature, message)
    flipped = [bytes([*signature[:index], signature[index] ^ 1, *signature[index + 1:]]) for index in range(64)]
    refused = [signature[:-1], signature + b"\0", b"", bytes(64), other.sign(message), *flipped]
    for candidate in refused:
        assert not _agree(signer, device, candidate, message)
    for altered in (message + b" ", message[:-1], b"", message.replace(b"7", b"8")):
        assert not _agree(signer, device, signature, altered)
    # S + L (the group order) is the classic malleated signature: refused by both
    order = 2**252 + 27742317777372353535851937790883648493
    s_value = int.from_bytes(signature[32:], "little") + order
    assert not _agree(signer, device, signature[:32] + s_value.to_bytes(32, "little"), message)
    ssl.create_default_context()  # nothing left in OpenSSL's error queue for the ssl module to trip on


def test_keys_that_are_not_ed25519_or_not_pem_are_refused_by_name(tmp_path):
    cases = {"p256.pub": _pem(ec.generate_private_key(ec.SECP256R1()).public_key()),
             "garbage.pub": b"-----BEGIN PUBLIC KEY-----\n!!!!\n-----END PUBLIC KEY-----\n",
             "binary.pub": b"\xff\xfe", "private.pub": Ed25519PrivateKey.generate().private_bytes(
                 serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match=f"public key .*{name} is not an Ed25519 PEM public key"):
            read_public_key(tmp_path / name)
    with pytest.raises(ConfigError, match="unreadable"):
        read_public_key(tmp_path / "missing.pub")
    with pytest.raises(ValueError, match="32 bytes"):
        PublicKey(b"\0" * 31)


def test_the_service_and_the_updater_never_import_cryptography_and_the_service_no_http_client():
    code = ("import sys, edge.serving.app, edge.updater.daemon, edge.store.storectl; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'cryptography', 'fastapi'}))")
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 0 and completed.stdout.strip() == "[]", completed.stdout + completed.stderr
    code = ("import sys, edge.serving.serve, edge.serving.app, edge.store.storectl; print(sorted({m.split('.')[0] for "
            "m in sys.modules} & {'httpx', 'requests', 'pydantic', 'pydantic_core'}))")
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 0 and completed.stdout.strip() == "[]", completed.stdout + completed.stderr


def test_no_device_module_imports_pydantic():
    """The images carry no pydantic (7 MB of image, MBs of each process): every module under edge/ loads without it,
    and none names it in an import, function-level (lazy) ones included. The Prefect flow a device's worker runs is
    the exception: Prefect itself needs pydantic (edge/bench/prefect_flow.py imports nothing else of the project)."""
    paths = [path for path in (REPO_ROOT / "edge").rglob("*.py") if path.name != "prefect_flow.py"]
    named = [f"{path.relative_to(REPO_ROOT)}:{node.lineno}" for path in paths for node in ast.walk(ast.parse(
             path.read_text())) if isinstance(node, ast.Import | ast.ImportFrom) and {
             (alias.name if isinstance(node, ast.Import) else node.module or "").split(".")[0]
             for alias in node.names} & {"pydantic", "pydantic_core"}]
    assert not named, f"device modules that import pydantic: {named}"
    modules = sorted(".".join(path.relative_to(REPO_ROOT).with_suffix("").parts) for path in paths
                     if path.stem not in ("__init__", "__main__"))  # __main__ modules run on import
    assert {"edge.rollout", "edge.updater.daemon", "edge.agent.service", "edge.serving.app"} <= set(modules)
    code = (f"import sys, {', '.join(modules)}; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'pydantic', 'pydantic_core'}))")
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert completed.returncode == 0 and completed.stdout.strip() == "[]", completed.stdout + completed.stderr


SERVE_THEN_LIST_MODULES = textwrap.dedent("""
    import sys
    from pathlib import Path

    import numpy as np
    from starlette.testclient import TestClient

    from edge.config import load_config
    from edge.serving.app import create_app

    root, keys, bundle = map(Path, sys.argv[1:4])
    config = load_config(["--store", str(root / "store"), "--public-keys", str(keys), "--admin-token", "t",
                          "--samples-dir", str(root / "samples"), "--upload-to", str(root / "outbox"),
                          "--device-id", "imports-test", "--sample-rate", "1"], environ={})
    with TestClient(create_app(config)) as client:
        admin = {"authorization": "Bearer t"}
        answers = [client.post("/v1/model/install", content=bundle.read_bytes(), headers=admin),
                   client.post("/v1/predict", json={"inputs": np.load(root / "inputs.npy").tolist()}),
                   client.get("/v1/model"), client.get("/metrics"), client.get("/readyz"),
                   client.post("/v1/model/install", content=b"not a bundle", headers=admin),
                   client.post("/v1/model/reload", headers=admin)]
    assert [answer.status_code for answer in answers] == [200, 200, 200, 200, 200, 422, 200], answers
    print(sorted({name.split(".")[0] for name in sys.modules} & {"pydantic", "pydantic_core"}))
""")


def test_a_service_that_installed_a_bundle_and_served_requests_has_imported_no_pydantic(tmp_path, bundle_kit):
    """Lazy imports included: a bundle installed (manifest and signature parsed), predictions, status, metrics."""
    import numpy as np

    np.save(tmp_path / "inputs.npy", bundle_kit.sample[:4])
    bundle = bundle_kit.bundle("v1", name="imports-v1.tar.gz")
    arguments = [str(tmp_path), str(bundle_kit.public_dir), str(bundle)]
    completed = subprocess.run([sys.executable, "-c", SERVE_THEN_LIST_MODULES, *arguments], cwd=REPO_ROOT,
                               capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0 and completed.stdout.strip().splitlines()[-1] == "[]", (
        completed.stdout + completed.stderr)


def test_a_python_whose_ssl_hides_openssl_verifies_with_cryptography_where_it_is_installed(monkeypatch):
    """python-build-standalone links OpenSSL statically into ``_ssl``: the control plane then verifies with
    ``cryptography`` (same verdicts); on a device without it, loading a key is a clear error."""
    import edge.signing as signing

    def hidden():
        raise signing.OpenSslUnavailable("Python's ssl module does not expose OpenSSL's Ed25519 (test)")

    monkeypatch.setattr(signing, "_libcrypto", hidden)
    signer = Ed25519PrivateKey.generate()
    device = PublicKey.from_pem(_pem(signer.public_key()))
    signature = signer.sign(b"manifest")
    assert _agree(signer, device, signature, b"manifest")
    assert not _agree(signer, device, signature, b"manifest!")
    monkeypatch.setitem(sys.modules, "cryptography.hazmat.primitives.asymmetric.ed25519", None)
    with pytest.raises(signing.OpenSslUnavailable, match="cryptography is not installed"):
        PublicKey(signer.public_key().public_bytes_raw())
