"""Training data that needs no download: byte-level language modelling on text every machine has.

The default corpus is the Python standard library's own ``.py`` sources (the folder of ``os.__file__``,
without site-packages), read in sorted path order. ``path`` may instead name a text file or a folder of
files. Tokens are bytes (vocabulary 256), so any model with ``vocab_size >= 256`` trains on it; a model with
its own tokenizer (a Hugging Face model) gets the same text as its tokenizer's ids (:func:`make_text_batches`).

The split is fixed: with several files, every n-th file in sorted order (n = round(1 / val_fraction)) is
validation; a single file keeps its last ``val_fraction`` of bytes for validation.

Batches are a pure function of (seed, split, step, micro-step, data-parallel rank): no loader state, so a
resumed run sees exactly the batches an uninterrupted run would.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple

import torch

BYTE_VOCAB = 256
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> str:
    """Folder of the running Python's standard library sources."""
    return os.path.dirname(os.__file__)


def list_files(root: str, suffix: Optional[str] = None) -> List[str]:
    """Regular files under ``root`` (ending in ``suffix`` if given), sorted by relative path; skips
    site-packages, dist-packages, __pycache__ and hidden folders."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
        found += [os.path.join(folder, f) for f in files if suffix is None or f.endswith(suffix)]
    return sorted(found, key=lambda p: os.path.relpath(p, root))


def _read(files: List[str], max_bytes: int) -> List[bytes]:
    out, total = [], 0
    for path in files:
        if total >= max_bytes:
            break
        with open(path, "rb") as f:
            data = f.read(max_bytes - total)
        out.append(data)
        total += len(data)
    return out


def load_corpus(path: Optional[str] = None, val_fraction: float = 0.05,
                max_bytes: int = 64 * 2**20) -> Tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) byte streams as uint8 tensors.

    ``path``: None = standard library sources; a file; or a folder (all regular files). Reads at most
    ``max_bytes`` bytes in total. Raises ValueError when a split is empty (:class:`ByteBatches` then checks
    the lengths against seq_len).
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if path is None:
        files = list_files(stdlib_root(), ".py")
    elif os.path.isdir(path):
        files = list_files(path)
    elif os.path.isfile(path):
        files = [path]
    else:
        raise ValueError(f"data path {path!r} is neither a file nor a folder")
    chunks = [c for c in _read(files, max_bytes) if c]
    every = max(2, round(1 / val_fraction))
    if len(chunks) >= 2 * every:
        train = b"".join(c for i, c in enumerate(chunks) if i % every != every - 1)
        val = b"".join(c for i, c in enumerate(chunks) if i % every == every - 1)
    else:  # too few files for a file-level split: hold out the tail of the bytes
        data = b"".join(chunks)
        cut = int(len(data) * (1 - val_fraction))
        train, val = data[:cut], data[cut:]
    where = path or stdlib_root()
    for name, stream in (("training", train), ("validation", val)):
        if len(stream) < 2:
            raise ValueError(f"{name} split of {where!r} has {len(stream)} bytes; need at least 2")
    return (torch.frombuffer(bytearray(train), dtype=torch.uint8),
            torch.frombuffer(bytearray(val), dtype=torch.uint8))


class TokenBatches:
    """Random windows of a token stream as (inputs [B, S] int64, targets [B, S] int64), targets = inputs
    shifted by one token; which windows is a pure function of the arguments of :meth:`get`. The streams are
    1-D integer tensors of token ids below ``vocab_size``."""

    def __init__(self, train_T: torch.Tensor, val_T: torch.Tensor, seq_len: int, micro_batch: int, seed: int,
                 vocab_size: int):
        for name, stream in (("training", train_T), ("validation", val_T)):
            if stream.numel() <= seq_len + 1:
                raise ValueError(f"{name} stream has {stream.numel()} tokens, fewer than seq_len + 2 "
                                 f"({seq_len + 2})")
        self.streams = {"train": train_T, "val": val_T}
        self.seq_len, self.micro_batch, self.seed = seq_len, micro_batch, seed
        self.vocab_size = vocab_size

    def get(self, split: str, step: int, micro: int, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """Micro-batch ``micro`` of optimizer step ``step`` for data-parallel rank ``rank``."""
        stream = self.streams[split]
        gen = torch.Generator().manual_seed(_mix(self.seed, split == "val", step, micro, rank))
        starts = torch.randint(0, stream.numel() - self.seq_len - 1, (self.micro_batch, ), generator=gen)
        windows = torch.stack([stream[s:s + self.seq_len + 1] for s in starts.tolist()]).long()
        return windows[:, :-1], windows[:, 1:]


class ByteBatches(TokenBatches):
    """:class:`TokenBatches` of byte streams (uint8, vocabulary 256)."""

    def __init__(self, train_U8: torch.Tensor, val_U8: torch.Tensor, seq_len: int, micro_batch: int, seed: int):
        super().__init__(train_U8, val_U8, seq_len, micro_batch, seed, BYTE_VOCAB)


class RandomTokens:
    """Uniform random tokens over a vocabulary (throughput benchmarks; nothing to learn). Same interface as
    :class:`ByteBatches`."""

    def __init__(self, vocab_size: int, seq_len: int, micro_batch: int, seed: int):
        self.vocab_size, self.seq_len, self.micro_batch, self.seed = vocab_size, seq_len, micro_batch, seed

    def get(self, split: str, step: int, micro: int, rank: int) -> Tuple[torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(_mix(self.seed, split == "val", step, micro, rank))
        windows = torch.randint(0, self.vocab_size, (self.micro_batch, self.seq_len + 1), generator=gen)
        return windows[:, :-1], windows[:, 1:]


def _mix(*values: int) -> int:
    """A 63-bit seed from several ints (deterministic across processes, unlike hash())."""
    h = 1469598103934665603
    for v in values:
        h = ((h ^ (int(v) & 0xFFFFFFFFFFFF)) * 1099511628211) % (2**63)
    return h


def make_batches(path: Optional[str], vocab_size: int, seq_len: int, micro_batch: int, seed: int,
                 val_fraction: float = 0.05, max_bytes: int = 64 * 2**20):
    """The batch source for ``path``: 'random' -> :class:`RandomTokens`, else :class:`ByteBatches` on the
    corpus (standard library when None). Raises ValueError if the model's vocabulary cannot hold bytes."""
    if path == "random":
        return RandomTokens(vocab_size, seq_len, micro_batch, seed)
    if vocab_size < BYTE_VOCAB:
        raise ValueError(f"byte-level data needs vocab_size >= {BYTE_VOCAB}, the model has {vocab_size}")
    train, val = load_corpus(path, val_fraction, max_bytes)
    return ByteBatches(train, val, seq_len, micro_batch, seed)


