"""Where fused weights go while the pass runs, and how any weight left out of memory is read.

A sink takes each new initializer's array as soon as a block is fused and hands back an
external-data reference (location, offset, length) for the TensorProto:

- DataSink appends the bytes to the output's data file (external-data output);
- MemorySink keeps the array itself until the writer splices it into the output file
  (inline output), so it is never copied into a protobuf message.

TensorReader reads an external-data tensor for the pass, wherever it lives: in a sink (a
block fused in an earlier round can be a branch of the next), else on disk beside the model.
"""

from __future__ import annotations

import os

import numpy as np
import onnx

from . import skeleton
from .external import external_info, read_external

INLINE_LIMIT = 1024  # tensors below this many bytes stay inside the .onnx file (onnx's default)
ALIGN = 4096  # page-aligned offsets let runtimes mmap external tensors
SMALL_ALIGN = 64


class _Sink:
    """A sink's tensors are the ones it named, pointing at its location."""

    location: str
    names: set[str]
    # bytes of every new tensor offered by rewrite.spill, kept inline or not: the fused model's
    # tensors are at most the loaded model's plus these
    offered_bytes: int = 0

    def holds(self, tensor: onnx.TensorProto) -> bool:
        return tensor.name in self.names and external_info(tensor).get("location") == self.location


class DataSink(_Sink):
    """Appends tensor bytes to one external data file; hands back (location, offset, length)."""

    threshold = INLINE_LIMIT

    def __init__(self, path: str):
        self.path = path
        self.location = os.path.basename(path)
        self.names: set[str] = set()
        self._file = None
        self._size = 0

    def _open(self):
        if self._file is None:
            self._file = open(self.path, "wb")
        return self._file

    def _pad_to(self, align: int) -> int:
        f = self._open()
        pad = (-self._size) % align
        if pad:
            f.write(b"\0" * pad)
            self._size += pad
        return self._size

    def put(self, array: np.ndarray, name: str) -> tuple[str, int, int]:
        self.names.add(name)
        offset = self._pad_to(ALIGN if array.nbytes >= (1 << 20) else SMALL_ALIGN)
        self._open().write(byte_view(array) if array.nbytes else b"")
        self._size += array.nbytes
        return self.location, offset, array.nbytes

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        if self._file is not None:
            self._file.flush()
        return read_external(tensor, os.path.dirname(self.path))

    def put_file_range(self, source: str, offset: int, length: int) -> int:
        """Copy `length` bytes of `source` from `offset`; return the new offset."""
        new_offset = self._pad_to(ALIGN if length >= (1 << 20) else SMALL_ALIGN)
        f = self._open()
        f.flush()
        copy_range(source, offset, length, f.fileno())
        self._size += length
        return new_offset

    def put_bytes(self, data) -> int:
        offset = self._pad_to(ALIGN if len(data) >= (1 << 20) else SMALL_ALIGN)
        self._open().write(data)
        self._size += len(data)
        return offset

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class MemorySink(_Sink):
    """Keeps each fused array (read-only, little-endian) until the output is written."""

    # Smaller arrays are parsed into the model as usual: the skeleton's cut, below which
    # keeping a tensor out of protobuf costs more than it saves.
    threshold = skeleton.MIN_BYTES
    location = "<onnx_repvgg: in memory>"  # never written out: the writer inlines these tensors

    def __init__(self) -> None:
        self.arrays: list[np.ndarray] = []
        self.names: set[str] = set()

    def put(self, array: np.ndarray, name: str) -> tuple[str, int, int]:
        array = np.ascontiguousarray(array)
        array.flags.writeable = False
        self.names.add(name)
        self.arrays.append(array)
        return self.location, len(self.arrays) - 1, array.nbytes

    def array(self, tensor: onnx.TensorProto) -> np.ndarray:
        return self.arrays[int(external_info(tensor)["offset"])]

    def read(self, tensor: onnx.TensorProto) -> np.ndarray:
        return self.array(tensor).reshape(tuple(tensor.dims))


class TensorReader:
    """Reads an external-data tensor from the sink that holds it, else from `base_dir`."""

    def __init__(self, base_dir: str | None, sink=None):
        self.base_dir = base_dir or ""
        self.sink = sink

    def __call__(self, tensor: onnx.TensorProto) -> np.ndarray:
        if self.sink is not None and self.sink.holds(tensor):
            return self.sink.read(tensor)
        return read_external(tensor, self.base_dir)


def copy_range(source: str, offset: int, length: int, out_fd: int) -> None:
    """Append `length` bytes of file `source` from `offset` to the open descriptor `out_fd`
    (at its current position): in the kernel where it can, through a buffer where it cannot."""
    with open(source, "rb", buffering=0) as src:
        fd = src.fileno()
        left = length
        position = offset
        if hasattr(os, "copy_file_range"):
            try:
                while left:
                    done = os.copy_file_range(fd, out_fd, left, position)
                    if done == 0:
                        break
                    left -= done
                    position += done
            except OSError:
                pass  # e.g. EXDEV or an unsupported file system: copy what is left by hand
        while left:
            chunk = os.pread(fd, min(left, 1 << 24), position)
            if not chunk:
                raise OSError(f"{source} ended early")
            write_all(out_fd, chunk)
            left -= len(chunk)
            position += len(chunk)


def byte_view(array: np.ndarray) -> memoryview:
    """The bytes of a C-contiguous array, without a copy."""
    return array.reshape(-1).view(np.uint8).data


def write_all(fd: int, data) -> None:
    view = memoryview(data).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]
