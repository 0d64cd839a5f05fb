"""Every ```python block of README.md and of the site's pages (docs/) runs, and does what
its text says; the README stays short and leads to every page.

The blocks of one section (a ``# `` or ``## `` heading of one page) run in order in one
namespace: a section reads as one story, and later blocks use what earlier ones defined.
Every section starts with torch and batchnorm (as ``bn``) imported, and with small random
stand-ins for the names the text leaves to the reader (see :func:`namespace`): ``x``, a
batch of 8x8 RGB images; ``model``, a small CNN with a ``bn.BatchNorm``, in train mode;
``train_loader``, four ``(input, target)`` batches; and, in the working directory (a fresh
``tmp_path``), ``model.keras``, a saved Keras model (a test fixture).

A block that cannot run here is preceded by a ``<!-- not run: reason -->`` line;
:data:`NOT_RUN` lists every such block, so that the list stays short and named. A block
that warns fails (an example that warns is doing something wrong), except for torch's own
deprecation notices. :data:`CHECKS` then checks, per section, that the blocks did what the
text around them says.
"""

from __future__ import annotations

import importlib.util
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
DOCS = ROOT / "docs"
# README.md, then the site's pages: paths relative to the repository, as the tests name them.
PAGES = ["README.md"] + sorted(str(p.relative_to(ROOT)) for p in DOCS.rglob("*.md"))
KERAS_FIXTURE = ROOT / "tests" / "fixtures" / "keras" / "keras3.keras"
NOT_RUN_MARK = re.compile(r"^<!-- not run: (.+) -->$")
LANGUAGES = {"python", "bash", "text"}
# Pages whose unlabelled blocks are plain-text drawings (module trees, data flow).
PLAIN_TEXT_PAGES = {"docs/architecture.md"}
README_MAX_LINES = 300

# (page, section, reason) of every block marked as not run here.
NOT_RUN = [
    ("docs/distributed.md", "Synchronized statistics across processes",
     "needs torchrun, several processes and GPUs (nccl, DistributedDataParallel on cuda)"),
    ("docs/keras-layer.md", "What Keras 3 lacks that this brings",
     "needs a tf_keras model and its saved weights"),
    ("docs/scaling-out.md", "PyTorch Lightning",
     "starts two processes; tests/test_integrations_lightning.py runs this Trainer"),
    ("docs/scaling-out.md", "Hugging Face accelerate",
     "needs your model and data; tests/test_integrations_accelerate.py runs it as written on "
     "two processes"),
    ("docs/scaling-out.md", "FSDP2 (`fully_shard`)",
     "needs a process group, your model's blocks and data; tests/test_integrations_fsdp.py "
     "shards the same way"),
]


@dataclass(frozen=True)
class Block:
    page: str
    section: str
    line: int  # of the opening fence, 1-based
    language: str
    code: str
    not_run: str | None


def read_blocks(page: str, text: str) -> list[Block]:
    """Every fenced block of ``text`` with its section and its not-run reason."""
    blocks, section, lines = [], "", text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith(("# ", "## ")):
            section = line.split(" ", 1)[1].strip()
        elif line.startswith("```"):
            language, start, body = line[3:].strip(), i, []
            i += 1
            while not lines[i].startswith("```"):
                body.append(lines[i])
                i += 1
            previous = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
            mark = NOT_RUN_MARK.match(previous.strip())
            blocks.append(Block(page, section, start + 1, language, "\n".join(body) + "\n",
                                mark.group(1) if mark else None))
        i += 1
    return blocks


BLOCKS = [b for page in PAGES for b in read_blocks(page, (ROOT / page).read_text())]
SECTIONS = list(dict.fromkeys((b.page, b.section) for b in BLOCKS
                              if b.language == "python" and not b.not_run))


def namespace() -> dict:
    """What every section starts with: the imports and the stand-ins."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), bn.BatchNorm(8),
                          nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)).train()
    train_loader = [(torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))) for _ in range(4)]
    return {"__name__": "docs", "torch": torch, "bn": bn, "model": model,
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


def run_section(page: str, section: str, directory: Path) -> dict:
    """Run ``section``'s python blocks of ``page`` in ``directory``; return their namespace."""
    shutil.copy(KERAS_FIXTURE, directory / "model.keras")
    ns = namespace()
    blocks = [b for b in BLOCKS if (b.page, b.section) == (page, section)
              and b.language == "python" and not b.not_run]
    assert blocks, f"{page} has no python block to run in section {section!r}"
    for block in blocks:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch")
            warnings.filterwarnings("ignore", category=FutureWarning, module="torch")
            # Keras's torch backend converts tensors with np.array (numpy 2's copy keyword)
            warnings.filterwarnings("ignore", category=DeprecationWarning, module="keras")
            exec(compile(block.code, f"{page}:{block.line}", "exec"), ns)  # noqa: S102
    return ns


