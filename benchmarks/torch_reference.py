"""A plain PyTorch reference of qjax's steps (FP, BC, SR, R with Adam).

Two networks, the same as qjax's:

* ``model="mlp"``: ``qjax.models.MLP(features=(512, 512))``: flatten,
  (Linear without bias, BatchNorm, ReLU) per hidden layer, a Linear output;
  every Linear weight binary on BinaryConnect's per-layer grid ``{-H, +H}``
  (H the Glorot scale, as ``qjax.glorot_scale``).
* ``model="allconv"``: ``qjax.models.AllConv`` as the CPU-scale experiments
  use it (``conv_spec`` ``16, M, 32, M, 64`` on 14x14x1 inputs): (3x3 conv
  with bias, padding 1, BatchNorm, ReLU) per channel count, 2x2 max pool
  at ``'M'``, global average pooling, a Linear classifier; the conv kernels
  binary on ``{-1, +1}`` and the classifier float (the experiments'
  ``mask='conv'``, ``grid='binary'``).

Cross-entropy, Adam. Written as a researcher would in PyTorch, with nothing
qjax-specific:

* ``fp``: Adam on float weights.
* ``bc``: the forward pass sees ``H sign(w_r)`` (straight-through gradient),
  Adam updates the float latent ``w_r``, clipped to ``[-H, H]``; the test
  error is that of ``H sign(w_r)`` (until 2026-12-07 it was measured on the
  latents, with BatchNorm statistics gathered on the binary weights).
* ``sr``: weights stored on the grid (as floats); after Adam's step ``w +
  u`` is rounded stochastically to ``-H`` or ``+H``.
* ``r``: the same, rounded to the nearest point.

Used for timing (``benchmarks/step_throughput.py``: steps;
``benchmarks/sweep_vs_torch.py``: whole processes). As a command it trains
configs one after another on MNIST from qjax's dataset cache and prints
each config's test error::

  python -m benchmarks.torch_reference --method bc --lrs 0.001,0.003 \
      --seeds 0,1 --epochs 1

It reads the IDX files itself (no jax import: the process is PyTorch
only). torch is an optional dependency (the CPU wheel).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np

METHODS = ("fp", "bc", "sr", "r")
MODELS = ("mlp", "allconv")


def _glorot(fan_in: int, fan_out: int) -> float:
  return math.sqrt(1.5 / (fan_in + fan_out))


class ReferenceStep:
  """One method's model, optimizer and a ``step(x, y)`` in PyTorch."""

  def __init__(self, method: str, features=(512, 512), num_inputs=784,
               num_classes=10, lr=1e-3, seed=0, model: str = "mlp",
               conv_spec=(16, "M", 32, "M", 64), in_channels: int = 1):
    import torch
    from torch import nn
    if method not in METHODS:
      raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
    if model not in MODELS:
      raise ValueError(f"model must be one of {MODELS}; got {model!r}.")
    torch.manual_seed(seed)
    self.torch, self.method = torch, method
    layers = []
    if model == "mlp":
      width = num_inputs
      layers.append(nn.Flatten())
      for f in features:
        layers += [nn.Linear(width, f, bias=False), nn.BatchNorm1d(f),
                   nn.ReLU()]
        width = f
      layers.append(nn.Linear(width, num_classes))
      quantized = (nn.Linear,)
    else:
      width = in_channels
      for item in conv_spec:
        if item == "M":
          layers.append(nn.MaxPool2d(2))
        else:
          layers += [nn.Conv2d(width, int(item), 3, padding=1),
                     nn.BatchNorm2d(int(item)), nn.ReLU()]
          width = int(item)
      layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                 nn.Linear(width, num_classes)]
      quantized = (nn.Conv2d,)
    self.model = nn.Sequential(*layers)
    self.quantized = [m for m in self.model if isinstance(m, quantized)]
    self.scales = ([_glorot(m.in_features, m.out_features)
                    for m in self.quantized] if model == "mlp"
                   else [1.0] * len(self.quantized))
    with torch.no_grad():
      for m, h in zip(self.quantized, self.scales):
        if method in ("sr", "r"):
          m.weight.copy_(torch.where(m.weight >= 0, h, -h))
        elif method == "bc":
          m.weight.clamp_(-h, h)
    self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
    self.loss = nn.CrossEntropyLoss()

  @contextlib.contextmanager
  def _binary_weights(self):
    """BC's quantized layers hold ``H sign(w_r)`` inside, ``w_r`` after.

    The forward pass of a BC step and its evaluation both see the binary
    weights (what BC deploys); the latents ``w_r`` are restored on exit
    (gradients in ``.grad`` are untouched). Other methods store their
    weights as they are used.
    """
    if self.method != "bc":
      yield
      return
    torch = self.torch
    latents = [m.weight.detach().clone() for m in self.quantized]
    with torch.no_grad():
      for m, h in zip(self.quantized, self.scales):
        m.weight.copy_(torch.where(m.weight >= 0, h, -h))
    try:
      yield
    finally:
      with torch.no_grad():
        for m, w in zip(self.quantized, latents):
          m.weight.copy_(w)

  def step(self, x, y):
    torch = self.torch
    self.opt.zero_grad(set_to_none=True)
    with self._binary_weights():  # BC: forward on H sign(w_r), STE to w_r
      loss = self.loss(self.model(x), y)
      loss.backward()
    self.opt.step()
    with torch.no_grad():
      for m, h in zip(self.quantized, self.scales):
        w = m.weight
        if self.method == "bc":
          w.clamp_(-h, h)
        elif self.method == "sr":
          p_up = ((w + h) / (2 * h)).clamp_(0, 1)
          w.copy_(torch.where(torch.rand_like(w) < p_up, h, -h))
        elif self.method == "r":
          w.copy_(torch.where(w >= 0, h, -h))
    return loss.detach()

  def test_error(self, x, y, batch: int = 1000) -> float:
    """Top-1 error on ``(x, y)`` in eval mode (BatchNorm's running stats),
    of the weights the method deploys (BC: ``H sign(w_r)``, as in its
    training forward pass and in qjax's evaluation)."""
    torch = self.torch
    self.model.eval()
    wrong = 0
    with torch.no_grad(), self._binary_weights():
      for i in range(0, len(x), batch):
        wrong += int((self.model(x[i:i + batch]).argmax(1)
                      != y[i:i + batch]).sum())
    self.model.train()
    return wrong / len(x)


