"""Device-side batching helpers: pure JAX, safe under jit and vmap."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

CIFAR_PAD = 4


@functools.partial(jax.jit, static_argnames=("num_examples", "batch_size"))
def shuffle_batches(key: jax.Array, num_examples: int,
                    batch_size: int) -> jax.Array:
  """One epoch of shuffled minibatch indices, dropping the remainder.

  Each seed of a sweep gets its own order by passing its own key (vmap over
  keys works).

  Args:
    key: a PRNG key.
    num_examples: dataset size N (static).
    batch_size: B (static), 1 <= B <= N.

  Returns:
    int32 [N // B, B]; its rows concatenated are N // B * B distinct indices
    drawn from a uniform permutation of range(N).

  Example:
    >>> idx = shuffle_batches(jax.random.key(0), 60000, 128)  # [468, 128]
    >>> batch = train_x[idx[step]]
  """
  if not 1 <= batch_size <= num_examples:
    raise ValueError(
        f"batch_size must be in [1, num_examples={num_examples}]; "
        f"got {batch_size}")
  num_batches = num_examples // batch_size
  order = jax.random.permutation(key, num_examples)
  return order[: num_batches * batch_size].reshape(
      num_batches, batch_size).astype(jnp.int32)


def _augment_one(key: jax.Array, image: jax.Array) -> jax.Array:
  height, width, _ = image.shape
  crop_key, flip_key = jax.random.split(key)
  padded = jnp.pad(image, ((CIFAR_PAD, CIFAR_PAD), (CIFAR_PAD, CIFAR_PAD),
                           (0, 0)))
  dy, dx = jax.random.randint(crop_key, (2,), 0, 2 * CIFAR_PAD + 1)
  crop = jax.lax.dynamic_slice(padded, (dy, dx, 0), image.shape)
  return jnp.where(jax.random.bernoulli(flip_key), crop[:, ::-1], crop)


@jax.jit
def augment_cifar(key: jax.Array, images: jax.Array) -> jax.Array:
  """The standard CIFAR augmentation: pad 4, random crop, random h-flip.

  Each image is zero-padded by 4 pixels per side, cropped back to its size at
  a uniform offset in {0..8}^2, and mirrored left-right with probability 1/2,
  with independent randomness per image. Zero padding means black for images
  in [0, 1] and the mean for normalized images.

  Args:
    key: a PRNG key.
    images: [N, H, W, C] batch.

  Returns:
    The augmented batch, same shape and dtype.
  """
  keys = jax.random.split(key, images.shape[0])
  return jax.vmap(_augment_one)(keys, images)


def normalize(images: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """Per-channel standardization `(images - mean) / std` over the last axis.

  Args:
    images: [..., C] images.
    mean: [C] channel means (e.g. from `channel_stats`).
    std: [C] channel standard deviations.

  Returns:
    Standardized images, same shape.
  """
  return (images - mean) / std


def channel_stats(train_x: np.ndarray,
                  chunk: int = 8192) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and standard deviation of a training set.

  Accumulated in float64 over chunks of examples, so a 600 MB CIFAR array
  needs no full-size temporary.

  Args:
    train_x: [N, H, W, C] images.
    chunk: examples per accumulation step.

  Returns:
    (mean, std), each float32 [C].
  """
  total = np.zeros(train_x.shape[-1])
  total_sq = np.zeros(train_x.shape[-1])
  for start in range(0, len(train_x), chunk):
    block = np.asarray(train_x[start:start + chunk], np.float64)
    total += block.sum(axis=(0, 1, 2))
    total_sq += np.square(block).sum(axis=(0, 1, 2))
  count = train_x.size // train_x.shape[-1]
  mean = total / count
  std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
  return mean.astype(np.float32), std.astype(np.float32)
