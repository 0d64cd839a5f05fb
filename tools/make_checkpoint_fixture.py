"""Write ``tests/fixtures/checkpoint/release_state_dicts.pt``: state dicts saved by a release.

Run (from the repository root, in the project's venv)::

    python tools/make_checkpoint_fixture.py

The file was written by the code as it was before the state dict carried a ``_version``
(the layout every checkpoint saved until then has): ``tests/test_checkpoint.py`` loads it
into the current layers and checks that they hold the same values and give the same
outputs. Do not regenerate it with newer code: it stands for checkpoints already saved.

Contents, a dict saved with ``torch.save``:

    layers    {name: {"kwargs": constructor keywords, "state_dict": the layer's state dict
              after the training calls, "x": an input, "y": the layer's inference output
              for x}} for every option that changes the parameters and buffers (default,
              renorm, debias, center/scale off, a lazy layer built by a call, a lazy layer
              never built)
    model     the state dict of an ``nn.Sequential`` of two layers (prefixed keys)

The inputs come from a fixed seed, so the file is deterministic for one torch version.
"""

from __future__ import annotations

import pathlib

import torch
from torch import nn

import batchnorm as bn

OUT = pathlib.Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "checkpoint"

LAYERS = {
    "default": {"num_features": 3},
    "renorm": {"num_features": 3, "renorm": True,
               "renorm_clipping": {"rmax": 3.0, "dmax": 5.0}},
    "debias": {"num_features": 3, "debias": True},
    "no_center_no_scale": {"num_features": 3, "center": False, "scale": False},
    "lazy": {"num_features": None},
    "lazy_unbuilt": {"num_features": None},
}


def trained(kwargs: dict, generator: torch.Generator, calls: int) -> tuple[bn.BatchNorm, dict]:
    kwargs = dict(kwargs)
    layer = bn.BatchNorm(kwargs.pop("num_features"), momentum=0.9, **kwargs)
    with torch.no_grad():
        if layer.gamma is not None and layer.num_features is not None:
            layer.gamma.copy_(1 + torch.rand(3, generator=generator))
        if layer.beta is not None and layer.num_features is not None:
            layer.beta.copy_(torch.randn(3, generator=generator))
    for _ in range(calls):
        layer(3 * torch.randn(8, 3, generator=generator) + 1, training=True)
    return layer, layer.state_dict()


def main() -> None:
    generator = torch.Generator().manual_seed(2026)
    layers = {}
    for name, kwargs in LAYERS.items():
        layer, state_dict = trained(kwargs, generator, 0 if name == "lazy_unbuilt" else 3)
        x = 2 * torch.randn(8, 3, generator=generator)
        y = None if layer.num_features is None else layer(x, training=False).detach()
        layers[name] = {"kwargs": kwargs, "state_dict": state_dict, "x": x, "y": y}
    model = nn.Sequential(trained(LAYERS["default"], generator, 2)[0],
                          trained(LAYERS["renorm"], generator, 2)[0])
    OUT.mkdir(parents=True, exist_ok=True)
    torch.save({"layers": layers, "model": model.state_dict()},
               OUT / "release_state_dicts.pt")


if __name__ == "__main__":
    main()
