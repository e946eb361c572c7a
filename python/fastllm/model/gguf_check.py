"""Bounds check of a GGUF file's index before gguf's GGUFReader parses it.

GGUFReader trusts the file: a count past the end makes it loop reading zero bytes
(an array of 2^62 entries in a 68-byte file never returns and grows ~100 MB/s), and a
string length or tensor offset past the end is sliced silently. llama.cpp fails the
short read; this walk does the same, reading only the index (header, metadata,
tensor infos), never the tensor data:

  - every count times its element's minimum size fits in the bytes left, so no loop
    runs longer than the file is long;
  - every string length is inside the file;
  - every tensor has at most GGML_MAX_DIMS dims, a known type, a row length that is a
    whole number of blocks, an aligned offset, and its data inside the file.

Errors are ValueErrors naming the field and its offset.
"""
from __future__ import annotations

import mmap
import os
import struct

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4                  # GGML_MAX_DIMS
MAX_ARRAY_NESTING = 4         # arrays of arrays: GGUFReader recurses per level
_DEFAULT_ALIGNMENT = 32

# GGUFValueType -> fixed size in bytes (STRING = 8 and ARRAY = 9 are variable).
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_MIN_KV_BYTES = 8 + 4 + 1            # key length, value type, smallest value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # name length, n_dims, type, offset


class _Cursor:
    """A read position over the file's bytes that never goes past the end."""

    def __init__(self, buf, size: int, endian: str):
        self.buf, self.size, self.pos, self.endian = buf, size, 0, endian

    def left(self) -> int:
        return self.size - self.pos

    def skip(self, n: int, what: str) -> int:
        if n < 0 or n > self.left():
            raise ValueError(f"{what} at offset {self.pos} needs {n} bytes but the file has "
                             f"{self.left()} left (truncated or corrupt)")
        start = self.pos
        self.pos += n
        return start

    def unpack(self, fmt: str, what: str):
        start = self.skip(struct.calcsize(fmt), what)
        return struct.unpack_from(self.endian + fmt, self.buf, start)[0]

    def string(self, what: str) -> bytes:
        length = self.unpack("Q", f"{what} length")
        start = self.skip(length, what)
        return bytes(self.buf[start:start + length])

    def count(self, what: str, min_item_bytes: int) -> int:
        n = self.unpack("Q", what)
        if n * min_item_bytes > self.left():
            raise ValueError(f"{what} = {n} at offset {self.pos - 8}: {n} items of at least "
                             f"{min_item_bytes} bytes cannot fit in the {self.left()} bytes left")
        return n


def check_gguf_file(path: str) -> None:
    """Raise ValueError (naming the field) unless `path`'s GGUF index is in bounds."""
    size = os.path.getsize(path)
    if size < 4 + 4 + 8 + 8:
        raise ValueError(f"file is {size} bytes, too short for a GGUF header")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        check_gguf_bytes(buf, size)


