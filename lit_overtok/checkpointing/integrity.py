"""Whether a checkpoint on disk is the one that was written: every byte, every structure, one line when it is not.

* **A checkpoint file** is torch's zip archive of *stored* members (torch never compresses), each carrying the CRC-32
  of its bytes (``files.save_atomically`` forces them on). ``verify_checkpoint`` checks the archive's structure as
  strictly as torch's own reader needs it, not only the member CRCs (a flipped bit in the central directory passes a
  CRC check and then fails ``torch.load``): the end record points at a central directory that ends where the file
  ends; every central record repeats its member's local header (version, flags, method, time, CRC, sizes, name);
  the members are stored, lie back to back from byte 0 up to the central directory, and each reads back to its
  CRC-32; and torch's reader (miniz) opens the archive and finds every member.
* **A sharded checkpoint** (a folder: torch.distributed.checkpoint's ``*.distcp`` shards and ``.metadata``, and
  Lightning's ``meta.pt``; ``distributed.strategies``) gets ``checksums.json`` when it is saved: the size and CRC-32
  of every file in it. ``verify_checkpoint`` checks each against it, so a flipped byte in a rank's shard, a truncated
  shard, an empty ``meta.pt`` or a missing file is one ``CheckpointError`` naming the file. A folder saved before
  the checksums were written is read with a warning that it cannot be verified.

Every reader calls ``verify_checkpoint`` before it opens a checkpoint (``files.load_verified``, the resume,
``inference.read_checkpoint``).
"""

from __future__ import annotations

import json
import os
import struct
import warnings
import zipfile
import zlib
from pathlib import Path
from typing import Optional, Union

from lit_overtok.errors import InputError

PathLike = Union[str, os.PathLike]
CHECKSUMS_NAME = "checksums.json"
SHARDED_METADATA = ".metadata"  # torch.distributed.checkpoint's index of a sharded checkpoint
_LOCAL_HEADER, _CENTRAL_HEADER = b"PK\x03\x04", b"PK\x01\x02"
_LOCAL_SIZE, _CENTRAL_SIZE, _END_SIZE = 30, 46, 22
_CHUNK = 1 << 20


class CheckpointError(InputError):
    """A checkpoint that is missing, damaged or cannot be written; the message names the file."""


def is_sharded_checkpoint(path: PathLike) -> bool:
    path = Path(path)
    return path.is_dir() and ((path / SHARDED_METADATA).is_file() or (path / CHECKSUMS_NAME).is_file())


def verify_checkpoint(path: PathLike) -> None:
    """Refuse (``CheckpointError``, one line naming the file) a checkpoint file or folder that is not as written.

    A checkpoint verified before in this process and unchanged since (the same files, sizes and modification times)
    is not read again: a resume reads it three times (the CLI's choice, its config check, Lightning's load)."""
    path = Path(path)
    stamp = _stamp(path)
    if stamp is not None and _verified.get(str(path.resolve())) == stamp:
        return
    if path.is_dir():
        _verify_folder(path)
    else:
        _verify_file(path)
    if stamp is not None:
        _verified[str(path.resolve())] = stamp


_verified: dict[str, tuple] = {}


def _stamp(path: Path) -> Optional[tuple]:
    """What must not change for an earlier verification to stand: every file's size and modification time, and
    (timestamps are coarse) the CRC-32 of a file's last 64 KiB, where its zip directory lies."""
    try:
        if path.is_dir():
            return tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(path.iterdir()))
        with open(path, "rb") as stream:
            size = os.fstat(stream.fileno()).st_size
            stream.seek(max(0, size - 65536))
            return size, os.fstat(stream.fileno()).st_mtime_ns, zlib.crc32(stream.read())
    except OSError:
        return None


def _verify_file(path: Path) -> None:
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" + (" (a link to a removed file)" if path.is_symlink() else ""))
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            if not any(member.filename.endswith("/data.pkl") for member in members):
                raise CheckpointError(f"{path} is not a torch checkpoint (a zip file without data.pkl)")
            _verify_structure(path, archive, members, size)
            damaged = archive.testzip()
    except zipfile.BadZipFile as error:
        raise CheckpointError(f"{path} is not a complete checkpoint ({size} bytes: {'empty' if size == 0 else error}; "
                              "truncated by a crash or a full disk, or not a checkpoint at all)") from None
    except CheckpointError:
        raise
    except (OSError, EOFError, RuntimeError, ValueError, zlib.error, struct.error) as error:
        # zipfile reports damaged headers several ways
        raise CheckpointError(f"{path} is damaged ({type(error).__name__}: {' '.join(str(error).split())})") from None
    if damaged is not None:
        raise CheckpointError(f"{path} is damaged: the bytes of {damaged!r} do not match the CRC-32 stored when it "
                              "was written (changed on disk after saving); use an earlier checkpoint")
    _open_with_torch(path)


