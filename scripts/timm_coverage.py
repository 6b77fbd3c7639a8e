"""Which of timm's CNN families ``fcconv.convolutionalize`` converts: writes docs/coverage.md.

A family is the timm module that registers a model (``timm.list_modules()``: ``resnet``, ``vgg``, ...).
For each family the script picks its smallest classifier by parameter count (built on PyTorch's
``meta`` device: no memory, no weights) and sorts the family as a CNN or lists it apart. A family's
members may differ in their head (``mobilenetv3`` registers MobileNetV3, whose ``forward_head`` is
pool, conv, activation, and MobileNetV4, whose head adds a ``BatchNormAct2d``): the members are
grouped by **head layout**, the types of the modules their ``forward_head`` calls (recorded on meta
features), and the smallest CNN of every head layout is checked too, one row each.

* **transformer and token families** (listed apart, not counted): the model cuts the image into a
  fixed sequence of patch tokens (it holds a ``timm.layers.PatchEmbed``), or its forward multiplies
  two activations (``bmm``, ``baddbmm`` or ``scaled_dot_product_attention`` in the ops that a meta
  forward dispatches: attention scores), or its family is in ``GLOBAL_MIXERS`` (attention written with
  element-wise products, which the op rule cannot see). A family is a CNN family if one of its eight
  smallest classifiers is none of these; the smallest such model represents it (``metaformer``:
  ``poolformer``, not ``caformer``).
* timm's ``test_*`` models (toy configurations for timm's own tests) and models whose pretrained
  config has no classes (feature encoders) are skipped.

Each CNN model is then built with random weights (``pretrained=False``, ``HF_HUB_OFFLINE=1``: nothing
is downloaded), put in eval mode and float64, and checked in a forked process (a crash or a timeout
costs one row, not the run):

1. ``convolutionalize(model, input_size)`` at its ``pretrained_cfg`` input size;
2. ``compare(model, fcn, inputs=x)`` on one seeded float64 input at that size: the certified verdict;
3. ``fcn.grid_shape`` at a larger, non-square size (+64 px high, +32 px wide) against the shape of
   the map the FCN returns there. The table also gives ``fcn.exact_sliding_window``.

Usage::

    PYTHONPATH=src python scripts/timm_coverage.py                      # all families, docs/coverage.md
    PYTHONPATH=src python scripts/timm_coverage.py --families resnet,vgg --out /tmp/coverage.md
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing
import os
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"  # before timm imports huggingface_hub: never touch the network

import timm  # noqa: E402
import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from tqdm import tqdm  # noqa: E402

from fcconv import FcconvError, compare, convolutionalize  # noqa: E402

#: aten ops that multiply two activations: attention scores and their weighted sums.
ATTENTION_OPS = ("bmm", "baddbmm", "_scaled_dot_product")
#: families whose token mixing is global but written without a product of two activations.
GLOBAL_MIXERS = {
    "mobilevit": "attention (MobileViT: bmm; MobileViTv2 separable self-attention: "
                 "a softmax over all patches)",
    "swiftformer": "attention (efficient additive attention: a query pooled over all tokens)",
}
#: how much larger than the training size the grid is checked at (height, width).
LARGER_BY = (64, 32)
#: results that count as converted.
CONVERTED = "converted"


@dataclass
class Pick:
    """The model that stands for a family, and whether the family is a CNN one."""

    family: str
    model: str
    params: int
    cnn: bool
    why_apart: str = ""
    head: str = "?"  # the head layout: the module types forward_head calls, in order


@dataclass
class Row:
    """One line of the CNN table."""

    pick: Pick
    input_size: tuple[int, ...]
    result: str
    why: str
    seconds: float


class _OpRecorder(TorchDispatchMode):
    """Records the names of the aten ops a forward dispatches."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: set[str] = set()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.add(func._overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def first_line(error: BaseException) -> str:
    """The first line of an error's message, prefixed by its type unless it is fcconv's own."""
    text = (str(error).strip().splitlines() or [""])[0]
    return text if isinstance(error, FcconvError) else f"{type(error).__name__}: {text}"


def _meta_model(name: str) -> torch.nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False).eval()


def why_not_cnn(name: str, model: torch.nn.Module) -> str:
    """Why the model is a transformer or token model, or "" for a CNN (see the module docstring)."""
    if any(isinstance(m, timm.layers.PatchEmbed) for m in model.modules()):
        return "patch tokens (timm.layers.PatchEmbed)"
    size = tuple(timm.models.get_pretrained_cfg_value(name, "input_size") or (3, 224, 224))
    recorder = _OpRecorder()
    try:
        with recorder, torch.no_grad():
            model(torch.empty(1, *size, device="meta"))
    except Exception:  # noqa: BLE001 - not decidable on meta: let the real run say what happens
        return ""
    found = sorted(op for op in recorder.ops if op.startswith(ATTENTION_OPS))
    return f"attention (multiplies activations: {', '.join(found)})" if found else ""


