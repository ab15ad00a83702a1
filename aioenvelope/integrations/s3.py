"""Amazon S3: stream a source into an object encrypted, and an object back decrypted, at
constant memory, through an aioboto3/aiobotocore S3 client that the caller owns. ::

    import aioboto3

    from aioenvelope.integrations.s3 import download_decrypted, upload_encrypted

    session = aioboto3.Session()
    async with EnvelopeClient(KmsKeyring("alias/uploads")) as client, session.client("s3") as s3:
        stored = await upload_encrypted(
            client, s3, request.stream(), bucket="b", key="k", encryption_context={"user": "u1"}
        )
        async with download_decrypted(
            client, s3, bucket="b", key="k", encryption_context={"user": "u1"}
        ) as plaintext:
            async for chunk in plaintext:
                ...

The object is an ordinary AWS Encryption SDK message: any ESDK (or the ``aioenvelope``
CLI) decrypts it after a plain download. Uploads of a part or more go up as a multipart
upload whose parts hold whole frames (the first also holds the header), so a part can be
fetched on its own with a ranged GET and its frames checked against the header. Smaller
messages go up with one ``PutObject``. A failed upload is aborted, so no parts are left
behind to be billed. The object's user metadata (``x-amz-meta-*``) says how it was
encrypted, for operators and inventory jobs, without a download or a KMS call:

==============================  =========================================================
``aioenvelope-format``          ``aws-encryption-sdk``
``aioenvelope-suite``           the algorithm suite ID, e.g. ``0x0478``
``aioenvelope-message-id``      the message ID, hex
``aioenvelope-frame-length``    the frame length in bytes
``aioenvelope-kms-key-arns``    the KMS keys that wrapped the data key, comma-separated
==============================  =========================================================

Metadata is not authenticated (anyone with ``s3:PutObject`` can change it): use it to
find objects, never to trust them; the message header is what decryption checks.
S3 errors (``NoSuchKey``, ``AccessDenied``...) come from your S3 client unchanged.

Bind each object to its name with the encryption context (``{"file": key}``, as the
example services do): an object renamed or copied to another key then fails its download
at the header, before any KMS call or plaintext, with
:class:`~aioenvelope.errors.EncryptionContextMismatchError`, instead of answering for a
name it was not written under. The web integrations' error handlers answer that with a
409, a truncated or altered object with a 422 (or, once streaming over HTTP/1.1, a body
cut off), and log a WARNING line for each.
"""

from __future__ import annotations

import math
from collections.abc import AsyncGenerator, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from ..client import EnvelopeClient
from ..errors import ConfigurationError
from ..format.header import MessageHeader
from ..format.suites import AlgorithmSuite
from ..streams import STEP, DecryptingStream, StreamSource

__all__ = [
    "DEFAULT_PART_SIZE",
    "METADATA_PREFIX",
    "S3UploadResult",
    "download_decrypted",
    "envelope_metadata",
    "upload_encrypted",
]

MIB = 1 << 20
DEFAULT_PART_SIZE = 8 * MIB
MIN_PART_SIZE = 5 * MIB  # S3's minimum for every part but the last
MAX_PARTS = 10_000  # S3's maximum number of parts in one upload
METADATA_PREFIX = "aioenvelope-"
_FRAME_OVERHEAD = 4 + 12 + 16  # a regular frame: sequence number, IV, tag
_FINAL_MARK = b"\xff\xff\xff\xff"  # the sequence-number field that opens the final frame
_MAX_METADATA = 1800  # S3 allows 2 KiB of user metadata in all; leave room for the rest


@dataclass(frozen=True)
class S3UploadResult:
    """Where the message went and what it is."""

    bucket: str
    key: str
    etag: str
    version_id: str | None
    parts: int
    """Parts uploaded: 1 for a single ``PutObject``."""
    size: int
    """Bytes stored: the whole message (header, frames, footer)."""
    header: MessageHeader


