"""The compressed file: what it holds, and every way reading it can fail, checked first.

    b"VAELABBB" | header length (uint32) | header | the stack's words (uint32) | SHA-256

All integers are little-endian. The header names the format version, the images' shape and
count, how they were coded (latent precision, chunk sizes, the seeded words and how many of
them the decoder draws again, the sizes of the first images' WebP files), the model (a
fingerprint of its weights and the run it came from), and where the images go back to (an IDX
file's name or the folder's file names), as JSON, zlib-compressed from format 3 on. The SHA-256
covers everything before it, so a truncated or altered file is refused before any decoding.
"""

import hashlib
import json
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from vaelab.compression.bitsback import Coded
from vaelab.errors import BadValue, MissingFile

MAGIC = b"VAELABBB"
FORMAT = 3
READABLE = (1, 2, 3)  # 1 stored every seeded word (shared_words 0); 2 had no WebP first image
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
              "shared_words": coded.shared, "seed": coded.seed,
              "lead_bytes": coded.lead_bytes, "lead_labels": coded.lead_labels}
    text = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
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
    text = body[start:start + length]
    try:  # formats 1 and 2 wrote plain JSON, which begins with a brace
        header = json.loads(text if text[:1] == b"{" else zlib.decompress(text))
    except (zlib.error, ValueError) as err:
        raise DamagedFile(f"{path} is damaged: its header cannot be read ({err}); nothing was "
                          f"decoded") from err
    if header.get("format") not in READABLE:
        raise DamagedFile(f"{path} is in format {header.get('format')}; this vaelab reads "
                          f"formats {', '.join(map(str, READABLE))}")
    words = np.frombuffer(body[start + length:], dtype="<u4").astype(np.uint32)
    labels = header.get("lead_labels")
    coded = Coded(words, [int(s) for s in header["sizes"]], int(header["initial_words"]),
                  int(header["seed"]), int(header.get("shared_words", 0)),
                  [int(b) for b in header.get("lead_bytes", [])],
                  None if labels is None else [int(y) for y in labels])
    if not 0 <= coded.shared <= coded.initial or any(size < 1 for size in coded.sizes) \
            or any(size < 1 for size in coded.lead_bytes) \
            or sum(coded.lead_bytes) > 4 * len(words) \
            or not coded.sizes and not coded.lead_bytes \
            or labels is not None and len(labels) != len(coded.lead_bytes):
        raise DamagedFile(f"{path} is damaged: its header's chunk sizes, counts of seeded "
                          f"words or WebP sizes cannot come from vaelab-compress; nothing was "
                          f"decoded")
    return header, coded
