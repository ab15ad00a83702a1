"""Where the parts of a framed message lie: the header's end, each frame, the footer.

Tampering tests flip or cut bytes at exact places, so they need the offsets the format
puts things at. The header's length comes from the public ``aioenvelope.inspect``; the
frame sizes are the format's fixed overheads.
"""

from __future__ import annotations

import aioenvelope

REGULAR_OVERHEAD = 4 + 12 + 16  # sequence number, IV, tag
FINAL_OVERHEAD = 4 + 4 + 12 + 4 + 16  # end marker, sequence number, IV, length, tag


def header_length(message: bytes) -> int:
    """Bytes of ``message`` taken by its header (with the header's IV and tag)."""
    return aioenvelope.inspect(message).header_length


def body_end(message: bytes, frame_length: int, plaintext_length: int) -> int:
    """Offset where the final frame ends (the footer starts, for signed messages)."""
    n = plaintext_length
    regular = (n - 1) // frame_length if n else 0
    final = n - regular * frame_length
    return (
        header_length(message)
        + regular * (frame_length + REGULAR_OVERHEAD)
        + (FINAL_OVERHEAD + final)
    )
