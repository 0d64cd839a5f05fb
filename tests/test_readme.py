"""Every ```python block of README.md runs, and does what its text says.

The blocks of one ``## `` section run in order in one namespace: a section reads as one
story, and later blocks use what earlier ones defined. The README imports torch and
batchnorm (as ``bn``) once, in *Usage*; every section starts with both, and with small
random stand-ins for the names the text leaves to the reader (see :func:`namespace`):
``x``, a batch of 8x8 RGB images; ``model``, a small CNN with a ``bn.BatchNorm``, in
train mode; ``train_loader``, four ``(input, target)`` batches; and, in the working
directory (a fresh ``tmp_path``), ``model.keras``, a saved Keras model (a test fixture).

A block that cannot run here is preceded by a ``<!-- not run: reason -->`` line;
:data:`NOT_RUN` lists every such block, so that the list stays short and named. A block
that warns fails (a README example that warns is doing something wrong), except for
torch's own deprecation notices. :data:`CHECKS` then checks, per section, that the blocks
did what the text around them says.
"""

from __future__ import annotations

import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn

import batchnorm as bn

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
KERAS_FIXTURE = ROOT / "tests" / "fixtures" / "keras" / "keras3.keras"
NOT_RUN_MARK = re.compile(r"^<!-- not run: (.+) -->$")
LANGUAGES = {"python", "bash", "text"}

# (section, reason) of every block the README marks as not run here.
NOT_RUN = [
    ("Synchronized statistics across processes",
     "needs torchrun, several processes and GPUs (nccl, DistributedDataParallel on cuda)"),
]


@dataclass(frozen=True)
class Block:
    section: str
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    not_run: str | None