def _read_idx(path) -> np.ndarray:
  """A raw (uncompressed) IDX file, as qjax's cache stores MNIST."""
  with open(path, "rb") as f:
    data = f.read()
  zero, dtype_code, ndim = data[0] * 256 + data[1], data[2], data[3]
  if zero != 0 or dtype_code != 0x08:
    raise ValueError(f"{path}: not an unsigned-byte IDX file")
  dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big")
          for i in range(ndim)]
  return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_mnist(cache_dir=None):
  """MNIST from qjax's cache (``$QJAX_DATA`` or ``~/.cache/qjax/datasets``):
  float images in [0, 1], ``(N, 1, 28, 28)``, int64 labels."""
  import os
  import pathlib

  import torch
  root = pathlib.Path(cache_dir or os.environ.get("QJAX_DATA") or
                      pathlib.Path.home() / ".cache" / "qjax" / "datasets")
  root = root / "mnist"
  out = []
  for split in ("train", "t10k"):
    path = root / f"{split}-images-idx3-ubyte"
    if not path.exists():
      raise FileNotFoundError(f"{path} is missing: run python -m qjax.data "
                              "fetch mnist")
    x = _read_idx(path).astype(np.float32)[:, None] / np.float32(255)
    y = _read_idx(root / f"{split}-labels-idx1-ubyte").astype(np.int64)
    out += [torch.from_numpy(x), torch.from_numpy(y)]
  return tuple(out)


def train(method: str, lr: float, seed: int, data, *, epochs: int = 1,
          batch: int = 128, model: str = "mlp") -> float:
  """One config trained as a PyTorch user would; its test error."""
  import torch
  x, y, x_test, y_test = data
  ref = ReferenceStep(method, lr=lr, seed=seed, model=model)
  g = torch.Generator().manual_seed(seed)
  steps = len(x) // batch
  for _ in range(epochs):
    order = torch.randperm(len(x), generator=g)
    for t in range(steps):
      idx = order[t * batch:(t + 1) * batch]
      ref.step(x[idx], y[idx])
  return ref.test_error(x_test, y_test)


def main(argv=None) -> list[dict]:
  import argparse
  import time

  def floats(text):
    values = [float(v) for v in text.split(",")]
    if any(not v > 0 for v in values):
      raise argparse.ArgumentTypeError(f"learning rates must be > 0: {text}")
    return values

  def ints(text):
    values = [int(v) for v in text.split(",")]
    if any(v < 0 for v in values):
      raise argparse.ArgumentTypeError(f"seeds must be >= 0: {text}")
    return values

  parser = argparse.ArgumentParser(
      description="PyTorch reference: MNIST configs one after another.")
  parser.add_argument("--method", choices=METHODS, default="bc")
  parser.add_argument("--lrs", type=floats, default="0.001")
  parser.add_argument("--seeds", type=ints, default="0")
  parser.add_argument("--epochs", type=int, default=1)
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--out", default=None,
                      help="write the rows (lr, seed, test_error) as JSON")
  args = parser.parse_args(argv)
  if args.epochs < 1 or args.batch < 1:
    parser.error("--epochs and --batch must be >= 1")
  t0 = time.time()
  data = load_mnist()
  rows = []
  for lr in args.lrs:
    for seed in args.seeds:
      err = train(args.method, lr, seed, data, epochs=args.epochs,
                  batch=args.batch)
      rows.append({"lr": lr, "seed": seed, "test_error": err})
      print(f"{args.method} lr {lr:g} seed {seed}: test error "
            f"{100 * err:.2f} % ({time.time() - t0:.1f} s)", flush=True)
  if args.out:
    import json
    with open(args.out, "w") as f:
      json.dump({"method": args.method, "epochs": args.epochs,
                 "batch": args.batch, "rows": rows,
                 "seconds": time.time() - t0}, f, indent=1)
  return rows


if __name__ == "__main__":
  main()