_ENCODE_CHARS = 1 << 20  # text is tokenized in pieces of this many characters (bounded memory per call)


def encode_stream(stream_U8: torch.Tensor, encode: Callable[[str], List[int]]) -> torch.Tensor:
    """Token ids (int32) of a UTF-8 byte stream (undecodable bytes become U+FFFD), tokenized by ``encode`` one
    piece of text at a time (tokens may differ from one call on the whole text at the piece boundaries)."""
    text = bytes(stream_U8.numpy()).decode("utf-8", errors="replace")
    ids: List[int] = []
    for start in range(0, len(text), _ENCODE_CHARS):
        ids.extend(encode(text[start:start + _ENCODE_CHARS]))
    return torch.tensor(ids, dtype=torch.int32)


def make_text_batches(path: Optional[str], encode: Callable[[str], List[int]], vocab_size: int, seq_len: int,
                      micro_batch: int, seed: int, val_fraction: float = 0.05, max_bytes: int = 64 * 2**20):
    """The batch source of a model with its own tokenizer: 'random' -> :class:`RandomTokens`, else
    :class:`TokenBatches` of the corpus at ``path`` (standard library when None, split as :func:`load_corpus`
    splits it) tokenized by ``encode`` (text -> token ids below ``vocab_size``)."""
    if path == "random":
        return RandomTokens(vocab_size, seq_len, micro_batch, seed)
    train, val = (encode_stream(s, encode) for s in load_corpus(path, val_fraction, max_bytes))
    for name, ids in (("training", train), ("validation", val)):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
            raise ValueError(f"the tokenizer gave {name} token ids in [{int(ids.min())}, {int(ids.max())}], "
                             f"outside the model's vocabulary of {vocab_size}")
    return TokenBatches(train, val, seq_len, micro_batch, seed, vocab_size)
