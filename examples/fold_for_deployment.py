"""Folding for deployment: ``bn.fold`` folds each batch norm into the convolution or linear
layer before it, so that the inference model has no batch normalization left.

A small CNN trains for a few steps (so its moving averages are not the initial 0 and 1),
then ``bn.fold(model)`` returns an inference copy (the model itself is not changed), the
pairs it folded and what it could not fold, with the reason. The folded copy computes
the same function: the script prints the largest difference between the two outputs.

Run it from the repository root (needs only the package)::

    python examples/fold_for_deployment.py
"""

import torch
from torch import nn

import batchnorm as bn

torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(3, 16, 3, padding=1, bias=False), bn.BatchNorm(16), nn.ReLU(),
    nn.Conv2d(16, 32, 3, stride=2, bias=False), bn.BatchNorm(32, activation="relu"),
    nn.Flatten(), nn.Linear(32 * 7 * 7, 10), bn.BatchNorm(10, axis=-1),
)

# A few training steps on shifted, scaled batches: the moving averages move away from 0/1.
optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
model.train()
for _ in range(20):
    x = torch.randn(32, 3, 16, 16) * 2 + 0.5
    loss = model(x).square().mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()

folded, pairs, not_folded = bn.fold(model)
for batch_norm, layer in pairs:
    print(f"folded batch norm {batch_norm} into layer {layer}")
for batch_norm, reason in not_folded:
    print(f"left batch norm {batch_norm} in place: {reason}")

batch_norms_left = sum(isinstance(m, bn.BatchNorm) for m in folded.modules())
print(f"batch norms: {sum(isinstance(m, bn.BatchNorm) for m in model.modules())} before, "
      f"{batch_norms_left} after folding")

x = torch.randn(8, 3, 16, 16) * 2 + 0.5
with torch.no_grad():
    expected = model.eval()(x)
    difference = (folded(x) - expected).abs().max().item()
# float32: the folded weights round differently from normalizing after the layer.
print(f"max |folded - original| = {difference:.3g} (outputs up to "
      f"{expected.abs().max().item():.3g})")