def envelope_metadata(header: MessageHeader) -> dict[str, str]:
    """The user metadata :func:`upload_encrypted` stores for a message with ``header``."""
    arns = sorted(
        {
            edk.provider_info.decode("utf-8", "replace")
            for edk in header.encrypted_data_keys
            if edk.provider_id == "aws-kms"
        }
    )
    meta = {
        f"{METADATA_PREFIX}format": "aws-encryption-sdk",
        f"{METADATA_PREFIX}suite": f"0x{header.algorithm_suite.suite_id:04X}",
        f"{METADATA_PREFIX}message-id": header.message_id.hex(),
        f"{METADATA_PREFIX}frame-length": str(header.frame_length),
    }
    if arns:
        joined = ",".join(arns)
        if len(joined) > _MAX_METADATA:  # many keys: say so rather than fail the upload
            joined = joined[: _MAX_METADATA - 4].rsplit(",", 1)[0] + ",..."
        meta[f"{METADATA_PREFIX}kms-key-arns"] = joined
    return meta


async def upload_encrypted(
    client: EnvelopeClient,
    s3: Any,
    source: StreamSource,
    *,
    bucket: str,
    key: str,
    encryption_context: Mapping[str, str] | None = None,
    algorithm_suite: AlgorithmSuite | None = None,
    frame_length: int | None = None,
    plaintext_length: int | None = None,
    part_size: int = DEFAULT_PART_SIZE,
    content_type: str = "application/octet-stream",
    metadata: Mapping[str, str] | None = None,
) -> S3UploadResult:
    """Encrypt ``source`` (anything :meth:`EnvelopeClient.encrypt_stream` takes) into the
    object ``bucket``/``key``, at constant memory: the part being filled, then while it
    goes up that part and the one copy botocore makes of it (about 2 x ``part_size``).

    Parts are ``part_size`` rounded to whole frames (at least S3's 5 MiB) and go up one
    at a time; for more throughput upload several objects concurrently. ``metadata`` is
    added to the object's own (see the module docs). ``s3`` is an aioboto3/aiobotocore
    S3 client; it stays open.
    """
    if isinstance(part_size, bool) or not isinstance(part_size, int) or part_size < 1:
        raise ConfigurationError(f"part_size must be a positive int; got {part_size!r}")
    stream = client.encrypt_stream(
        source,
        encryption_context=encryption_context,
        algorithm_suite=algorithm_suite,
        frame_length=frame_length,
        plaintext_length=plaintext_length,
    )
    async with stream:
        chunks = stream.__aiter__()
        first = await anext(chunks)  # the header, after the stream's one KMS call
        header = stream.header
        assert header is not None
        uploader = _MultipartUpload(s3, bucket, key, header, part_size, content_type, metadata)
        try:
            await uploader.add(first)
            async for chunk in chunks:
                await uploader.add(chunk)
            return await uploader.finish()
        except BaseException:
            with anyio.CancelScope(shield=True):
                await uploader.abort()
            raise