def relative_links(text: str) -> list[str]:
    """The targets of ``text``'s Markdown links that are not URLs, without their anchors."""
    targets = re.findall(r"\]\(([^)\s]+)\)", text)
    return [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:", t) and t[0] != "#"]


# ---------------------------------------------------------------------------- what the text says


def the_layer_in_a_model(ns: dict) -> None:
    model, layer = ns["model"], ns["layer"]
    # one training call, then the deferred pass's update, applied: "kept = 1"
    assert ns["kept"] == 1 and model[1].num_updates.item() == 2
    assert layer.trainable is False and layer.num_updates.item() == 1


def the_functional_api(ns: dict) -> None:
    assert ns["state"].num_updates.item() == 1
    y = ns["y"]  # normalize(..., axis=1) with the batch's own moments: standardized
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(16), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.var((0, 2, 3), unbiased=False), torch.ones(16), atol=1e-2,
                               rtol=0)  # v / (v + epsilon): 1 within epsilon


def under_torch_func(ns: dict) -> None:
    # 4 models, one training call each on its own 8 samples: each model's own counter moved.
    assert ns["ys"].shape == (4, 8, 16)
    assert ns["buffers"]["num_updates"].tolist() == [1, 1, 1, 1]


def readme_coming_from_torch_nn(ns: dict) -> None:
    layer = ns["model"][1]
    assert isinstance(layer, bn.BatchNorm) and layer.momentum == pytest.approx(0.9)
    assert torch.equal(layer.moving_variance, ns["checkpoint"]["1.running_var"])


def coming_from_torch_nn(ns: dict) -> None:
    layer = ns["model"][1]
    assert isinstance(layer, bn.BatchNorm) and layer.momentum == pytest.approx(0.9)
    assert torch.equal(layer.beta, torch.zeros(16))
    assert torch.equal(layer.moving_variance, ns["checkpoint"]["1.running_var"])


def masks(ns: dict) -> None:
    assert ns["y"].shape == (8, 64, 100) and ns["mask"].shape == (8, 100)


def fused_kernels(ns: dict) -> None:
    assert ns["layer"].fused is True


def gradient_accumulation(ns: dict) -> None:
    # one update for the 4 micro-batches, and their gradients
    assert ns["model"][1].num_updates.item() == 1
    assert all(p.grad is not None for p in ns["model"].parameters())


def activation_checkpointing(ns: dict) -> None:
    assert ns["model"][1].num_updates.item() == 1  # the forward pass only: no recomputation


def buffers_written_before_backward(ns: dict) -> None:
    # the GAN's two training calls: two updates, and their backward ran after the write
    assert ns["model"][1].num_updates.item() == 2
    assert all(p.grad is not None for p in ns["model"].parameters())


def deployment(ns: dict) -> None:
    assert ns["program"].module()(torch.randn(7, 3, 32, 32)).shape == (7, 8, 30, 30)


def recalibrate(ns: dict) -> None:
    assert ns["report"]


def diagnose(ns: dict) -> None:
    assert ns["findings"] == []


def monitor(ns: dict) -> None:
    assert all(len(records) == 4 for records in ns["monitor"].history.values())
    assert Path("bn_statistics.png").stat().st_size > 0


def convert_to_torch(ns: dict) -> None:
    assert ns["not_converted"] == [] and isinstance(ns["back"][1], nn.BatchNorm2d)


def freeze_unfreeze(ns: dict) -> None:
    assert ns["frozen"] == ["1"] and ns["model"][1].trainable


def fold(ns: dict) -> None:
    assert len(ns["pairs"]) == 1 and ns["not_folded"] == []


def keras_import(ns: dict) -> None:
    assert set(ns["layers"]) == {"bn_dense", "bn_conv", "bn_renorm"}