def head_layout(name: str, model: torch.nn.Module) -> str:
    """The types of the modules ``model.forward_head`` calls, in call order, or "?" if unknown."""
    size = tuple(timm.models.get_pretrained_cfg_value(name, "input_size") or (3, 224, 224))
    called: list[str] = []
    try:
        with torch.no_grad():
            features = model.forward_features(torch.empty(1, *size, device="meta"))
            handles = [m.register_forward_hook(lambda m, *_: called.append(type(m).__name__))
                       for m in model.modules() if m is not model]
            try:
                model.forward_head(features)
            finally:
                for handle in handles:
                    handle.remove()
    except Exception:  # noqa: BLE001 - not decidable on meta: one layout for all such members
        return "?"
    return ", ".join(called) or "functions only"


def candidates(family: str) -> list[tuple[int, str, str]]:
    """The family's classifiers as (parameter count, name, head layout), smallest first."""
    sized = []
    for name in timm.list_models(module=family):
        if name.startswith("test_") or not timm.models.get_pretrained_cfg_value(name, "num_classes"):
            continue
        try:
            model = _meta_model(name)
            params, head = sum(p.numel() for p in model.parameters()), head_layout(name, model)
        except Exception:  # noqa: BLE001 - a model that cannot be built on meta goes last
            params, head = sys.maxsize, "?"
        sized.append((params, name, head))
    return sorted(sized)


def _first_cnn(family: str, sized: list[tuple[int, str, str]], tries: int) -> tuple[Pick | None, list[str]]:
    """The smallest CNN among the first ``tries`` of ``sized``, and why the others are not."""
    reasons = []
    for params, name, head in sized[:tries]:
        try:
            why = why_not_cnn(name, _meta_model(name)) if params != sys.maxsize else ""
        except Exception:  # noqa: BLE001
            why = ""
        if not why:
            return Pick(family, name, params, cnn=True, head=head), reasons
        reasons.append(why)
    return None, reasons


def picks(family: str, tries: int = 8) -> list[Pick]:
    """The smallest CNN classifier of a family and of each other head layout in it, or its
    smallest model listed apart."""
    sized = candidates(family)
    if not sized:
        return []
    if family in GLOBAL_MIXERS:
        return [Pick(family, sized[0][1], sized[0][0], cnn=False, why_apart=GLOBAL_MIXERS[family])]
    first, reasons = _first_cnn(family, sized, tries)
    if first is None:
        params, name, head = sized[0]
        return [Pick(family, name, params, cnn=False, why_apart=reasons[0], head=head)]
    found = [first]
    for head in dict.fromkeys(h for _, _, h in sized):  # every other head layout, smallest first
        if head != first.head:
            other, _ = _first_cnn(family, [c for c in sized if c[2] == head], tries)
            found += [other] if other is not None else []
    return found


