"""Row files: a safetensors file whose tensors all hold one row per item (a document's
chunk states), written row batch by row batch at fixed offsets (memory: one batch) and
read back row by row, each row checked against its own SHA-256.

A table of the row digests, the header's layout and its metadata are covered by one
entry digest: plain SHA-256, or HMAC-SHA-256 under a secret key. The files are valid
safetensors files (``safe_open`` reads them).
"""

from __future__ import annotations

import errno
import hashlib
import hmac as _hmac
import json
import os
import struct
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ..errors import StateFormatError
from .safedir import SafeDir

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["RowFileWriter", "RowFile", "read_safetensors_metadata", "ROW_DIGESTS", "ENTRY_DIGEST_KEY"]

ENTRY_DIGEST_KEY = "oprm_rag.digest"
#: The tensor holding one SHA-256 per row, [n, 32] uint8.
ROW_DIGESTS = "oprm_rag.row_sha256"
_ENTRY_DOMAIN = b"oprm-rag row file v1\x00"
MAX_HEADER_BYTES = 64 * 2**20
_IO_SLICE = 8 * 2**20  # bytes per read or write call

_ST_DTYPES: dict[str, str] = {  # torch dtype name -> safetensors dtype code
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL",
}
_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _write_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data[:_IO_SLICE], offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        data, offset = data[n:], offset + n


def _read_into(fd: int, buf: memoryview, offset: int) -> None:
    while len(buf):
        chunk = buf[:_IO_SLICE]
        if hasattr(os, "preadv"):
            n = os.preadv(fd, [chunk], offset)
        else:  # pragma: no cover - platforms without preadv
            data = os.pread(fd, len(chunk), offset)
            n = len(data)
            chunk[:n] = data
        if n <= 0:
            raise StateFormatError("the file ended early (truncated)")
        buf, offset = buf[n:], offset + n


def _bytes_of(t: "torch.Tensor") -> memoryview:
    import torch

    t = t.detach().contiguous().cpu().reshape(-1)
    return memoryview(t.view(torch.uint8).numpy()) if t.numel() else memoryview(b"")


def _st_dtype(dtype: "torch.dtype") -> str:
    code = _ST_DTYPES.get(str(dtype).replace("torch.", ""))
    if code is None:
        raise ValueError(f"cannot store tensors of dtype {dtype}")
    return code


def _torch_dtype(code: str) -> "torch.dtype":
    import torch

    for name, c in _ST_DTYPES.items():
        if c == code:
            return getattr(torch, name)
    raise StateFormatError(f"unknown tensor dtype {code!r}")


def _entry_digest(meta: dict[str, str], layout: dict[str, Any], row_table: bytes, key: bytes | None) -> str:
    body = json.dumps({"meta": {k: v for k, v in meta.items() if k != ENTRY_DIGEST_KEY}, "tensors": layout},
                      sort_keys=True, separators=(",", ":")).encode()
    if key is None:
        return "sha256:" + hashlib.sha256(_ENTRY_DOMAIN + body + row_table).hexdigest()
    return "hmac-sha256:" + _hmac.new(key, _ENTRY_DOMAIN + body + row_table, hashlib.sha256).hexdigest()


