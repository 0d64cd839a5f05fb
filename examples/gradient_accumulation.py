"""Gradient accumulation: ``bn.accumulate(model)`` moves the moving averages once per
optimizer step, with the statistics of all the step's micro-batches together.

One optimizer step over a batch of 64 samples, fed as 4 micro-batches of 16 (when the
whole batch does not fit in memory). Each micro-batch is still normalized with its own
statistics, but inside ``bn.accumulate`` the layers update their moving averages once,
when the block exits, exactly as one training call on the whole batch would have. The
same loop with ``torch.nn.BatchNorm2d`` updates at every micro-batch: 4 updates per
step, from 16-sample statistics. The script prints how far each ends from the one-batch
update.

Run it from the repository root (needs only the package)::

    python examples/gradient_accumulation.py
"""

import copy

import torch
from torch import nn

import batchnorm as bn

torch.manual_seed(0)
torch_model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).train()
# The same model with bn.BatchNorm layers (torch's momentum and unbiased variance kept).
model = bn.convert(copy.deepcopy(torch_model))
one_batch = copy.deepcopy(model)  # the reference: one training call on the whole batch

batch = torch.randn(64, 3, 12, 12) * 2 + 1
targets = torch.randint(0, 4, (64,))
micro_batches = list(zip(batch.chunk(4), targets.chunk(4), strict=True))
loss_fn = nn.CrossEntropyLoss()

with torch.no_grad():
    one_batch(batch)  # a training call (train mode): only its averages are compared

optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
with bn.accumulate(model):  # the averages move once, when the block exits
    for x, y in micro_batches:
        (loss_fn(model(x), y) / len(micro_batches)).backward()
optimizer.step()
optimizer.zero_grad()

torch_optimizer = torch.optim.SGD(torch_model.parameters(), lr=0.1)
for x, y in micro_batches:  # torch.nn: every micro-batch updates the averages
    (loss_fn(torch_model(x), y) / len(micro_batches)).backward()
torch_optimizer.step()
torch_optimizer.zero_grad()

reference = one_batch[1]
for name, layer in (("bn.accumulate", model[1]), ("torch.nn", torch_model[1])):
    mean_error = (layer.running_mean - reference.running_mean).abs().max().item()
    var_error = ((layer.running_var - reference.running_var).abs()
                 / reference.running_var).max().item()
    print(f"{name}: {int(layer.num_batches_tracked)} update(s) for 1 step; moving mean "
          f"max |difference| {mean_error:.3g}, moving variance max relative difference "
          f"{var_error:.3g}, from one update with the whole batch")