def _verify_structure(path: Path, archive: zipfile.ZipFile, members: list[zipfile.ZipInfo], size: int) -> None:
    def damaged(what: str) -> CheckpointError:
        return CheckpointError(f"{path} is damaged: {what} (its zip structure changed on disk after saving); "
                               "use an earlier checkpoint")

    central_start = archive.start_dir
    with open(path, "rb") as stream:
        stream.seek(central_start)
        central = stream.read(size - central_start)
        position, expected_offset = 0, 0
        for member in sorted(members, key=lambda m: m.header_offset):
            if member.compress_type != zipfile.ZIP_STORED or member.compress_size != member.file_size:
                raise damaged(f"member {member.filename!r} claims compression or two sizes")
            if member.header_offset != expected_offset:
                raise damaged(f"member {member.filename!r} starts at byte {member.header_offset}, not at "
                              f"{expected_offset} where the one before it ends")
            stream.seek(member.header_offset)
            local = stream.read(_LOCAL_SIZE)
            if len(local) < _LOCAL_SIZE or local[:4] != _LOCAL_HEADER:
                raise damaged(f"no local header for {member.filename!r} at byte {member.header_offset}")
            name_length, extra_length = struct.unpack("<HH", local[26:30])
            name = stream.read(name_length)
            if name.decode("utf-8", "replace") != member.filename:
                raise damaged(f"member {member.filename!r} is named {name!r} in its local header")
            record = _central_record(central, position, member, damaged)
            # version needed, flags, method, time, date and name length: the same bytes in both headers
            if record[6:16] + record[28:30] != local[4:14] + local[26:28]:
                raise damaged(f"the central directory's record of {member.filename!r} disagrees with its local header")
            expected_offset = member.header_offset + _LOCAL_SIZE + name_length + extra_length + member.compress_size
            if member.flag_bits & 0x08:  # torch's writer puts the CRC and sizes in a descriptor after the data
                stream.seek(expected_offset)
                zip64 = record[20:24] == b"\xff\xff\xff\xff"
                descriptor = stream.read(24 if zip64 else 16)
                if len(descriptor) < 16 or descriptor[:4] != b"PK\x07\x08":
                    raise damaged(f"no data descriptor after the bytes of {member.filename!r}")
                expected_offset += len(descriptor)
                written = struct.unpack("<IQQ" if zip64 else "<III", descriptor[4:])
            else:
                written = struct.unpack("<III", local[14:26])
            if written != (member.CRC, member.compress_size, member.file_size):
                raise damaged(f"the CRC-32 or size of {member.filename!r} differs between the central directory and "
                              "where it was written beside the bytes")
            position += len(record)
    if expected_offset != central_start:
        raise damaged(f"the members end at byte {expected_offset}, the central directory starts at {central_start}")
    end = central[position:]
    if end[:4] == b"PK\x06\x06":  # zip64 (over 4 GiB): its end records follow; zipfile has checked their counts
        return
    if len(end) != _END_SIZE or end[:4] != b"PK\x05\x06":
        raise damaged(f"{len(end)} bytes after the central directory where its 22-byte end record belongs")
    disk, central_disk, here, total, central_size, offset, comment = struct.unpack("<HHHHIIH", end[4:22])
    if (disk, central_disk, comment) != (0, 0, 0) or here != total or total != len(members) \
            or central_size != position or offset != central_start:
        raise damaged("the end record does not describe the central directory")


def _central_record(central: bytes, position: int, member: zipfile.ZipInfo, damaged) -> bytes:
    header = central[position:position + _CENTRAL_SIZE]
    if len(header) < _CENTRAL_SIZE or header[:4] != _CENTRAL_HEADER:
        raise damaged(f"the central directory's record of {member.filename!r} is missing")
    name_length, extra_length, comment_length, disk = struct.unpack("<HHHH", header[28:36])
    if comment_length or disk or header[38] & 0x10:  # 0x10: MS-DOS's directory attribute, which torch's reader obeys
        raise damaged(f"the central directory's record of {member.filename!r} has a comment, a disk number or the "
                      "directory attribute")
    return central[position:position + _CENTRAL_SIZE + name_length + extra_length]


def _open_with_torch(path: Path) -> None:
    """torch's own reader (miniz) must open the archive and find every member: what ``torch.load`` does first."""
    import torch

    try:
        reader = torch._C.PyTorchFileReader(str(path))
        reader.get_all_records()
    except Exception as error:  # torch raises RuntimeError with a C++ backtrace
        raise CheckpointError(f"{path} is damaged: torch cannot open it ({str(error).splitlines()[0]})") from None


# ------------------------------------------------------------------------------------------- sharded folders
def file_crc32(path: Path) -> int:
    crc = 0
    with open(path, "rb") as stream:
        while chunk := stream.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def write_folder_checksums(folder: PathLike) -> None:
    """Record the size and CRC-32 of every file in a sharded checkpoint ``folder`` (after every rank has written)."""
    folder = Path(folder)
    files = {p.name: {"bytes": p.stat().st_size, "crc32": file_crc32(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != CHECKSUMS_NAME}
    temporary = folder / f".{CHECKSUMS_NAME}.{os.getpid()}.partial"
    with open(temporary, "w") as stream:
        json.dump({"files": files}, stream, indent=1)
        stream.flush()
        os.fsync(stream.fileno())
    os.replace(temporary, folder / CHECKSUMS_NAME)


def _verify_folder(folder: Path) -> None:
    listing = folder / CHECKSUMS_NAME
    if not listing.is_file():
        if not (folder / SHARDED_METADATA).is_file():
            raise CheckpointError(f"{folder} is a folder, not a checkpoint (no {SHARDED_METADATA} or {CHECKSUMS_NAME})")
        warnings.warn(f"{folder} was saved without {CHECKSUMS_NAME} (before checksums were written): "
                      "its files cannot be verified")
        return
    try:
        files = json.loads(listing.read_text())["files"]
    except (ValueError, KeyError, TypeError) as error:
        raise CheckpointError(f"{listing} is damaged ({type(error).__name__}); the folder cannot be verified") from None
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing from the sharded checkpoint {folder} (listed in {CHECKSUMS_NAME})")
        size = path.stat().st_size
        if size != expected["bytes"]:
            raise CheckpointError(f"{path} is {size} bytes, {expected['bytes']} when it was saved (truncated or "
                                  "replaced); use an earlier checkpoint")
        if file_crc32(path) != expected["crc32"]:
            raise CheckpointError(f"{path} is damaged: its bytes do not match the CRC-32 recorded in {CHECKSUMS_NAME} "
                                  "when it was saved; use an earlier checkpoint")
