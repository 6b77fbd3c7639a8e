"""Draw docs/streaming-rows.png: the rows each layer of resnet18 keeps while a map is streamed.

Runs the row-streaming executor on resnet18 (3 x 1024 x 224 image, float32) and stops it half-way
down: for each layer (a row of the figure), the rows it has made so far (light) and the rows it
still holds (dark: the ring its consumers' next windows read, plus the rows of the current step),
in image rows (row j of a layer of stride s and offset o sits at image row o + s*j).

Usage: python scripts/streaming_rows.py [docs/streaming-rows.png]
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
import torchvision

import fcconv
from fcconv.tiling._stream import _Run, graph_rows


def main(path: str) -> None:
    torch.manual_seed(0)
    fcn = fcconv.convolutionalize(torchvision.models.resnet18().eval(), (3, 224, 224))
    height, band = 1024, 128
    plan = graph_rows(fcn.graph_module, (3, height, 224))
    run = _Run(plan)
    x = torch.rand(1, 3, height, 224)
    source = run.buffers[plan.source]
    with torch.inference_mode():
        while source.hi < height // 2:
            source.push(x[:, :, source.hi:source.hi + band])
            for index, step in enumerate(plan.steps):
                run.step(index, step)
    geometry = {plan.source: (1, 0)}
    for s in plan.steps:
        stride, offset = geometry[s.inputs[0]]
        geometry[s.node] = (stride * s.stride, offset - stride * s.pad)
    holding = {i for s in plan.steps if s.kernel > 1 for i in s.inputs}  # the layers that keep a ring
    layers = [n for n in (plan.source, *(s.node for s in plan.steps)) if n in holding]
    fig, ax = plt.subplots(figsize=(9, 0.18 * len(layers) + 1.2))
    for y, node in enumerate(layers):
        stride, offset = geometry[node]
        buffer = run.buffers[node]
        ax.barh(y, stride * buffer.hi, left=offset, height=0.7, color="#c6dbef")
        if buffer.hi > buffer.lo:
            ax.barh(y, stride * (buffer.hi - buffer.lo), left=offset + stride * buffer.lo, height=0.7,
                    color="#08519c")
    ax.set_yticks(range(len(layers)), [n.name for n in layers], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlim(-250, height)
    ax.set_xlabel("image row (a layer's row j drawn at offset + stride * j)")
    ax.set_title("resnet18 streamed down 1024 rows, stopped half-way: rows made (light), held (dark)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    held = sum(b.nbytes for b in run.buffers.values())
    print(f"Wrote {path}: {len(layers)} layers, {held / 2**20:.1f} MiB held")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "docs/streaming-rows.png")
