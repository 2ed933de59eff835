"""Keep freed memory in the process heap while models run on the CPU.

A CNN forward pass allocates and frees activation buffers of tens of MB per batch. glibc
hands such blocks back to the kernel at once (mmap/munmap), and the kernel must then fault
in and zero fresh pages on the next batch: measured on this project's 2-core machine, half
of the CPU time went to the kernel and EfficientNet-Lite0 ran about 3× slower than with
freed blocks kept for reuse. The price is that the heap's high-water mark stays resident.
"""

import ctypes
import functools
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt parameters, from glibc's malloc.h
_LARGEST = 2**31 - 1
_applied = False


@functools.cache
def _glibc():
    """glibc's handle, or None on other platforms or C libraries."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def keep_freed_memory():
    """Tell glibc's malloc to reuse freed large blocks instead of returning them (idempotent).

    Does nothing on other platforms or C libraries.
    """
    global _applied
    if _applied or (libc := _glibc()) is None:
        return
    libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(_LARGEST))
    libc.mallopt(M_TRIM_THRESHOLD, ctypes.c_int(_LARGEST))
    _applied = True

