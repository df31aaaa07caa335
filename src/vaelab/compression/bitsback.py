"""Bits-back coding with asymmetric numeral systems (BB-ANS; Townsend, Bird & Barber, 2019).

A latent-variable model with a discrete likelihood becomes a lossless codec: to code an image x,
decode a latent z from the stack with the posterior q(z|x) (taking bits back), encode x with
p(x|z), then z with the prior. Each image adds -log p(x|z) - log p(z) + log q(z|x) bits: its
negative ELBO, in expectation. `constriction` supplies the ANS coder and its quantized models; the
model supplies every probability through `encode`, `decode` and `prior`.

Latents are coded on a grid: each dimension is cut into 2^precision bins of equal prior mass, a bin
standing for the prior's quantile at its middle, so the prior of a bin is uniform. Images are coded
a chunk at a time (one pass of the nets per chunk); the first chunks are small, because a chunk
can only take back the bits the images before it left on the stack.

The first image has no bits before it to take back: its latents are drawn from seeded words that
the file must carry. Where that costs more, the first image is stored instead as a lossless WebP
file (libwebp, through Pillow) whose bytes are the bits the next image's latents take back (as
HiLLoC, Townsend et al. 2020, started its chain with a FLIF file).
"""

import io
import math
from dataclasses import dataclass, field

import constriction
import numpy as np
import torch
from PIL import Image
from torch.distributions import Distribution, Normal

from vaelab.errors import BadValue
from vaelab.likelihoods import bin_masses
from vaelab.models.vae import independent_normal

CATEGORICAL = constriction.stream.model.Categorical(perfect=False)
# A posterior's bins span its mean +- 6 sd: the mass outside, 2e-9, is below the smallest
# probability of constriction's 24-bit tables.
WINDOW_SIGMAS = 6.0
TABLE_ENTRIES = 2**17  # probabilities per coder call: 2**22 ran at half the speed (memory)
# Bits left on the stack below any draw: ANS draws from its 64-bit head, and a head that runs
# low gives draws that are not q's (each then costs bits instead of giving them back).
RESERVE_BITS = 128
LEAD_MODES = {1: "L", 3: "RGB", 4: "RGBA"}  # channels -> the Pillow mode WebP stores them in


def check_codable(vae) -> None:
    """A codec needs a probability for each value, and one layer of factorized latents."""
    likelihood = type(vae.likelihood).__name__
    if not vae.likelihood.discrete:
        raise BadValue(
            f"this run's likelihood ({likelihood}) is a density over continuous values; a "
            f"lossless codec needs the probability of each value. Train with "
            f"likelihood=bernoulli (binary images), likelihood=dlogistic or likelihood=gaussian "
            f"likelihood.discretized=true (8-bit images)")
    if len(vae.layer_sizes) != 1:
        raise BadValue(
            f"{type(vae).__name__} has {len(vae.layer_sizes)} stochastic layers; bits-back "
            f"coding here codes one layer of latents (model=mlp, conv, conv_images, cvae)")


def diagonal(distribution: Distribution, what: str) -> Normal:
    """The per-dimension Normal of a diagonal Gaussian, or a clear refusal."""
    base = independent_normal(distribution)
    if base is None:
        raise BadValue(f"the model's {what} ({type(distribution).__name__}) is not a diagonal "
                       f"Gaussian, so its latents cannot be cut into bins per dimension (the "
                       f"VampPrior's mixture, for one); code a run with the standard prior")
    return base


@dataclass
class Block:
    """Latent values whose posterior bins are coded together: `width` bins from `start`."""

    index: torch.Tensor  # positions in the chunk's flattened latents
    start: torch.Tensor
    width: int


