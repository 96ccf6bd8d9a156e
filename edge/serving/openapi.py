"""``python -m edge.serving.openapi``: print the edge service's OpenAPI document.

It is checked in as ``edge/serving/openapi.json``.

The routes do not depend on the store's content, so a throwaway store and key describe the API exactly.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def document() -> dict:
    from edge.config import ServeConfig
    from edge.serving.app import create_app

    with tempfile.TemporaryDirectory(prefix="edgeloop-openapi-") as scratch:
        root = Path(scratch)
        key = root / "throwaway.pub"
        key.write_bytes(Ed25519PrivateKey.generate().public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        config = ServeConfig(store=root / "store", public_keys=[key], samples_dir=root / "samples",
                             upload_to=str(root / "outbox"), device_id="openapi")
        return create_app(config).openapi()


if __name__ == "__main__":
    print(json.dumps(document(), indent=2, sort_keys=True))
