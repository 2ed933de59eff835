"""The text chunks of a PNG file (tEXt, zTXt, iTXt), read without decoding any pixels.

Pillow only reaches chunks stored after the image data by decoding the image (and every
frame of an APNG); this reader walks the chunk headers and seeks past everything else, so
a 12000 x 12000 PNG costs a few reads. Each text is capped: a longer one is reported by its
length instead of being read.
"""

import struct
import zlib
from dataclasses import dataclass, field

SIGNATURE = b"\x89PNG\r\n\x1a\n"
TEXT_CHUNKS = (b"tEXt", b"zTXt", b"iTXt")
MAX_KEYWORD = 80  # the PNG specification's limit
MAX_CHUNKS = 100_000  # far more than any real PNG (an APNG frame is two or three chunks)


@dataclass
class PngText:
    width: int = 0
    height: int = 0
    text: dict = field(default_factory=dict)      # keyword -> text
    too_long: dict = field(default_factory=dict)  # keyword -> bytes it holds (not read)


class NotPng(ValueError):
    """The file is not a PNG."""


class BrokenPng(ValueError):
    """The file starts like a PNG but its chunks are broken."""


def read_png_text(path, max_chars) -> PngText:
    """Width, height and text chunks of the PNG at ``path``; texts over ``max_chars``
    characters are listed in ``too_long``. NotPng when the file is not a PNG."""
    try:
        return _read(path, max_chars)
    except struct.error:
        raise BrokenPng("the file ends inside a chunk") from None


def _read(path, max_chars):
    result = PngText()
    with open(path, "rb") as handle:
        if handle.read(8) != SIGNATURE:
            raise NotPng("not a PNG file")
        for count in range(MAX_CHUNKS):
            header = handle.read(8)
            if not header:
                break
            length, kind = struct.unpack(">I4s", header)
            if not kind.isalpha() or (count == 0) != (kind == b"IHDR"):
                raise BrokenPng(f"broken chunk structure (chunk {count} is {kind!r})")
            if kind == b"IHDR":
                result.width, result.height = struct.unpack(">II", handle.read(8))
                handle.seek(length - 8 + 4, 1)
            elif kind in TEXT_CHUNKS:
                _read_text_chunk(handle, kind, length, max_chars, result)
                handle.seek(4, 1)  # CRC
            elif kind == b"IEND":
                break
            else:
                handle.seek(length + 4, 1)
        else:
            raise BrokenPng(f"more than {MAX_CHUNKS:,} chunks")
    return result


def _read_text_chunk(handle, kind, length, max_chars, result):
    # UTF-8 takes at most 4 bytes a character; the headers of iTXt add a few more
    limit = max_chars * 4 + 2 * MAX_KEYWORD + 8
    head = handle.read(min(length, MAX_KEYWORD + 1))
    keyword, _, _ = head.partition(b"\0")
    key = keyword.decode("latin-1")
    if length > limit:
        handle.seek(length - len(head), 1)
        result.too_long[key] = length
        return
    body = (head + handle.read(length - len(head)))[len(keyword) + 1:]
    try:
        text = _decode(kind, body, limit)
    except (ValueError, zlib.error, UnicodeDecodeError):
        return  # a damaged text chunk carries no prompt
    if text is None or len(text) > max_chars:
        result.too_long[key] = length
    else:
        result.text.setdefault(key, text)


def _decode(kind, body, limit):
    """The chunk's text, or None when it inflates past ``limit`` bytes."""
    if kind == b"tEXt":
        return body.decode("latin-1")
    if kind == b"zTXt":
        return _inflate(body[1:], limit, "latin-1")  # body[0] is the method (0: zlib)
    compressed, _method = body[0], body[1]
    _language, _, rest = body[2:].partition(b"\0")
    _translated, _, text = rest.partition(b"\0")
    return _inflate(text, limit, "utf-8") if compressed else text.decode("utf-8")


def _inflate(data, limit, encoding):
    inflater = zlib.decompressobj()
    raw = inflater.decompress(data, limit + 1)
    return None if len(raw) > limit else raw.decode(encoding)