class BitsBack:
    """The codec of one model. `precision`: bits per latent dimension's grid; `chunk`: images per
    pass of the nets, at most."""

    def __init__(self, vae, precision: int = 8, chunk: int = 100):
        check_codable(vae)
        if not 4 <= precision <= 20:
            raise BadValue(f"precision={precision}: a latent grid of 2^4 to 2^20 bins per "
                           f"dimension (8 is the default)")
        self.vae, self.precision, self.chunk = vae, precision, max(1, int(chunk))
        self.bins = 2**precision
        levels = torch.arange(self.bins + 1, dtype=torch.float64) / self.bins
        self.edges = torch.special.ndtri(levels)  # -inf, ..., +inf: standard-normal units
        self.centres = torch.special.ndtri(levels[:-1] + 0.5 / self.bins)
        self.uniform = constriction.stream.model.Uniform(self.bins)
        self.classes = constriction.stream.model.Uniform(vae.num_classes or 2)
        self.levels, self.device = vae.likelihood.levels, vae.device

    # -- the nets ------------------------------------------------------------------------------
    def posterior(self, x: torch.Tensor, context) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x) in the prior's standard units: means and sds, flattened, float64."""
        q = diagonal(self.vae.encode(x, context), "posterior")
        p = diagonal(self.vae.prior(context), "prior")
        loc = ((q.loc - p.loc) / p.scale).double().flatten().cpu()
        return loc, (q.scale / p.scale).expand_as(q.loc).double().flatten().cpu()

    def latents(self, symbols: torch.Tensor, n: int, context) -> torch.Tensor:
        """The latent values [n, D] that bins stand for."""
        p = diagonal(self.vae.prior(context), "prior")
        standard = self.centres[symbols].to(self.device, p.loc.dtype).reshape(n, -1)
        return p.loc + p.scale * standard

    def likelihoods(self, z: torch.Tensor, context) -> list[tuple[slice, Distribution]]:
        """p(x|z) over the chunk, in parts small enough for a table of every value each."""
        values = self.vae.likelihood.coded_per_step(self.vae.data_shape)
        per_part = max(1, TABLE_ENTRIES // (values * self.levels))
        parts = []
        for start in range(0, len(z), per_part):
            rows = slice(start, start + per_part)
            parts.append((rows, self.vae.decode(z[rows], None if context is None
                                                else context[rows])))
        return parts

    # -- tables --------------------------------------------------------------------------------
    def blocks(self, loc: torch.Tensor, scale: torch.Tensor) -> list[Block]:
        """Each latent's window of bins around its posterior, grouped by a power-of-two width so
        that one table holds many of them."""
        low = torch.special.ndtr(loc - WINDOW_SIGMAS * scale).mul(self.bins).floor()
        high = torch.special.ndtr(loc + WINDOW_SIGMAS * scale).mul(self.bins).floor()
        low, high = low.clamp(0, self.bins - 1).long(), high.clamp(0, self.bins - 1).long()
        width = (2 ** torch.log2((high - low + 1).double()).ceil()).long().clamp(2, self.bins)
        start = torch.minimum(low, self.bins - width)
        blocks = []
        for w in width.unique().tolist():
            index = torch.nonzero(width == w)[:, 0]
            rows = max(1, TABLE_ENTRIES // (w + 1))
            for i in range(0, len(index), rows):
                part = index[i:i + rows]
                blocks.append(Block(part, start[part], int(w)))
        return blocks

    def masses(self, block: Block, loc: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
        """q's mass in each bin of the block's windows [n, width]."""
        edges = self.edges[block.start[:, None] + torch.arange(block.width + 1)]
        t = (edges - loc[block.index, None]) / scale[block.index, None]
        mass = bin_masses(t.float(), torch.special.ndtr)  # float32: 24-bit tables follow
        return mass.numpy()

    def table(self, parts, symbols: torch.Tensor, step: tuple) -> np.ndarray:
        """The probability of every level of each value of the step [n_values, levels], given
        `symbols` (only the values of the steps before it are read)."""
        tables = [likelihood.table(self.values(symbols[rows]), step).cpu()
                  for rows, likelihood in parts]
        table = torch.cat(tables)
        return table.reshape(-1, table.shape[-1]).double().numpy()

    def symbols(self, images: torch.Tensor) -> torch.Tensor:
        """8-bit images as the likelihood's levels: 0..255, or 0 and 1 for binary ones."""
        return images.long() // (255 // (self.levels - 1))

    def values(self, symbols: torch.Tensor) -> torch.Tensor:
        """Symbols 0..levels-1 as the model's inputs in [0, 1]."""
        return symbols.to(self.device).float() / (self.levels - 1)

    # -- one chunk -----------------------------------------------------------------------------
    def push(self, coder, x: torch.Tensor, context) -> int:
        """A chunk of images as symbols [n, C, H, W] onto the stack; the bits taken back."""
        loc, scale = self.posterior(self.values(x), context)
        symbols = torch.empty(len(loc), dtype=torch.long)
        before = coder.num_bits()
        for block in self.blocks(loc, scale):  # take bits back: z ~ q(z|x)
            drawn = coder.decode(CATEGORICAL, self.masses(block, loc, scale))
            symbols[block.index] = block.start + torch.from_numpy(drawn).long()
        taken = before - coder.num_bits()
        parts = self.likelihoods(self.latents(symbols, len(x), context), context)
        for step in reversed(parts[0][1].coding_steps()):
            coder.encode_reverse(x[(slice(None), *step)].flatten().numpy().astype(np.int32),
                                 CATEGORICAL, self.table(parts, x, step))
        coder.encode_reverse(symbols.numpy().astype(np.int32), self.uniform)
        if context is not None:
            coder.encode_reverse(context.cpu().numpy().astype(np.int32), self.classes)
        return taken

    def pop(self, coder, n: int, shape, labelled: bool):
        """Undo `push`: n images as symbols [n, *shape], and their labels (or None)."""
        context = None
        if labelled:
            context = torch.from_numpy(coder.decode(self.classes, n)).long().to(self.device)
        dims = self.vae.prior(context).event_shape.numel()
        symbols = torch.from_numpy(coder.decode(self.uniform, n * dims)).long()
        parts = self.likelihoods(self.latents(symbols, n, context), context)
        x = torch.zeros(n, *shape, dtype=torch.long)
        for step in parts[0][1].coding_steps():
            drawn = torch.from_numpy(coder.decode(CATEGORICAL, self.table(parts, x, step)))
            index = (slice(None), *step)
            x[index] = drawn.long().reshape(x[index].shape)
        loc, scale = self.posterior(self.values(x), context)
        for block in reversed(self.blocks(loc, scale)):  # give the bits back
            coder.encode_reverse((symbols[block.index] - block.start).numpy().astype(np.int32),
                                 CATEGORICAL, self.masses(block, loc, scale))
        return x, None if context is None else context.cpu()

    # -- a whole set ---------------------------------------------------------------------------
    def entropy_bits(self, x: torch.Tensor, context) -> float:
        """The bits that drawing the latents of images x (as symbols) takes off the stack, in
        expectation: their posterior's entropy over the bins."""
        loc, scale = self.posterior(self.values(x), context)
        bits = 0.0
        for block in self.blocks(loc, scale):
            mass = self.masses(block, loc, scale)
            mass = mass / mass.sum(-1, keepdims=True)
            bits -= float((mass * np.log2(np.where(mass > 0, mass, 1))).sum())
        return bits

    def initial_words(self, first: torch.Tensor, context, seed: int) -> np.ndarray:
        """Seeded random words for the first image to take back: its posterior's entropy over
        the bins, with a margin and the reserve (too few would cost bits, never lose data)."""
        bits = self.entropy_bits(first, context)
        return seeded_words(seed, math.ceil((1.25 * bits + RESERVE_BITS + 64) / 32))

    def cost_bits(self, first: torch.Tensor, context, seed: int) -> float:
        """What bits-back adds to a stack that has bits to give back, for images `first`."""
        coder = constriction.stream.stack.AnsCoder(self.initial_words(first, context, seed))
        before = coder.num_bits()
        self.push(coder, first, context)
        return coder.num_bits() - before

    def lead(self, images: torch.Tensor, symbols: torch.Tensor, context, seed: int,
             choice: bool | None) -> list[bytes]:
        """The first images as lossless WebP files. While their bytes do not yet cover what the
        next image's latents take, that image joins them if its WebP bytes (and the words the
        image after it would still borrow) cost less than coding it by bits-back (and the words
        it would borrow itself): `choice` None. True: it joins them regardless; False: none."""
        if choice is False or len(self.vae.data_shape) != 3 \
                or self.vae.data_shape[0] not in LEAD_MODES:
            if choice:
                raise BadValue(f"lead=true stores the first images as WebP, which holds 1, 3 or "
                               f"4 channels; the model codes {list(self.vae.data_shape)}")
            return []
        files: list[bytes] = []
        stored = 0.0  # WebP bits on the stack so far
        for k in range(len(images)):
            rows = slice(k, k + 1)
            c = None if context is None else context[rows]
            draw = self.entropy_bits(symbols[rows], c) + RESERVE_BITS  # what its latents take
            if stored >= draw:
                break
            webp = lossless_webp(images[k])
            bits = 8 * len(webp)
            # stored: its WebP bits, and the next image borrows what is still missing; coded:
            # its bits-back cost, and it borrows what is missing now
            if not choice and bits + max(0.0, draw - stored - bits) >= \
                    self.cost_bits(symbols[rows], c, seed) + draw - stored:
                break
            files.append(webp)
            stored += bits
        return files

    @torch.no_grad()
    def encode(self, images: torch.Tensor, labels: torch.Tensor | None = None,
               seed: int = 0, lead: bool | None = None) -> "Coded":
        """Images as symbols [N, C, H, W] (and labels, for a conditional model) into one
        stack. A chunk is as large as the bits above the seeded words let it take back (the
        first one image, whatever it borrows). `lead`: the first images as lossless WebP (None:
        where that is cheaper)."""
        labels = self.check(images, labels)
        symbols = self.symbols(images)
        context = None if labels is None else labels.to(self.device)
        files = self.lead(images, symbols, context, seed, lead)
        start = len(files)
        seeded = np.zeros(0, dtype=np.uint32)
        if start < len(images):
            seeded = self.initial_words(symbols[start:start + 1], None if context is None
                                        else context[start:start + 1], seed)
        coder = constriction.stream.stack.AnsCoder(np.concatenate(
            [seeded, as_words(b"".join(files))]) if files else seeded.copy())
        sizes, per_image, free = [], 0.0, 32 * len(seeded)  # seeded words untouched are free
        while start < len(images):
            room = (coder.num_bits() - free - RESERVE_BITS) / (1.25 * per_image) \
                if per_image else 1
            size = int(min(self.chunk, len(images) - start, max(1, room)))
            rows = slice(start, start + size)
            taken = self.push(coder, symbols[rows], None if context is None else context[rows])
            per_image = max(per_image, taken / size)
            sizes.append(size)
            start += size
        words = coder.get_compressed()
        changed = np.flatnonzero(words[:len(seeded)] != seeded)  # seeded words coding took
        shared = int(changed[0]) if len(changed) else min(len(seeded), len(words))
        lead_labels = None if labels is None else labels[:len(files)].tolist()
        return Coded(words[shared:], sizes, len(seeded), seed, shared,
                     [len(f) for f in files], lead_labels)

    @torch.no_grad()
    def decode(self, coded: "Coded", shape, labelled: bool):
        """Undo `encode`: the 8-bit images [N, *shape] and their labels (or None). Raises
        `CodingMismatch` if the stack does not end at the words it began with."""
        seeded = seeded_words(coded.seed, coded.initial)
        coder = constriction.stream.stack.AnsCoder(np.concatenate([seeded[:coded.shared],
                                                                   coded.words]))
        images, labels = [], []
        for size in reversed(coded.sizes):
            x, y = self.pop(coder, size, tuple(shape), labelled)
            images.append(x * (255 // (self.levels - 1)))
            labels.append(y)
        rest = coder.get_compressed()
        lead = rest[coded.initial:]
        total = sum(coded.lead_bytes)
        if not np.array_equal(rest[:coded.initial], seeded) or \
                len(lead) != (-(-total // 4) + 1 if total else 0):
            raise CodingMismatch("the decoded stack does not end where coding began")
        data = lead[:-1].astype("<u4").tobytes()
        ends = np.cumsum([0, *coded.lead_bytes]).tolist()
        for i in reversed(range(len(coded.lead_bytes))):
            images.append(from_webp(data[ends[i]:ends[i + 1]], tuple(shape))[None].long())
            labels.append(None if coded.lead_labels is None
                          else torch.tensor(coded.lead_labels[i:i + 1]))
        images = torch.cat(images[::-1])
        return images.to(torch.uint8), torch.cat(labels[::-1]) if labelled else None

    def check(self, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor | None:
        """The images must be the model's shape and its levels; a conditional model's labels
        are coded too."""
        if tuple(images.shape[1:]) != tuple(self.vae.data_shape):
            raise BadValue(f"the images are {list(images.shape[1:])} but the model codes "
                           f"{list(self.vae.data_shape)}")
        if len(images) == 0:
            raise BadValue("there are no images to code")
        if images.dtype != torch.uint8:
            raise BadValue(f"expected 8-bit images (uint8), got {images.dtype}")
        if self.levels == 2 and not ((images == 0) | (images == 255)).all():
            raise BadValue(f"the model's likelihood ({type(self.vae.likelihood).__name__}) "
                           f"codes binary images and these have grey levels: binarize them "
                           f"(a run trained with data.binarize=dynamic codes its static draw), "
                           f"or code 8-bit images with a model trained with likelihood="
                           f"dlogistic")
        if not self.vae.conditional:
            return None
        if labels is None:
            raise BadValue("this model is conditional: its images need their labels, which "
                           "a dataset split has (input=mnist:test) and a plain folder does not")
        self.vae.check_context(labels)
        return labels.long()


@dataclass
class Coded:
    """A coded set: the stack's words above its bottom `shared` words, the chunk sizes in coding
    order, and how many seeded words the stack began with. The bottom words that coding left as
    it found them are the seeded words themselves: the decoder draws them again rather than
    read them from the file, so a file carries only the seeded words the first chunk took.
    `lead_bytes`: the sizes of the first images' lossless WebP files, whose bytes lay on top of
    the seeded words where coding began, and `lead_labels` theirs, for a conditional model."""

    words: np.ndarray
    sizes: list[int]
    initial: int
    seed: int
    shared: int = 0
    lead_bytes: list[int] = field(default_factory=list)
    lead_labels: list[int] | None = None

    @property
    def borrowed(self) -> int:
        """The seeded words a file carries: the ones the first chunk's latents were drawn from."""
        return self.initial - self.shared


class CodingMismatch(BadValue):
    """Decoding did not retrace coding: another model, or other arithmetic."""


def seeded_words(seed: int, count: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 2**32, size=count, dtype=np.uint32)


def lossless_webp(image: torch.Tensor) -> bytes:
    """One 8-bit image [C, H, W] as a lossless WebP file, at libwebp's smallest setting."""
    hwc = np.ascontiguousarray(image.permute(1, 2, 0).numpy())
    picture = Image.fromarray(hwc[..., 0] if hwc.shape[-1] == 1 else hwc,
                              LEAD_MODES[hwc.shape[-1]])
    buffer = io.BytesIO()
    picture.save(buffer, format="WEBP", lossless=True, quality=100, method=6, exact=True)
    return buffer.getvalue()


def from_webp(data: bytes, shape) -> torch.Tensor:
    """Undo `lossless_webp`: the image [C, H, W], or `CodingMismatch`."""
    try:
        picture = Image.open(io.BytesIO(data))
        picture = picture.convert(LEAD_MODES[shape[0]])
    except (OSError, ValueError) as err:
        raise CodingMismatch(f"the first image's WebP file cannot be read: {err}") from err
    array = np.asarray(picture)
    image = torch.from_numpy(array.reshape(*array.shape[:2], -1).copy()).permute(2, 0, 1)
    if tuple(image.shape) != tuple(shape):
        raise CodingMismatch(f"the first image is {list(image.shape)}, not {list(shape)}")
    return image


def as_words(data: bytes) -> np.ndarray:
    """Bytes as little-endian words, zero-padded, under a top word of 1: ANS data never ends in
    a zero word."""
    padded = np.frombuffer(data + bytes(-len(data) % 4), dtype="<u4").astype(np.uint32)
    return np.append(padded, np.uint32(1))
