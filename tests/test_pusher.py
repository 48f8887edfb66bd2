"""The push engine's pure parts: the result it reports."""

from __future__ import annotations

import json

from imagepushd.oci import OCI_MANIFEST
from imagepushd.push.pusher import PushResult

# ---------------------------------------------------------------------- result


def test_push_result_json() -> None:
    result = PushResult("reg/app:1", "sha256:" + "a" * 64, OCI_MANIFEST, ["linux/amd64"])
    result.pushed_blobs = 2
    result.bytes_sent = 1234
    assert result.to_json() == {
        "target": "reg/app:1",
        "digest": "sha256:" + "a" * 64,
        "media_type": OCI_MANIFEST,
        "platforms": ["linux/amd64"],
        "attestations": 0,
        "pushed_blobs": 2,
        "skipped_blobs": 0,
        "mounted_blobs": 0,
        "bytes_sent": 1234,
        "manifests": 0,
        "up_to_date": False,
    }
    json.dumps(result.to_json())  # serialisable as it is