def read_blocks(text: str) -> list[Block]:
    """Every fenced block of ``text`` with its ``## `` section and its not-run reason."""
    blocks, section, lines = [], "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        elif line.startswith("```"):
            language, start, body = line[3:].strip(), i, []
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            mark = NOT_RUN_MARK.match(previous.strip())
            blocks.append(Block(section, start + 1, language, "\n".join(body) + "\n",
                                mark.group(1) if mark else None))
        i += 1
    return blocks


BLOCKS = read_blocks(README.read_text())
SECTIONS = list(dict.fromkeys(b.section for b in BLOCKS
                              if b.language == "python" and not b.not_run))


def namespace() -> dict:
    """What every section starts with: the README's imports and the stand-ins."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), bn.BatchNorm(8),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).train()
    train_loader = [(torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))) for _ in range(4)]
    return {"__name__": "readme", "torch": torch, "bn": bn, "model": model,
            "x": torch.randn(16, 3, 8, 8), "train_loader": train_loader,
            # The training-loop fragments' names: micro-batches, a loss, an optimizer, a
            # checkpointed block (the model), a GAN's two batches and an EMA of the buffers.
            "chunks": [torch.randn(8, 3, 8, 8) for _ in range(4)],
            "loss_fn": lambda *ys: sum(y.square().mean() for y in ys),
            "optimizer": torch.optim.SGD(model.parameters(), lr=0.01), "block": model,
            "real": torch.randn(8, 3, 8, 8), "fake": torch.randn(8, 3, 8, 8),
            "ema": _BufferEMA()}


class _BufferEMA:
    """Stands in for an EMA of the model's statistics: writes every buffer in place."""

    def update(self, model: nn.Module) -> None:
        with torch.no_grad():
            for buffer in model.buffers():
                if buffer.is_floating_point():
                    buffer.mul_(0.5)


def run_section(section: str, directory: Path) -> dict:
    """Run ``section``'s python blocks in ``directory``; return their namespace."""
    shutil.copy(KERAS_FIXTURE, directory / "model.keras")
    ns = namespace()
    blocks = [b for b in BLOCKS
              if b.section == section and b.language == "python" and not b.not_run]
    assert blocks, f"README.md has no python block to run in section {section!r}"
    for block in blocks:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch")
            warnings.filterwarnings("ignore", category=FutureWarning, module="torch")
            exec(compile(block.code, f"README.md:{block.line}", "exec"), ns)  # noqa: S102
    return ns


# ---------------------------------------------------------------------------- what the text says


def usage(ns: dict) -> None:
    model, layer = ns["model"], ns["layer"]
    # one training call, then the deferred pass's update, applied: "kept = 1"
    assert ns["kept"] == 1 and model[1].num_updates.item() == 2
    assert layer.trainable is False and layer.num_updates.item() == 1
    assert ns["state"].num_updates.item() == 1
    y = ns["y"]  # normalize(..., axis=1) with the batch's own moments: standardized
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var((0, 2, 3), unbiased=False), torch.ones(16), atol=1e-2,
                               rtol=0)  # v / (v + epsilon): 1 within epsilon


def the_layer(ns: dict) -> None:
    layer = ns["model"][1]
    assert isinstance(layer, bn.BatchNorm) and layer.momentum == pytest.approx(0.9)
    assert torch.equal(layer.beta, torch.zeros(16))
    assert torch.equal(layer.moving_variance, ns["checkpoint"]["1.running_var"])


def training_modes(ns: dict) -> None:
    assert ns["y"].shape == (8, 64, 100) and ns["mask"].shape == (8, 100)
    assert ns["layer"].fused is True


def deployment(ns: dict) -> None:
    assert ns["program"].module()(torch.randn(7, 3, 32, 32)).shape == (7, 8, 30, 30)


def tools(ns: dict) -> None:
    assert ns["report"] and ns["findings"] == []
    assert all(len(records) == 4 for records in ns["monitor"].history.values())
    assert Path("bn_statistics.png").stat().st_size > 0
    assert set(ns["layers"]) == {"bn_dense", "bn_conv", "bn_renorm"}
    assert ns["not_converted"] == [] and isinstance(ns["back"][1], nn.BatchNorm2d)
    assert ns["frozen"] == ["1"] and ns["model"][1].trainable
    assert len(ns["pairs"]) == 1 and ns["not_folded"] == []


def training_loops(ns: dict) -> None:
    # accumulate: one update for 4 micro-batches; checkpoint (forward only): one; the GAN's
    # two training calls: two, and their backward ran after the buffers were written.
    assert ns["model"][1].num_updates.item() == 4
    assert all(p.grad is not None for p in ns["model"].parameters())


CHECKS: dict[str, Callable[[dict], None]] = {
    "Usage": usage,
    "Training loops": training_loops,
    "The layer": the_layer,
    "Training modes": training_modes,
    "Deployment": deployment,
    "Tools": tools,
}


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("section", SECTIONS)
def test_readme_section_runs_and_does_what_it_says(section, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_section(section, tmp_path)
    if section in CHECKS:
        CHECKS[section](ns)


def test_every_checked_section_has_python_blocks():
    assert set(CHECKS) <= set(SECTIONS)


def test_not_run_blocks_are_few_and_named():
    assert [(b.section, b.not_run) for b in BLOCKS if b.not_run] == NOT_RUN


def test_every_block_names_its_language():
    unnamed = [b.line for b in BLOCKS if b.language not in LANGUAGES]
    assert unnamed == [], f"README.md blocks at lines {unnamed}: fence them as {LANGUAGES}"


def test_the_reader_finds_the_functional_example_s_fix():
    # The README's functional example once called normalize with moments' (16,) statistics
    # on an (8, 16, 4, 4) input, which failed inside torch.addcmul; now it names axis=.
    x = torch.randn(8, 16, 4, 4)
    mean, variance = bn.functional.moments(x, axes=[0, 2, 3])
    with pytest.raises(ValueError, match="axis=1"):
        bn.functional.normalize(x, mean, variance, None, None, 1e-3)
