"""A GGUF file's scalar metadata and tensor index, read straight from its header.

The `gguf` package's reader turns every array element of the metadata into numpy views; for a
model with a 49K-token vocabulary and 48K merges that is ~3-6 s per open, paid at every start
(the weight check and the loader both open the file). The tokenizer arrays are not needed here
(the tokenizer comes from transformers' own GGUF conversion, cached at first use), so this walks
past them and keeps the scalars and strings. Tensor data stay in a read-only memory map, as
`gguf.GGUFReader` leaves them, ready for `gguf.quants.dequantize`.

Layout (GGUF v2/v3, little-endian): magic, version u32, tensor count u64, metadata count u64;
metadata (key string, type u32, value); tensor infos (name string, n_dims u32, dims u64..., type
u32, offset u64); data from the next multiple of `general.alignment` (default 32).
"""

from __future__ import annotations

import struct
from typing import Any, NamedTuple

import numpy as np

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFTensor(NamedTuple):
    name: str
    shape: tuple[int, ...]  # torch order: the fastest axis last (GGUF lists it first)
    qtype: Any  # gguf.GGMLQuantizationType
    data: np.ndarray  # uint8 view of the file, for gguf.quants.dequantize


class GGUFFile:
    def __init__(self, path: str):
        import gguf

        self.path = path
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        buf = memoryview(mm)
        if bytes(buf[:4]) != b"GGUF":
            raise ValueError(f"{path} is not a GGUF file")
        self.version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        pos = 24
        self.fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key, pos = _string(buf, pos)
            (kind,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            value, pos = _value(buf, pos, kind)
            if value is not _SKIPPED:
                self.fields[key] = value
        infos = []
        for _ in range(n_tensors):
            name, pos = _string(buf, pos)
            (n_dims,), pos = struct.unpack_from("<I", buf, pos), pos + 4
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos)
            pos += 8 * n_dims
            qtype, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            infos.append((name, dims, gguf.GGMLQuantizationType(qtype), offset))
        align = int(self.fields.get("general.alignment", 32))
        start = -(-pos // align) * align
        self.tensors = []
        for name, dims, qtype, offset in infos:
            block, size = gguf.GGML_QUANT_SIZES[qtype]
            n = int(np.prod(dims)) if dims else 1
            begin = start + offset
            data = mm[begin: begin + n // block * size]
            shape = tuple(int(d) for d in reversed(dims))
            self.tensors.append(GGUFTensor(name, shape, qtype, data))

    def field(self, key: str) -> Any:
        return self.fields.get(key)


_SKIPPED = object()


def _string(buf, pos: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, pos)
    return bytes(buf[pos + 8: pos + 8 + n]).decode("utf-8", errors="replace"), pos + 8 + n


def _value(buf, pos: int, kind: int) -> tuple[Any, int]:
    if kind in _SCALARS:
        fmt = _SCALARS[kind]
        return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
    if kind == _STRING:
        return _string(buf, pos)
    if kind != _ARRAY:
        raise ValueError(f"unknown GGUF metadata type {kind} at byte {pos}")
    elem, count = struct.unpack_from("<IQ", buf, pos)
    pos += 12
    if elem in _SCALARS:  # numeric arrays: skipped whole
        return _SKIPPED, pos + count * struct.calcsize(_SCALARS[elem])
    for _ in range(count):  # strings (vocabularies): walk their lengths only
        if elem == _STRING:
            (n,) = struct.unpack_from("<Q", buf, pos)
            pos += 8 + n
        else:
            _, pos = _value(buf, pos, elem)
    return _SKIPPED, pos
