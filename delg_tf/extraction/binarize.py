"""DELG* binarised local descriptors (paper Sec. 4.1 / Table 6: b(x) = +1 if x > 0 else -1).

Stored as packed bits (`np.packbits`, 1 = +1, 0 = -1): 128-d -> 16 bytes.
Hamming distance between packed codes relates to the dot product of the ±1
vectors: <b, b'> = d - 2 * hamming(b, b').
"""

import numpy as np

BITS_PER_BYTE = 8


def binarize(descriptors):
    """±1 float32 codes: +1 where x > 0, -1 elsewhere (zeros map to -1)."""
    descriptors = np.asarray(descriptors)
    return np.where(descriptors > 0, 1.0, -1.0).astype(np.float32)


def pack_binary(descriptors):
    """Packs the signs of [N, d] descriptors into uint8 [N, ceil(d / 8)]."""
    descriptors = np.asarray(descriptors)
    if descriptors.ndim != 2:
        raise ValueError(
            f"pack_binary expects descriptors [N, d], received shape {descriptors.shape}."
        )
    return np.packbits(descriptors > 0, axis=1)


def unpack_binary(packed, dim):
    """Inverse of `pack_binary`: ±1 float32 [N, dim]."""
    packed = np.asarray(packed, np.uint8)
    bits = np.unpackbits(packed, axis=1)[:, :dim]
    return bits.astype(np.float32) * 2.0 - 1.0


def hamming_distances(packed_a, packed_b):
    """Pairwise Hamming distances int64 [Na, Nb] between packed codes (XOR + bit count).

    The package's one Hamming distance; ``delg_tf.matching.correspondences`` finds
    nearest neighbours under it through a matrix product of the ±1 codes instead.
    """
    a = np.asarray(packed_a, np.uint8)[:, None, :]
    b = np.asarray(packed_b, np.uint8)[None, :, :]
    return np.unpackbits(np.bitwise_xor(a, b), axis=2).sum(axis=2, dtype=np.int64)