class RowFileWriter:
    """Write a row file batch by batch; nothing is visible under ``name`` until :meth:`commit`.

    The layout is fixed by the first batch (names, dtypes and per-row shapes of its
    tensors) and ``n_rows``; rows go to their final offsets in a pre-allocated temp file
    (a full disk fails there, before anything is written). Any exception leaves the temp
    file for :meth:`abort` (which the owner must call; :meth:`commit` cleans up itself on
    failure). Not thread-safe: one writer, one thread at a time.
    """

    def __init__(self, directory: SafeDir, name: str, n_rows: int, metadata: dict[str, str],
                 key: bytes | None = None) -> None:
        if n_rows < 1:
            raise ValueError("a row file needs at least one row")
        self.dir = directory
        self.name = name
        self.n_rows = int(n_rows)
        self.meta = {str(k): str(v) for k, v in metadata.items()}
        self.key = key
        self.tmp_name: str | None = None
        self.fd: int | None = None
        self.specs: dict[str, tuple[str, tuple[int, ...], int]] | None = None  # name -> (dtype, row shape, row bytes)
        self.offsets: dict[str, int] = {}
        self.data_start = 0
        self.digests = bytearray(32 * self.n_rows)
        self.written = bytearray(self.n_rows)
        self.size = 0

    # -- layout
    def _layout(self, tensors: dict[str, "torch.Tensor"]) -> None:
        specs = {}
        for name in sorted(tensors):
            t = tensors[name]
            row_shape = tuple(int(s) for s in t.shape[1:])
            n = 1
            for s in row_shape:
                n *= s
            specs[name] = (_st_dtype(t.dtype), row_shape, n * t.element_size())
        self.specs = specs
        header: dict[str, Any] = {}
        offset = 0
        for name, (code, row_shape, row_bytes) in specs.items():
            size = row_bytes * self.n_rows
            header[name] = {"dtype": code, "shape": [self.n_rows, *row_shape], "data_offsets": [offset, offset + size]}
            self.offsets[name] = offset
            offset += size
        header[ROW_DIGESTS] = {"dtype": "U8", "shape": [self.n_rows, 32],
                               "data_offsets": [offset, offset + 32 * self.n_rows]}
        self.offsets[ROW_DIGESTS] = offset
        data_bytes = offset + 32 * self.n_rows
        self.layout = {k: [v["dtype"], v["shape"], v["data_offsets"]] for k, v in header.items()}
        placeholder = dict(self.meta)
        placeholder[ENTRY_DIGEST_KEY] = ("hmac-sha256:" if self.key is not None else "sha256:") + "0" * 64
        self.header_json = self._header_bytes(header, placeholder)
        self.header_obj = header
        self.data_start = len(self.header_json)  # the 8-byte length and the JSON
        self.size = self.data_start + data_bytes
        self.tmp_name, self.fd = self.dir.create_temp(f".{self.name}.")
        try:
            os.posix_fallocate(self.fd, 0, self.size)
        except AttributeError:  # pragma: no cover - no posix_fallocate (macOS)
            os.ftruncate(self.fd, self.size)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", -1)):
                raise
            os.ftruncate(self.fd, self.size)

    @staticmethod
    def _header_bytes(header: dict[str, Any], meta: dict[str, str]) -> bytes:
        raw = json.dumps({"__metadata__": meta, **header}, separators=(",", ":")).encode()
        raw += b" " * (-(8 + len(raw)) % 8)  # data 8-byte aligned, as safetensors writes it
        return struct.pack("<Q", len(raw)) + raw

    # -- rows
    def write_rows(self, indices: Sequence[int], tensors: dict[str, "torch.Tensor"]) -> None:
        """Rows ``indices`` (one per batch row of every tensor) to their places in the file."""
        if self.specs is None:
            self._layout(tensors)
        assert self.specs is not None and self.fd is not None
        if set(tensors) != set(self.specs):
            raise ValueError(f"row file tensors changed: {sorted(tensors)} vs {sorted(self.specs)}")
        k = len(indices)
        views = {}
        for name, (code, row_shape, row_bytes) in self.specs.items():
            t = tensors[name]
            if _st_dtype(t.dtype) != code or tuple(t.shape[1:]) != row_shape or int(t.shape[0]) != k:
                raise ValueError(f"{name}: rows of {t.dtype} {tuple(t.shape)} do not match the file's layout")
            views[name] = (_bytes_of(t), row_bytes)
        for j, i in enumerate(indices):
            if not 0 <= int(i) < self.n_rows:
                raise IndexError(f"row {i} outside 0..{self.n_rows - 1}")
            h = hashlib.sha256()
            for name, (view, row_bytes) in views.items():
                row = view[j * row_bytes:(j + 1) * row_bytes]
                h.update(_row_prefix(name, self.specs[name]))
                h.update(row)
                _write_all(self.fd, row, self.data_start + self.offsets[name] + int(i) * row_bytes)
            self.digests[32 * int(i):32 * (int(i) + 1)] = h.digest()
            self.written[int(i)] = 1

    @property
    def complete(self) -> bool:
        return self.specs is not None and all(self.written)

    def commit(self) -> None:
        """Row digests, the header with the entry digest, fsync, and the rename into place."""
        if not self.complete or self.fd is None or self.tmp_name is None:
            missing = self.n_rows - sum(self.written)
            raise ValueError(f"row file incomplete: {missing} of {self.n_rows} rows never written")
        try:
            table = bytes(self.digests)
            _write_all(self.fd, memoryview(table), self.data_start + self.offsets[ROW_DIGESTS])
            meta = dict(self.meta)
            meta[ENTRY_DIGEST_KEY] = _entry_digest(self.meta, self.layout, table, self.key)
            header = self._header_bytes(self.header_obj, meta)
            if len(header) != len(self.header_json):  # pragma: no cover - the digest has a fixed length
                raise ValueError("header length changed")
            _write_all(self.fd, memoryview(header), 0)
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
            self.dir.rename(self.tmp_name, self.name)
            self.tmp_name = None
            self.dir.fsync()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Close and delete the temp file (idempotent, never raises)."""
        if self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None
        if self.tmp_name is not None:
            try:
                self.dir.unlink(self.tmp_name)
            except OSError:
                pass
            self.tmp_name = None


def _row_prefix(name: str, spec: tuple[str, tuple[int, ...], int]) -> bytes:
    return f"{name}|{spec[0]}|{list(spec[1])}|".encode()


def _read_header(fd: int, size: int) -> tuple[dict[str, Any], int]:
    if size < 8:
        raise StateFormatError("file too short for a safetensors header")
    head = bytearray(8)
    _read_into(fd, memoryview(head), 0)
    (n,) = struct.unpack("<Q", bytes(head))
    if n > MAX_HEADER_BYTES or n > size - 8:
        raise StateFormatError(f"header length {n} does not fit the file")
    raw = bytearray(n)
    _read_into(fd, memoryview(raw), 8)
    try:
        header = json.loads(bytes(raw))
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateFormatError(f"header is not JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise StateFormatError("header is not a JSON object")
    return header, 8 + n


def read_safetensors_metadata(fd: int) -> dict[str, str]:
    """The ``__metadata__`` of the safetensors file open at ``fd`` (only the header is read)."""
    header, _ = _read_header(fd, os.fstat(fd).st_size)
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise StateFormatError("metadata is not an object")
    return {str(k): str(v) for k, v in meta.items()}


class RowFile:
    """A row file open for reading: header checked on open, entry digest by :meth:`verify`,
    every row checked against its digest as it is read. Holds the descriptor it is given."""

    def __init__(self, fd: int, name: str = "row file") -> None:
        self.fd = fd
        self.name = name
        size = os.fstat(fd).st_size
        header, self.data_start = _read_header(fd, size)
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise StateFormatError("metadata is not an object of strings")
        self.meta: dict[str, str] = meta
        table = header.get(ROW_DIGESTS)
        if not isinstance(table, dict) or table.get("dtype") != "U8" or not isinstance(table.get("shape"), list) \
                or len(table["shape"]) != 2 or table["shape"][1] != 32:
            raise StateFormatError("no row digest table")
        self.n_rows = int(table["shape"][0])
        if self.n_rows < 1:
            raise StateFormatError("no rows")
        self.specs: dict[str, tuple[str, tuple[int, ...], int]] = {}
        self.offsets: dict[str, int] = {}
        spans = []
        for name, info in header.items():
            if not isinstance(info, dict):
                raise StateFormatError(f"{name}: not a tensor entry")
            code, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
            if code not in _SIZES or not isinstance(shape, list) or not all(isinstance(s, int) and s >= 0
                                                                              for s in shape) \
                    or not isinstance(offs, list) or len(offs) != 2 or not all(isinstance(o, int) for o in offs):
                raise StateFormatError(f"{name}: bad tensor entry")
            if not shape or shape[0] != self.n_rows:
                raise StateFormatError(f"{name}: {shape[0] if shape else 0} rows, expected {self.n_rows}")
            row = 1
            for s in shape[1:]:
                row *= s
            row_bytes = row * _SIZES[code]
            if offs[1] - offs[0] != row_bytes * self.n_rows:
                raise StateFormatError(f"{name}: data size does not match its shape")
            spans.append((offs[0], offs[1]))
            if name != ROW_DIGESTS:
                self.specs[name] = (code, tuple(shape[1:]), row_bytes)
            self.offsets[name] = offs[0]
        spans.sort()
        end = 0
        for a, b in spans:
            if a != end:
                raise StateFormatError("tensor data overlaps or leaves holes")
            end = b
        if self.data_start + end != size:
            raise StateFormatError(f"file holds {size} bytes, its header describes {self.data_start + end} "
                                   "(truncated or padded)")
        self.layout = {k: [v["dtype"], v["shape"], v["data_offsets"]] for k, v in header.items()}
        self.specs = dict(sorted(self.specs.items()))
        self._digests: bytes | None = None

    def verify(self, key: bytes | None) -> None:
        """Check the entry digest (header, layout, row digests); raise ``StateFormatError``."""
        stored = self.meta.get(ENTRY_DIGEST_KEY, "")
        if key is not None and not stored.startswith("hmac-sha256:"):
            raise StateFormatError("entry has no keyed checksum (written without the cache key)")
        if key is None and stored.startswith("hmac-sha256:"):
            raise StateFormatError("entry has a keyed checksum; set the same cache key to read it")
        table = bytearray(32 * self.n_rows)
        _read_into(self.fd, memoryview(table), self.data_start + self.offsets[ROW_DIGESTS])
        want = _entry_digest(self.meta, self.layout, bytes(table), key)
        if not _hmac.compare_digest(want, stored):
            raise StateFormatError("entry checksum mismatch (file corrupt, edited or relabelled)")
        self._digests = bytes(table)

    @property
    def row_nbytes(self) -> int:
        return sum(spec[2] for spec in self.specs.values())

    def read_rows(self, indices: Iterable[int]) -> dict[str, "torch.Tensor"]:
        """Rows ``indices`` of every tensor, each row checked against its digest."""
        import torch

        if self._digests is None:
            raise StateFormatError("verify() the entry before reading rows")
        idx = [int(i) for i in indices]
        for i in idx:
            if not 0 <= i < self.n_rows:
                raise IndexError(f"row {i} outside 0..{self.n_rows - 1}")
        out = {name: torch.empty((len(idx), *shape), dtype=_torch_dtype(code))
               for name, (code, shape, _) in self.specs.items()}
        views = {name: _bytes_of_writable(t) for name, t in out.items()}
        for j, i in enumerate(idx):
            h = hashlib.sha256()
            for name, spec in self.specs.items():
                row_bytes = spec[2]
                row = views[name][j * row_bytes:(j + 1) * row_bytes]
                _read_into(self.fd, row, self.data_start + self.offsets[name] + i * row_bytes)
                h.update(_row_prefix(name, spec))
                h.update(row)
            if not _hmac.compare_digest(h.digest(), self._digests[32 * i:32 * (i + 1)]):
                raise StateFormatError(f"{self.name}: row {i} does not match its checksum (file changed or corrupt)")
        return out


def _bytes_of_writable(t: "torch.Tensor") -> memoryview:
    import torch

    flat = t.reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(bytearray())
