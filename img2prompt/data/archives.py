"""Reading untrusted zip archives and files without trusting their sizes.

Members are checked from the archive's index first (encrypted, a compression method
Python cannot read, over the size limit, or compressed so far that it is likely a zip
bomb) and then streamed in chunks with the size limit enforced on the bytes actually
produced, since an index can lie. zipfile checks each member's CRC when it reaches the end.
Memory stays at one chunk whatever the archive holds.
"""

import io
import lzma
import zipfile
import zlib

from img2prompt.errors import DataError, shown

CHUNK = 1 << 20
MAX_IMAGE_BYTES = 256 << 20   # an uncompressed 64-megapixel RGBA image is 256 MB
MAX_TABLE_BYTES = 64 << 20    # a DiffusionDB part's JSON table is about 0.5 MB
MAX_COMPRESSION_RATIO = 200   # PNG and JPEG do not compress; a member shrunk 200:1 is a bomb
RATIO_CHECKED_ABOVE = 1 << 20  # small files (a flat BMP) may compress far; they cost nothing
READABLE_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
# what a corrupt member or stream raises while it is read
READ_ERRORS = (zipfile.BadZipFile, zlib.error, lzma.LZMAError, EOFError, OSError, RuntimeError,
               NotImplementedError, ValueError)


class TooLarge(DataError):
    """A member or file produced more bytes than the limit allows."""


def member_problem(info: zipfile.ZipInfo, limit=MAX_IMAGE_BYTES):
    """Why a member must not be read, judged from the archive's index, else None."""
    if info.flag_bits & 0x1:
        return "is encrypted; only unencrypted archives can be read."
    if info.compress_type not in READABLE_METHODS:
        return (f"uses compression method {info.compress_type}, which cannot be read (stored, "
                "deflate, bzip2 and lzma can).")
    if info.file_size > limit:
        return f"is {info.file_size:,} bytes uncompressed, over the limit of {limit:,}."
    ratio = info.file_size / max(info.compress_size, 1)
    if info.file_size > RATIO_CHECKED_ABOVE and ratio > MAX_COMPRESSION_RATIO:
        return (f"expands {ratio:,.0f}:1 ({info.compress_size:,} to {info.file_size:,} bytes), "
                f"over the limit of {MAX_COMPRESSION_RATIO}:1 (a zip bomb?).")
    return None


def copy_capped(source, target, limit, what):
    """Copy the binary stream ``source`` into ``target`` in chunks; TooLarge past ``limit``."""
    copied = 0
    while chunk := source.read(CHUNK):
        copied += len(chunk)
        if copied > limit:
            raise TooLarge(f"{what}: more than {limit:,} bytes, over the limit; not read further.")
        target.write(chunk)
    return copied


class _Discard:
    def write(self, data):
        pass


def read_member(bundle: zipfile.ZipFile, info: zipfile.ZipInfo, limit, target=None):
    """Stream one member into ``target`` (a binary file; None reads it for its CRC only);
    return its size. DataError naming the member when the index or the data is wrong."""
    what = f"{bundle.filename}: member {shown(info.filename)}"
    problem = member_problem(info, limit)
    if problem:
        raise DataError(f"{what} {problem}")
    try:
        with bundle.open(info) as source:
            return copy_capped(source, target if target is not None else _Discard(), limit, what)
    except TooLarge:
        raise
    except READ_ERRORS as error:
        raise DataError(f"{what} is corrupt ({type(error).__name__}: {error}).") from None


def read_member_bytes(bundle, info, limit) -> bytes:
    """A small member (a table) in memory, within ``limit``."""
    buffer = io.BytesIO()
    read_member(bundle, info, limit, buffer)
    return buffer.getvalue()


def check_archive(path, limit=MAX_IMAGE_BYTES):
    """Read every member of a zip archive within the limits (CRC checked); DataError naming
    the archive and member otherwise."""
    try:
        with zipfile.ZipFile(path) as bundle:
            for info in bundle.infolist():
                if not info.is_dir():
                    read_member(bundle, info, max(limit, MAX_TABLE_BYTES))
    except zipfile.BadZipFile as error:
        raise DataError(f"{path}: not a readable zip archive ({error}).") from None