CHECKS: dict[tuple[str, str], Callable[[dict], None]] = {
    ("README.md", "The layer"): the_layer_in_a_model,
    ("README.md", "The functional API"): the_functional_api,
    ("README.md", "Coming from torch.nn"): readme_coming_from_torch_nn,
    ("docs/getting-started.md", "The layer in a model"): the_layer_in_a_model,
    ("docs/getting-started.md", "The functional API"): the_functional_api,
    ("docs/getting-started.md", "Under torch.func and torch.compile"): under_torch_func,
    ("docs/layer.md", "Coming from `torch.nn.BatchNorm*d`"): coming_from_torch_nn,
    ("docs/training-modes.md", "Masks"): masks,
    ("docs/training-modes.md", "Fused kernels"): fused_kernels,
    ("docs/training-loops.md", "Gradient accumulation"): gradient_accumulation,
    ("docs/training-loops.md", "Activation checkpointing"): activation_checkpointing,
    ("docs/training-loops.md", "Buffers written between forward and backward"):
        buffers_written_before_backward,
    ("docs/deployment.md", "torch.export"): deployment,
    ("docs/tools.md", "recalibrate (PreciseBN)"): recalibrate,
    ("docs/tools.md", "diagnose"): diagnose,
    ("docs/tools.md", "Monitor"): monitor,
    ("docs/tools.md", "convert and to_torch"): convert_to_torch,
    ("docs/tools.md", "freeze and unfreeze"): freeze_unfreeze,
    ("docs/tools.md", "fold"): fold,
    ("docs/keras.md", "Keras import"): keras_import,
}


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize(("page", "section"), SECTIONS, ids=[f"{p}:{s}" for p, s in SECTIONS])
def test_a_section_s_python_blocks_run_and_do_what_it_says(page, section, tmp_path,
                                                           monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = run_section(page, section, tmp_path)
    if (page, section) in CHECKS:
        CHECKS[page, section](ns)


def test_every_checked_section_has_python_blocks():
    assert set(CHECKS) <= set(SECTIONS)


def test_not_run_blocks_are_few_and_named():
    assert [(b.page, b.section, b.not_run) for b in BLOCKS if b.not_run] == NOT_RUN


def test_every_block_names_its_language():
    unnamed = [f"{b.page}:{b.line}" for b in BLOCKS if b.language not in LANGUAGES
               and not (b.language == "" and b.page in PLAIN_TEXT_PAGES)]
    assert unnamed == [], f"blocks at {unnamed}: fence them as {LANGUAGES}"


def test_the_readme_has_at_most_300_lines():
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, \
        f"README.md has {lines} lines: move the detail to a page under docs/"


def test_the_readme_links_every_page_of_the_site():
    # Its contents: every page of docs/, the API reference by its index; docs/index.md is
    # the site's own home, the README's counterpart.
    pages = [p for p in PAGES if p.count("/") == 1 and p != "docs/index.md"]
    linked = {str((ROOT / target).resolve().relative_to(ROOT))
              for target in relative_links(README.read_text())}
    assert [page for page in pages + ["docs/reference/index.md"] if page not in linked] == []


@pytest.mark.parametrize("page", PAGES)
def test_every_relative_link_of_a_page_names_a_file(page):
    folder = (ROOT / page).parent
    missing = [t for t in relative_links((ROOT / page).read_text()) if not (folder / t).exists()]
    assert missing == [], f"{page} links to files that do not exist: {missing}"


def heading_anchor(heading: str) -> str:
    """A heading's anchor as GitHub and the site's ``toc`` both make it (lower case, no
    punctuation but ``-`` and ``_``, spaces as ``-``), for headings without a " / "."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_anchor_the_readme_links_to_is_a_heading_of_its_page():
    # The site checks its own pages' anchors (mkdocs build --strict); the README is not a page.
    links = re.findall(r"\]\((docs/[^)#\s]+)#([^)\s]+)\)", README.read_text())
    missing = [f"{page}#{anchor}" for page, anchor in links
               if anchor not in {heading_anchor(h) for h in
                                 re.findall(r"^#+ (.+)$", (ROOT / page).read_text(), re.M)}]
    assert missing == []


def griffe_markdown():
    """The site's Griffe extension (docs/griffe_markdown.py), where mkdocs is installed."""
    pytest.importorskip("griffe")
    spec = importlib.util.spec_from_file_location("griffe_markdown", DOCS / "griffe_markdown.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_reference_shows_rest_roles_and_math_as_code():
    # Sphinx shows a "~"-prefixed target by its last component.
    text = ":func:`~batchnorm.accumulate`, :class:`batchnorm.BatchNorm`, :math:`m_t`\n" \
           ".. math:: y = x"
    assert griffe_markdown().markdown(text) == \
        "`accumulate`, `batchnorm.BatchNorm`, `m_t`\n`y = x`"


def test_the_reference_shows_a_bare_doctest_as_a_code_block():
    text = "Reads the device.\n\n>>> layer.check_health()\n0\n\nAfter."
    assert griffe_markdown().markdown(text) == \
        "Reads the device.\n\n```pycon\n>>> layer.check_health()\n0\n```\n\nAfter."


def test_the_reader_finds_the_functional_example_s_fix():
    # The functional example once called normalize with moments' (16,) statistics on an
    # (8, 16, 4, 4) input, which failed inside torch.addcmul; now it names axis=.
    x = torch.randn(8, 16, 4, 4)
    mean, variance = bn.functional.moments(x, axes=[0, 2, 3])
    with pytest.raises(ValueError, match="axis=1"):
        bn.functional.normalize(x, mean, variance, None, None, 1e-3)
