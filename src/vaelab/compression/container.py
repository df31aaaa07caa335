"""The compressed file: what it holds, and every way reading it can fail, checked first.

    b"VAELABBB" | header length (uint32) | header (JSON) | the stack's words (uint32) | SHA-256

All integers are little-endian. The header names the format version, the images' shape and
count, how they were coded (latent precision, chunk sizes, the seeded words and how many of
them the decoder draws again), the model (a fingerprint of its weights and the run it came
from), and where the images go back to (an IDX file's name or the folder's file names). The
SHA-256 covers everything before it, so a truncated or altered file is refused before any
decoding.
"""

import hashlib
import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaelab.compression.bitsback import Coded
from vaelab.errors import BadValue, MissingFile

MAGIC = b"VAELABBB"
FORMAT = 2
READABLE = (1, 2)  # format 1 stored every seeded word (shared_words 0)
DIGEST = 32


class DamagedFile(BadValue):
    """A file that is not a complete vaelab-compress file."""


def fingerprint(vae) -> str:
    """SHA-256 of the model's parameters and buffers, by name: the same weights, the same
    fingerprint, wherever the run dir lies."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        array = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{array.dtype}:{list(array.shape)};".encode())
        digest.update(array.numpy().tobytes() if array.dtype != torch.bfloat16
                      else array.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()


def images_digest(images: torch.Tensor) -> str:
    return hashlib.sha256(images.contiguous().numpy().tobytes()).hexdigest()


def pack(header: dict[str, Any], coded: Coded) -> bytes:
    """The file's bytes."""
    header = {**header, "format": FORMAT, "sizes": coded.sizes, "initial_words": coded.initial,
              "shared_words": coded.shared, "seed": coded.seed}
    text = json.dumps(header, separators=(",", ":")).encode()
    body = MAGIC + struct.pack("<I", len(text)) + text + coded.words.astype("<u4").tobytes()
    return body + hashlib.sha256(body).digest()


def unpack(path: Path) -> tuple[dict[str, Any], Coded]:
    """The header and the coded stack of a file, or one message saying why it cannot be read."""
    if not path.is_file():
        raise MissingFile(f"{path} does not exist")
    data = path.read_bytes()
    if not data.startswith(MAGIC):
        raise DamagedFile(f"{path} is not a file written by vaelab-compress (it does not begin "
                          f"with {MAGIC.decode()})")
    body, digest = data[:-DIGEST], data[-DIGEST:]
    if len(data) < len(MAGIC) + 4 + DIGEST or hashlib.sha256(body).digest() != digest:
        raise DamagedFile(f"{path} is damaged: its checksum does not match its contents "
                          f"(truncated, or bytes changed since it was written); nothing was "
                          f"decoded")
    (length,) = struct.unpack_from("<I", body, len(MAGIC))
    start = len(MAGIC) + 4
    header = json.loads(body[start:start + length])
    if header.get("format") not in READABLE:
        raise DamagedFile(f"{path} is in format {header.get('format')}; this vaelab reads "
                          f"formats {', '.join(map(str, READABLE))}")
    words = np.frombuffer(body[start + length:], dtype="<u4").astype(np.uint32)
    coded = Coded(words, [int(s) for s in header["sizes"]], int(header["initial_words"]),
                  int(header["seed"]), int(header.get("shared_words", 0)))
    if not 0 <= coded.shared <= coded.initial or min(coded.sizes, default=0) < 1:
        raise DamagedFile(f"{path} is damaged: its header's chunk sizes or counts of seeded "
                          f"words cannot come from vaelab-compress; nothing was decoded")
    return header, coded