def check(name: str) -> tuple[tuple[int, ...], str, str]:
    """Convert one model and check it: (input size, result, why)."""
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval().double()
    shape = tuple(model.pretrained_cfg["input_size"])
    try:
        fcn = convolutionalize(model, shape)
    except Exception as error:  # noqa: BLE001 - the row says what was raised
        return shape, "refused" if isinstance(error, FcconvError) else "crashed", first_line(error)
    x = torch.randn((1, *shape), dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    try:
        report = compare(model, fcn, inputs=x)
    except Exception as error:  # noqa: BLE001
        return shape, "compare failed", first_line(error)
    if not report.equivalent:
        return shape, "not equivalent", f"float64 max rel {report.float64_max_rel:.1e}: {report.reason}"
    big = tuple(s + d for s, d in zip(shape[1:], LARGER_BY))
    try:
        expected = fcn.grid_shape(big)
        with torch.no_grad():
            actual = tuple(fcn(torch.zeros((1, shape[0], *big), dtype=torch.float64)).shape[2:])
    except Exception as error:  # noqa: BLE001
        return shape, "fails larger", f"at {big[0]}x{big[1]}: {first_line(error)}"
    if expected != actual:
        return shape, "wrong grid", f"grid_shape{big} = {expected}, the map is {actual}"
    return shape, CONVERTED, (f"float64 max rel {report.float64_max_rel:.1e}; map {actual[0]}x{actual[1]} "
                              f"at {big[0]}x{big[1]}, stride {fcn.stride}; exact_sliding_window "
                              f"{fcn.exact_sliding_window}")


def _child(name: str, connection: Any) -> None:
    torch.set_num_threads(1)
    try:
        connection.send(check(name))
    except BaseException as error:  # noqa: BLE001 - building the model failed: report, do not crash
        connection.send(((), "model error", first_line(error)))
    connection.close()


def run_isolated(pick_: Pick, timeout: float) -> Row:
    """:func:`check` in a child process, killed after ``timeout`` seconds."""
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    receive, send = context.Pipe(duplex=False)
    start = time.perf_counter()
    process = context.Process(target=_child, args=(pick_.model, send), daemon=True)
    process.start()
    send.close()
    result: tuple[tuple[int, ...], str, str] = ((), "timeout", f"no result within {timeout:.0f} s")
    if receive.poll(timeout):
        try:
            result = receive.recv()
        except EOFError:
            result = ((), "crashed", "the process died")
    process.join(5)
    if process.is_alive():
        process.kill()
        process.join()
    elif process.exitcode and result[1] in ("timeout", "crashed"):
        result = ((), "crashed", f"the process died with exit code {process.exitcode}")
    return Row(pick_, *result, seconds=time.perf_counter() - start)


def _cell(text: str, limit: int = 400) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def render(rows: list[Row], apart: list[Pick], none: list[str], elapsed: float, complete: bool) -> str:
    """The markdown page."""
    families = {r.pick.family for r in rows}
    ok = len(families - {r.pick.family for r in rows if r.result != CONVERTED})
    share = f"{100 * ok / len(families):.0f}%" if families else "n/a"
    lines = [
        "# Coverage of timm",
        "",
        f"Generated by `scripts/timm_coverage.py` on {datetime.date.today()} with timm {timm.__version__} "
        f"and torch {torch.__version__.split('+')[0]}, in {elapsed / 60:.1f} min on one CPU thread"
        + ("" if complete else " (**partial: the run was interrupted**)") + ". Do not edit: run it again.",
        "",
        f"**{ok} of {len(families)} CNN families convert ({share}).** A family converts when every "
        "head layout of it does. Each family is represented by its smallest classifier (by parameter "
        "count) and by the smallest of each other head layout among its members (the module types its "
        "`forward_head` calls), built with random weights. *converted* means: "
        "`convolutionalize(model, input_size)` at the model's `pretrained_cfg` input size, `compare` "
        "certifies it equal to the model in float64 on a seeded input at that size, and `fcn.grid_shape` "
        f"gives the shape of the map the FCN returns at a size {LARGER_BY[0]} px higher and {LARGER_BY[1]} "
        "px wider. Otherwise *why* is the first line of what was raised. How families are chosen and "
        "sorted: the docstring of the script.",
        "",
        "## CNN families",
        "",
        "| family | model | params | input | result | seconds | why | head layout |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r.result != CONVERTED, r.result, r.pick.family, r.pick.params)):
        size = "x".join(map(str, r.input_size[1:])) or "-"
        lines.append(f"| {r.pick.family} | `{r.pick.model}` | {r.pick.params / 1e6:.1f}M | {size} | "
                     f"{r.result} | {r.seconds:.0f} | {_cell(r.why)} | {_cell(r.pick.head, 160)} |")
    lines += [
        "",
        "## Transformer and token families (listed apart)",
        "",
        "Not counted above: their models read the image as a fixed sequence of patch tokens or mix "
        "positions by attention, so they have no sliding-window form to convert to.",
        "",
        "| family | smallest model | why apart |",
        "|---|---|---|",
    ]
    lines += [f"| {p.family} | `{p.model}` | {p.why_apart} |" for p in sorted(apart, key=lambda p: p.family)]
    if none:
        lines += ["", f"Families with no classifier (only feature encoders, or only `test_*` models): "
                  f"{', '.join(sorted(none))}."]
    return "\n".join(lines) + "\n"


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="", help="comma-separated timm modules (default: all)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parents[1] / "docs" / "coverage.md")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds per model")
    args = parser.parse_args(None if argv is None else list(argv))
    torch.set_num_threads(1)
    known = timm.list_modules()
    families = [f.strip() for f in args.families.split(",") if f.strip()] or known
    unknown = sorted(set(families) - set(known))
    if unknown:
        parser.error(f"unknown timm families {unknown}; they are: {', '.join(known)}")
    start = time.perf_counter()
    picked = {f: picks(f) for f in tqdm(families, desc="sorting families", unit="family")}
    chosen = [p for found in picked.values() for p in found]
    none = [f for f, found in picked.items() if not found]
    apart = [p for p in chosen if not p.cnn]
    rows: list[Row] = []
    bar = tqdm([p for p in chosen if p.cnn], desc="converting", unit="model")
    for p in bar:
        bar.set_postfix_str(p.model)
        rows.append(run_isolated(p, args.timeout))
        tqdm.write(f"{p.family:24} {p.model:28} {rows[-1].result:15} {rows[-1].seconds:6.1f}s "
                   f"{rows[-1].why[:150]}")
        args.out.write_text(render(rows, apart, none, time.perf_counter() - start, complete=False))
    args.out.write_text(render(rows, apart, none, time.perf_counter() - start, complete=True))
    ok = sum(r.result == CONVERTED for r in rows)
    print(f"{ok} of {len(rows)} models (head layouts of CNN families) convert; {len(apart)} listed apart; "
          f"{time.perf_counter() - start:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
