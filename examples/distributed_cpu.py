"""Distributed training on CPU with synchronized statistics: 2 processes on gloo, each with
its half of every batch, normalized with the statistics of the whole (global) batch.

``bn.convert_sync(model)`` (or ``bn.BatchNorm(..., synchronized=True)``) makes each
training call gather every process's batch statistics, so that the step equals one
process training on the concatenated batch: the script trains both ways for a few steps
and prints, from rank 0, the largest difference of the parameters and of the moving
statistics between the two, over every process.

Run it from the repository root with torchrun (needs only the package)::

    torchrun --nproc-per-node 2 examples/distributed_cpu.py

(add ``--standalone`` to let torchrun pick a free port when another job uses its default,
29500). On GPUs: the ``"nccl"`` backend, ``model.cuda()`` and ``device_ids=[local_rank]``.
"""

import copy
import os
import sys

import torch
import torch.distributed as dist
from torch import nn

import batchnorm as bn

dist.init_process_group("gloo")  # torchrun sets the rank, the world size and the address
rank, world = dist.get_rank(), dist.get_world_size()

torch.manual_seed(0)  # the same initial model on every process
# unbiased_moving_variance=False: the variance a synchronized layer feeds its moving variance
# by default (tf_keras never fuses one), so that the unsynchronized reference feeds it too.
norm = bn.BatchNorm(8, unbiased_moving_variance=False)
model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), norm, nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
reference = copy.deepcopy(model)  # one process on the whole batch, for the comparison
ddp = nn.parallel.DistributedDataParallel(bn.convert_sync(model))

optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
reference_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1)
loss_fn = nn.CrossEntropyLoss()
data = torch.Generator().manual_seed(1)  # the same global batches on every process
for _ in range(5):
    x = torch.randn(16, 3, 12, 12, generator=data) * 2 + 1
    y = torch.randint(0, 4, (16,), generator=data)
    mine = slice(rank * 16 // world, (rank + 1) * 16 // world)  # as DistributedSampler would
    for net, opt, inputs, targets in ((ddp, optimizer, x[mine], y[mine]),
                                      (reference, reference_optimizer, x, y)):
        opt.zero_grad()
        loss_fn(net(inputs), targets).backward()  # ddp: averaged over the processes
        opt.step()


def max_difference(ours: nn.Module, theirs: nn.Module) -> torch.Tensor:
    """The largest |a - b| over the parameters and moving statistics of two models."""
    expected = theirs.state_dict()
    return max((value - expected[key]).abs().max()
               for key, value in ours.state_dict().items() if value.is_floating_point())


difference = max_difference(model, reference)  # this process's model
dist.all_reduce(difference, op=dist.ReduceOp.MAX)  # the largest over the processes
if rank == 0:
    # float32: the pooled statistics of the processes round differently from one process's.
    print(f"{world} processes, 5 steps: parameters and moving statistics on every process "
          f"equal those of one process on the whole batch to {difference.item():.3g} "
          "(max |difference|)")

# gloo can abort at interpreter exit after a clean run (a thread of the group still running
# while destructors run): wait for each other, destroy the group, and leave without them.
dist.barrier()
dist.destroy_process_group()
sys.stdout.flush()
os._exit(0)
