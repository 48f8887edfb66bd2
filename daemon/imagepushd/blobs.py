"""Where a push reads blobs from: containerd's content store or an image archive.

A :class:`BlobStore` answers three questions about a blob named by its descriptor: is it there,
what are its (small, verified) bytes, and which byte range of which file holds it. The graph
walk and the pusher need nothing else, so both work on any store, and every upload goes
through the one uploader (``push/registry/upload.py``) as a :class:`BlobSource`: a file, a
descriptor and an offset, streamed with ``pread`` and hashed as it is sent.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from imagepushd.errors import BlobCorruptError
from imagepushd.oci import Descriptor


@dataclass(frozen=True)
class BlobSource:
    """Bytes ``[offset, offset + size)`` of a file: a content-store blob or an archive member."""

    path: Path
    descriptor: Descriptor
    offset: int = 0


class BlobStore(Protocol):
    """What the graph walk and the pusher need of a place holding blobs."""

    def has(self, descriptor: Descriptor) -> bool:
        """Whether the blob is present with the descriptor's size (contents not checked)."""

    def read_bytes(self, descriptor: Descriptor, limit: int) -> bytes:
        """The whole blob, verified against its digest; refuses anything over ``limit``."""

    def source(self, descriptor: Descriptor) -> BlobSource:
        """The byte range holding the blob, for the uploader to stream (and verify)."""


def verify_bytes(data: bytes, descriptor: Descriptor) -> bytes:
    """``data`` if it has the descriptor's size and digest, else :class:`BlobCorruptError`."""
    if len(data) != descriptor.size:
        raise BlobCorruptError(
            f"blob {descriptor.digest} is {len(data)} bytes, its descriptor says {descriptor.size}"
        )
    algorithm, _, expected = descriptor.digest.partition(":")
    actual = hashlib.new(algorithm, data).hexdigest()
    if actual != expected:
        raise BlobCorruptError(
            f"blob {descriptor.digest} is corrupt: its content hashes to {algorithm}:{actual}"
        )
    return data
