"""A plain PyTorch reference of the binary MLP step (FP, BC, SR, R with Adam).

The same network as ``qjax.models.MLP(features=(512, 512))``: flatten,
(Linear without bias, BatchNorm, ReLU) per hidden layer, a Linear output;
every Linear weight binary on BinaryConnect's per-layer grid ``{-H, +H}``
(H the Glorot scale, as ``qjax.glorot_scale``); cross-entropy; Adam.
Written as a researcher would in PyTorch, with nothing qjax-specific:

* ``fp``: Adam on float weights.
* ``bc``: the forward pass sees ``H sign(w_r)`` (straight-through gradient),
  Adam updates the float latent ``w_r``, clipped to ``[-H, H]``.
* ``sr``: weights stored on the grid (as floats); after Adam's step ``w +
  u`` is rounded stochastically to ``-H`` or ``+H``.
* ``r``: the same, rounded to the nearest point.

Only timing uses it (``benchmarks/step_throughput.py``); torch is an
optional dependency (the CPU wheel).
"""

from __future__ import annotations

import math

METHODS = ("fp", "bc", "sr", "r")


def _glorot(fan_in: int, fan_out: int) -> float:
  return math.sqrt(1.5 / (fan_in + fan_out))


class ReferenceStep:
  """One method's model, optimizer and a ``step(x, y)`` in PyTorch."""

  def __init__(self, method: str, features=(512, 512), num_inputs=784,
               num_classes=10, lr=1e-3, seed=0):
    import torch
    from torch import nn
    if method not in METHODS:
      raise ValueError(f"method must be one of {METHODS}; got {method!r}.")
    torch.manual_seed(seed)
    self.torch, self.method = torch, method
    layers, width = [], num_inputs
    for f in features:
      layers += [nn.Linear(width, f, bias=False), nn.BatchNorm1d(f),
                 nn.ReLU()]
      width = f
    layers.append(nn.Linear(width, num_classes))
    self.model = nn.Sequential(*layers)
    self.linears = [m for m in self.model if isinstance(m, nn.Linear)]
    self.scales = [_glorot(m.in_features, m.out_features)
                   for m in self.linears]
    with torch.no_grad():
      for m, h in zip(self.linears, self.scales):
        if method in ("sr", "r"):
          m.weight.copy_(torch.where(m.weight >= 0, h, -h))
        elif method == "bc":
          m.weight.clamp_(-h, h)
    self.opt = torch.optim.Adam(self.model.parameters(), lr=lr)
    self.loss = nn.CrossEntropyLoss()

  def step(self, x, y):
    torch = self.torch
    latents = None
    if self.method == "bc":  # forward on H sign(w_r), gradient to w_r (STE)
      latents = [m.weight.detach().clone() for m in self.linears]
      with torch.no_grad():
        for m, h in zip(self.linears, self.scales):
          m.weight.copy_(torch.where(m.weight >= 0, h, -h))
    self.opt.zero_grad(set_to_none=True)
    loss = self.loss(self.model(x), y)
    loss.backward()
    with torch.no_grad():
      if latents is not None:
        for m, w in zip(self.linears, latents):
          m.weight.copy_(w)
    self.opt.step()
    with torch.no_grad():
      for m, h in zip(self.linears, self.scales):
        w = m.weight
        if self.method == "bc":
          w.clamp_(-h, h)
        elif self.method == "sr":
          p_up = ((w + h) / (2 * h)).clamp_(0, 1)
          w.copy_(torch.where(torch.rand_like(w) < p_up, h, -h))
        elif self.method == "r":
          w.copy_(torch.where(w >= 0, h, -h))
    return loss.detach()