def check_gguf_bytes(buf, size: int) -> None:
    if bytes(buf[:4]) != GGUF_MAGIC:
        raise ValueError("not a GGUF file (bad magic)")
    version = struct.unpack_from("<I", buf, 4)[0]
    endian = "<"
    if version & 0xFFFF == 0:                 # written on a big-endian host (as GGUFReader reads it)
        endian, version = ">", struct.unpack_from(">I", buf, 4)[0]
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
    cur = _Cursor(buf, size, endian)
    cur.pos = 8
    tensor_count = cur.unpack("Q", "tensor_count")
    kv_count = cur.count("kv_count", _MIN_KV_BYTES)
    if tensor_count * _MIN_TENSOR_INFO_BYTES > cur.left():
        raise ValueError(f"tensor_count = {tensor_count}: that many tensor infos cannot fit "
                         f"in the {cur.left()} bytes left")
    alignment = _check_metadata(cur, kv_count)
    infos = _check_tensor_infos(cur, tensor_count)
    data_start = -(-cur.pos // alignment) * alignment
    for name, offset, nbytes in infos:
        if offset % alignment:
            raise ValueError(f"tensor {name!r}: data offset {offset} is not a multiple of "
                             f"general.alignment ({alignment})")
        if data_start + offset + nbytes > size:
            raise ValueError(f"tensor {name!r}: data [{data_start + offset}, "
                             f"{data_start + offset + nbytes}) lies past the end of the file "
                             f"({size} bytes)")


def _check_metadata(cur: _Cursor, kv_count: int) -> int:
    """Walk the key/value section; returns general.alignment (default 32)."""
    alignment, keys = _DEFAULT_ALIGNMENT, set()
    for i in range(kv_count):
        key_bytes = cur.string(f"metadata key #{i}")
        try:
            key = key_bytes.decode("utf-8")
        except UnicodeDecodeError:
            raise ValueError(f"metadata key #{i} is not valid UTF-8") from None
        if key in keys:
            raise ValueError(f"metadata key {key!r} appears twice")
        keys.add(key)
        value_type = cur.unpack("I", f"metadata {key!r} type")
        if key == "general.alignment":
            if value_type != _UINT32:
                raise ValueError("metadata 'general.alignment' must be a uint32")
            alignment = cur.unpack("I", "general.alignment")
            if alignment == 0 or alignment & (alignment - 1):
                raise ValueError(f"general.alignment = {alignment} is not a power of two")
            continue
        _skip_value(cur, value_type, f"metadata {key!r}", depth=0)
    return alignment


def _min_value_bytes(value_type: int) -> int:
    if value_type in _SCALAR_SIZES:
        return _SCALAR_SIZES[value_type]
    return 8 if value_type == _STRING else 4 + 8      # string length / array type + count


def _skip_value(cur: _Cursor, value_type: int, what: str, depth: int) -> None:
    if value_type in _SCALAR_SIZES:
        cur.skip(_SCALAR_SIZES[value_type], what)
    elif value_type == _STRING:
        cur.string(what)
    elif value_type == _ARRAY:
        if depth >= MAX_ARRAY_NESTING:
            raise ValueError(f"{what}: arrays nested deeper than {MAX_ARRAY_NESTING} levels")
        item_type = cur.unpack("I", f"{what} item type")
        if item_type not in _SCALAR_SIZES and item_type not in (_STRING, _ARRAY):
            raise ValueError(f"{what}: unknown array item type {item_type}")
        n = cur.count(f"{what} array length", _min_value_bytes(item_type))
        if item_type in _SCALAR_SIZES:
            cur.skip(n * _SCALAR_SIZES[item_type], what)
        elif item_type == _STRING:
            _skip_strings(cur, n, what)
        else:
            for j in range(n):     # each item takes >= 8 bytes: bounded by the file
                _skip_value(cur, item_type, f"{what}[{j}]", depth + 1)
    else:
        raise ValueError(f"{what}: unknown value type {value_type}")


def _skip_strings(cur: _Cursor, n: int, what: str) -> None:
    """n strings back to back (a vocabulary: ~10^5 of them), the hot loop of the walk."""
    unpack, buf, pos, size = struct.Struct(cur.endian + "Q").unpack_from, cur.buf, cur.pos, cur.size
    for j in range(n):
        if pos + 8 > size:
            cur.pos = pos
            cur.skip(8, f"{what}[{j}] length")
        length = unpack(buf, pos)[0]
        pos += 8
        if length > size - pos:
            cur.pos = pos
            cur.skip(length, f"{what}[{j}]")
        pos += length
    cur.pos = pos


def _check_tensor_infos(cur: _Cursor, tensor_count: int) -> list:
    """-> [(name, data offset, data bytes)], every field checked."""
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    infos, names = [], set()
    for i in range(tensor_count):
        raw_name = cur.string(f"tensor #{i} name")
        name = raw_name.decode("utf-8", errors="replace")
        if name in names:
            raise ValueError(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = cur.unpack("I", f"tensor {name!r} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ValueError(f"tensor {name!r}: n_dims = {n_dims}, expected 1..{MAX_DIMS}")
        dims = [cur.unpack("Q", f"tensor {name!r} dim {d}") for d in range(n_dims)]
        raw_type = cur.unpack("I", f"tensor {name!r} type")
        offset = cur.unpack("Q", f"tensor {name!r} offset")
        try:
            block_size, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(raw_type)]
        except (ValueError, KeyError):
            raise ValueError(f"tensor {name!r}: unknown ggml type {raw_type}") from None
        if dims[0] % block_size:
            raise ValueError(f"tensor {name!r}: row length {dims[0]} is not a multiple of its "
                             f"type's block size {block_size}")
        n_elements = 1
        for d in dims:
            n_elements *= d          # Python ints: no overflow; bounded by the size check
        nbytes = n_elements // block_size * type_size
        if nbytes > cur.size:
            raise ValueError(f"tensor {name!r}: dims {dims} need {nbytes} bytes, more than the "
                             f"whole file ({cur.size} bytes)")
        infos.append((name, offset, nbytes))
    return infos
