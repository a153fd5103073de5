"""The three layouts integer codes take in aq, in plain torch, each with its exact inverse.

- Storage codes (the checkpoint's ``L.qweight``, aq/checkpoint.py): uint8 [N, K * c / 8], packed along K, code k of
  row n in byte k // (8 / c) at bit offset c * (k % (8 / c)), lowest bits first. ``pack_storage_codes`` /
  ``unpack_storage_codes``.
- W4A16 words (aq.kernels.w4a16's PackedWeight.qweight): int32 [ceil(N / 16), K / E, 16], E = 32 / c codes per word,
  the words of 16 consecutive output channels interleaved; code i of a word at bit 16 * (i % 2) + c * (i // 2) (even
  codes in the low half-word, odd codes in the high one). Rows past N hold code 0. ``pack_w4a16_words`` /
  ``unpack_w4a16_words``; why this layout: aq/kernels/w4a16.py's docstring.
- W4A4 nibbles (aq.kernels.w4a4's W4A4Weight.packed): uint8 [N, ceil(K / 2)], byte j of row n holding code j in its
  low nibble and code ceil(K / 2) + j in its high nibble (0 past K). ``pack_w4a4_nibbles`` / ``unpack_w4a4_nibbles``.

c is the container width of a code (``container_bits``): 2 bits for 2-bit codes, 4 for 3 and 4 bits, 8 for 5..8.
Inputs are trusted (the public packers in aq.kernels and the checkpoint loader validate them).
"""
from __future__ import annotations

import torch

from aq import primitives

W4A16_ROW_BLOCK = 16  # output channels whose words are interleaved in a W4A16 qweight


def container_bits(bits: int) -> int:
    """Width of the slot a code of `bits` bits is stored in (3-bit codes live in 4-bit slots, 5..7 in bytes)."""
    primitives.check_bits(bits)
    return 2 if bits == 2 else 4 if bits <= 4 else 8


# ------------------------------------------------------------------------------------------------------ storage codes
def pack_storage_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes [N, K] -> uint8 [N, K * c / 8] (the checkpoint layout)."""
    c = container_bits(bits)
    per = 8 // c
    N, K = codes.shape
    if K % per:
        raise ValueError(f"K={K} is not a multiple of {per} ({bits}-bit codes are stored {per} per byte)")
    q = codes.to(torch.int32).view(N, K // per, per)
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * c
    return (q << shifts).sum(-1).to(torch.uint8)


def unpack_storage_codes(packed: torch.Tensor, bits: int, K: int) -> torch.Tensor:
    """uint8 [N, K * c / 8] -> the codes [N, K] as uint8."""
    c = container_bits(bits)
    per = 8 // c
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * c
    q = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & (2**c - 1)
    return q.reshape(packed.shape[0], -1)[:, :K].to(torch.uint8)


# ------------------------------------------------------------------------------------------------------ W4A16 words
def w4a16_code_shifts(cb: int, device) -> torch.Tensor:
    """Bit offset of code i in its word: even codes fill the low 16 bits, odd codes the high 16 bits."""
    i = torch.arange(32 // cb, device=device, dtype=torch.int64)
    return (i % 2) * 16 + (i // 2) * cb


def pack_w4a16_words(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer codes [N, K] (K a multiple of 32 / c) -> int32 words [ceil(N / 16), K / E, 16]."""
    N, K = codes.shape
    cb = container_bits(bits)
    e = 32 // cb
    c = codes.to(torch.int64)
    words = (c.view(N, K // e, e) << w4a16_code_shifts(cb, c.device)).sum(-1)  # < 2^32: codes occupy disjoint bits
    words = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    n_pad = -N % W4A16_ROW_BLOCK
    words = torch.cat([words, words.new_zeros(n_pad, K // e)]) if n_pad else words
    return words.view(-1, W4A16_ROW_BLOCK, K // e).transpose(1, 2).contiguous()  # [N / 16, K / E, 16]


def w4a16_word_codes(words: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes held by int32 words [..., W] as uint8 [..., W * E] (natural K order)."""
    cb = container_bits(bits)
    w = words.to(torch.int64) & 0xFFFFFFFF
    q = (w.unsqueeze(-1) >> w4a16_code_shifts(cb, words.device)) & (2**cb - 1)
    return q.reshape(*words.shape[:-1], -1).to(torch.uint8)


def unpack_w4a16_words(qweight: torch.Tensor, bits: int, N: int, K: int) -> torch.Tensor:
    """int32 words [ceil(N / 16), K / E, 16] -> the codes [N, K] as uint8 (exact inverse of pack_w4a16_words)."""
    words = qweight.transpose(1, 2).reshape(-1, qweight.shape[1])[:N]
    return w4a16_word_codes(words, bits).reshape(N, K)


# ------------------------------------------------------------------------------------------------------ W4A4 nibbles
def pack_w4a4_nibbles(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [N, K] (< 16) -> [N, ceil(K/2)] bytes: low nibble k = j, high nibble k = ceil(K/2) + j."""
    N, K = q.shape
    Kh = (K + 1) // 2
    hi = torch.zeros(N, Kh, dtype=torch.uint8, device=q.device)
    hi[:, : K - Kh] = q[:, Kh:]
    return (q[:, :Kh] | (hi << 4)).contiguous()


def unpack_w4a4_nibbles(packed: torch.Tensor, K: int) -> torch.Tensor:
    """Inverse of pack_w4a4_nibbles: [N, ceil(K/2)] bytes -> uint8 codes [N, K]."""
    Kh = (K + 1) // 2
    if packed.dim() != 2 or packed.shape[1] != Kh:
        raise ValueError(f"packed codes must be [N, {Kh}] for K={K}, got {tuple(packed.shape)}")
    return torch.cat([packed & 15, packed >> 4], dim=1)[:, :K].contiguous()
