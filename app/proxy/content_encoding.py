"""Compressed request bodies (`Content-Encoding: zstd` or `gzip`), inflated within a bound.

Codex sends its /v1/responses bodies zstd-compressed, and Ollama takes them since 0.16.3.
The gateway inflates such a body before it checks it (key, model, quota, policy) and
forwards it decompressed. A few kilobytes can inflate to gigabytes, so the output is
produced in bounded steps and inflating stops one byte past the limit: a bomb costs at
most the limit plus one step of memory, never its inflated size.
"""
import zlib

import zstandard

from app.errors import BadRequest, GatewayError

CODINGS = {"gzip": "gzip", "x-gzip": "gzip", "zstd": "zstd"}
STEP = 64 * 1024  # most output bytes asked for at a time
# Ollama's own bound on a zstd window (WithDecoderMaxMemory(8 << 20)): a frame that asks
# for more is refused rather than given that much memory.
ZSTD_MAX_WINDOW = 8 * 1024 * 1024


class UnsupportedEncoding(GatewayError):
    status, kind = 415, "invalid_request_error"
    refusal = "invalid"


def coding(headers):
    """"gzip", "zstd" or None (no coding, or identity); 415 for any other."""
    values = [v.strip().lower() for header in headers.getlist("Content-Encoding")
              for v in header.split(",") if v.strip()]
    values = [v for v in values if v != "identity"]
    if not values:
        return None
    if len(values) == 1 and values[0] in CODINGS:
        return CODINGS[values[0]]
    raise UnsupportedEncoding(
        f"Content-Encoding {', '.join(values)!r} is not supported: send the body "
        "uncompressed, or compressed once with zstd or gzip")


def inflate(chunks, name, room):
    """Yield the decompressed pieces of the compressed `chunks`, each at most `room()`
    bytes and one STEP; 400 if they are malformed.

    A stream cut short is refused, not taken for the part of the body it holds.
    """
    try:
        yield from (_gunzip if name == "gzip" else _unzstd)(chunks, room)
    except (zlib.error, zstandard.ZstdError) as exc:
        raise BadRequest(f"request body is not valid {name} data (Content-Encoding: {name}): "
                         f"{exc}") from None


def _gunzip(chunks, room):
    decoder, fed = _gzip_decoder(), False
    for data in chunks:
        fed = True
        while True:
            if decoder.eof and data:  # another member follows: gzip streams may be joined
                decoder = _gzip_decoder()
            wanted = max(1, min(STEP, room()))
            out = decoder.decompress(data, wanted)
            if out:
                yield out
            if decoder.eof:
                data = decoder.unused_data
            else:
                data = decoder.unconsumed_tail
                if not data and len(out) < wanted:  # all taken in, nothing held back
                    break
            if not data and decoder.eof:
                break
    while fed and not decoder.eof:  # output zlib still holds back, with no input left
        out = decoder.decompress(b"", max(1, min(STEP, room())))
        if not out:
            raise zlib.error("the compressed data ends before its end (truncated)")
        yield out


def _gzip_decoder():
    return zlib.decompressobj(16 + zlib.MAX_WBITS)  # gzip's header and trailer, not zlib's


def _unzstd(chunks, room):
    source = _Source(chunks)
    reader = zstandard.ZstdDecompressor(max_window_size=ZSTD_MAX_WINDOW).stream_reader(
        source, read_size=STEP, read_across_frames=True)
    while out := reader.read(max(1, min(STEP, room()))):
        yield out
    if not source.frames.at_an_end:  # zstandard's reader returns a cut frame's part silently
        raise zstandard.ZstdError("the compressed data ends inside a frame (truncated)")


class _Source:
    """The compressed chunks as the file zstandard's reader reads from."""

    def __init__(self, chunks):
        self._chunks = iter(chunks)
        self._left = memoryview(b"")
        self.frames = _Frames()

    def read(self, size):
        if not self._left:
            self._left = memoryview(next(self._chunks, b""))  # sliced without copies
        data, self._left = self._left[:size], self._left[size:]
        self.frames.feed(data)
        return data


class _Frames:
    """Where the zstd frames of a stream end, from their headers (RFC 8878, 3.1)."""

    def __init__(self):
        self._header = bytearray()
        self._want, self._then = 4, self._magic  # header bytes wanted, and what reads them
        self._skip = 0  # bytes of content to pass over
        self._checksum = 0

    @property
    def at_an_end(self):
        return self._then == self._magic and not self._header and not self._skip

    def feed(self, data):
        at = 0
        while at < len(data):
            if self._skip:
                taken = min(self._skip, len(data) - at)
                self._skip, at = self._skip - taken, at + taken
                continue
            taken = min(self._want - len(self._header), len(data) - at)
            self._header += data[at:at + taken]
            at += taken
            if len(self._header) == self._want:
                header = int.from_bytes(self._header, "little")
                self._header.clear()
                self._then(header)

    def _magic(self, magic):
        if magic & 0xFFFFFFF0 == 0x184D2A50:  # a skippable frame: its size, then its bytes
            self._want, self._then = 4, self._skippable
        else:  # a zstd frame (anything else the decoder refuses)
            self._want, self._then = 1, self._descriptor

    def _skippable(self, size):
        self._skip, self._want, self._then = size, 4, self._magic

    def _descriptor(self, d):
        single_segment = d >> 5 & 1
        self._checksum = 4 if d >> 2 & 1 else 0
        rest = ((not single_segment) + (0, 1, 2, 4)[d & 3]
                + (single_segment, 2, 4, 8)[d >> 6])  # window, dictionary id, content size
        self._want, self._then = (rest, self._frame_header) if rest else (3, self._block)

    def _frame_header(self, _):
        self._want, self._then = 3, self._block

    def _block(self, header):
        kind, size = header >> 1 & 3, header >> 3
        self._skip = 1 if kind == 1 else size  # an RLE block is one byte
        if header & 1:  # the last block: then the checksum, then the next frame
            self._skip += self._checksum
            self._want, self._then = 4, self._magic