class _MultipartUpload:
    """Cuts the message into parts at frame boundaries and sends them.

    Regular frames all have the same size on the wire, so the boundaries are known from
    the header; only the final frame (opened by ``0xFFFFFFFF``) and the footer differ,
    and they always go in the last part. The walk over frame starts reads four bytes
    per frame to spot the final one.
    """

    def __init__(
        self,
        s3: Any,
        bucket: str,
        key: str,
        header: MessageHeader,
        part_size: int,
        content_type: str,
        metadata: Mapping[str, str] | None,
    ) -> None:
        self._s3, self._bucket, self._key, self._header = s3, bucket, key, header
        self._content_type = content_type
        self._metadata = {**envelope_metadata(header), **(metadata or {})}
        wire = header.frame_length + _FRAME_OVERHEAD
        self._wire = wire
        self._frames_per_part = max(part_size // wire, math.ceil(MIN_PART_SIZE / wire))
        self._part = bytearray()  # the part being filled, sent as it is (no copy)
        self._part_at = 0  # stream offset of _part[0]
        self._next_frame = -1  # stream offset of the next frame to check; set by add()
        self._final_seen = False
        self._cut = -1  # stream offset where the current part ends
        self._upload_id: str | None = None
        self._parts: list[dict[str, Any]] = []
        self._size = 0

    async def add(self, chunk: bytes) -> None:
        if self._next_frame < 0:  # the first chunk is the header
            self._next_frame = len(chunk)
            self._cut = len(chunk) + self._frames_per_part * self._wire
        view = memoryview(chunk)
        while len(view):
            room = self._cut - (self._part_at + len(self._part))
            if room <= 0:  # the final frame began before the cut: the rest is the last part
                self._part += view
                return
            self._part += view[:room]
            view = view[room:]
            self._walk()
            # Cut when the part's frames are all here and all regular.
            if self._part_at + len(self._part) == self._cut <= self._next_frame:
                part = self._take_part()
                self._part_at = self._cut
                self._cut += self._frames_per_part * self._wire
                await self._send(part)

    def _take_part(self) -> bytes:
        """The filled part as ``bytes``, the buffer dropped before the upload starts.

        Why not send the ``bytearray``: botocore copies a ``bytearray`` body twice more
        (20 MiB of peak heap for an 8 MiB part, measured) but a ``bytes`` body once.
        """
        part = bytes(self._part)
        self._part = bytearray()
        return part

    def _walk(self) -> None:
        """Step over the frames that have started, until the final one shows up."""
        end = self._part_at + len(self._part)
        while not self._final_seen and self._next_frame + 4 <= end:
            at = self._next_frame - self._part_at
            if self._part[at : at + 4] == _FINAL_MARK:
                self._final_seen = True
            else:
                self._next_frame += self._wire

    async def _send(self, part: bytes) -> None:
        if len(self._parts) >= MAX_PARTS:
            raise ConfigurationError(
                f"the message needs more than {MAX_PARTS} parts; pass a larger part_size"
            )
        if self._upload_id is None:
            created = await self._s3.create_multipart_upload(
                Bucket=self._bucket,
                Key=self._key,
                ContentType=self._content_type,
                Metadata=self._metadata,
            )
            self._upload_id = str(created["UploadId"])
        number = len(self._parts) + 1
        answer = await self._s3.upload_part(
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._upload_id,
            PartNumber=number,
            Body=part,
        )
        self._parts.append({"ETag": answer["ETag"], "PartNumber": number})
        self._size += len(part)

    async def finish(self) -> S3UploadResult:
        if self._upload_id is None:  # under one part: a single PutObject
            body = self._take_part()
            answer = await self._s3.put_object(
                Bucket=self._bucket,
                Key=self._key,
                Body=body,
                ContentType=self._content_type,
                Metadata=self._metadata,
            )
            return self._result(answer, parts=1, size=len(body))
        if self._part:
            await self._send(self._take_part())
        answer = await self._s3.complete_multipart_upload(
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": self._parts},
        )
        self._upload_id = None  # complete: nothing to abort any more
        return self._result(answer, parts=len(self._parts), size=self._size)

    def _result(self, answer: Mapping[str, Any], *, parts: int, size: int) -> S3UploadResult:
        return S3UploadResult(
            bucket=self._bucket,
            key=self._key,
            etag=str(answer.get("ETag", "")),
            version_id=answer.get("VersionId"),
            parts=parts,
            size=size,
            header=self._header,
        )

    async def abort(self) -> None:
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            await self._s3.abort_multipart_upload(
                Bucket=self._bucket, Key=self._key, UploadId=upload_id
            )


def download_decrypted(
    client: EnvelopeClient,
    s3: Any,
    *,
    bucket: str,
    key: str,
    encryption_context: Mapping[str, str] | None = None,
    allow_signed: bool = True,
    version_id: str | None = None,
) -> DecryptingStream:
    """The object ``bucket``/``key`` decrypted, as :meth:`EnvelopeClient.decrypt_stream`
    returns it: verified plaintext frame by frame, at constant memory.

    The GET is made when iteration starts; the response body is read in 1 MiB steps as
    fast as the plaintext is consumed and released however iteration ends (use
    ``async with``). A truncated or altered object raises before its last frame.
    """
    return client.decrypt_stream(
        _object_body(s3, bucket, key, version_id),
        encryption_context=encryption_context,
        allow_signed=allow_signed,
    )


async def _object_body(
    s3: Any, bucket: str, key: str, version_id: str | None
) -> AsyncGenerator[bytes, None]:
    request: dict[str, str] = {"Bucket": bucket, "Key": key}
    if version_id is not None:
        request["VersionId"] = version_id
    answer = await s3.get_object(**request)
    body = answer["Body"]
    async with body:  # releases the connection, read to the end or not
        while chunk := await body.read(STEP):
            yield chunk
