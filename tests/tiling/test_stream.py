"""Row streaming equals the whole-image run on every cell (float64, relative 1e-12)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from tiling_support import assert_same_map, untiled
from torch import fx, nn

import fcconv
from fcconv import FcconvError
from fcconv.tiling import plan_for
from fcconv.tiling._stream import NotStreamable, StreamStats, graph_rows, stream_block
from fcconv.tiling._strips import StreamPlan, stream_segment
from fcconv.tiling._tasks import model_placement


def streamed(module: nn.Module, x: torch.Tensor, band: int) -> torch.Tensor:
    """``module(x)`` computed by the row-streaming executor on its fx graph, ``band`` rows a step."""
    gm = fx.symbolic_trace(module)
    plan = graph_rows(gm, tuple(x.shape[1:]))
    with torch.inference_mode():
        parts = [rows for _, rows in stream_block(plan, lambda a, b: x[:, :, a:b], band)]
    return torch.cat(parts, plan.result_step.dim)


def assert_close(got: torch.Tensor, reference: torch.Tensor) -> None:
    assert got.shape == reference.shape
    scale = reference.abs().amax(dim=1, keepdim=True).clamp_min(1e-300)
    assert ((got - reference).abs().amax(dim=1, keepdim=True) <= 1e-12 * scale).all()


# ----------------------------------------------------------------------------------------------
# Hypothesis: local nets of the ops people use


class Residual(nn.Module):
    def __init__(self, c: int, k: int, d: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, k, padding=d * (k // 2), dilation=d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.conv(x))


class Concat(nn.Module):
    def __init__(self, c: int, k: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, 2, k, padding=k // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.conv(x)], 1)


class SamePad(nn.Module):
    """TF "same" padding from x.size(), then a valid strided conv (timm's Conv2dSame)."""

    def __init__(self, c: int, k: int, s: int) -> None:
        super().__init__()
        self.k, self.s = max(k, s), s
        self.conv = nn.Conv2d(c, c, self.k, stride=s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ih, iw = x.size()[-2:]
        ph = ((ih + self.s - 1) // self.s - 1) * self.s + self.k - ih
        pw = ((iw + self.s - 1) // self.s - 1) * self.s + self.k - iw
        return self.conv(F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2]))


class AsymPad(nn.Module):
    def __init__(self, top: int, bottom: int) -> None:
        super().__init__()
        self.top, self.bottom = top, bottom

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, [1, 0, self.top, self.bottom])


class ChannelNorm(nn.Module):
    """LayerNorm over channels through permutes (ConvNeXt)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def block(kind: str, c: int, k: int, s: int, flag: bool) -> nn.Module:
    if kind == "conv":
        return nn.Conv2d(c, c, k, stride=s, padding=k // 2 if flag else 0, dilation=1 + (k == 2 and flag))
    if kind == "max":
        return nn.MaxPool2d(k, stride=s, padding=k // 2, ceil_mode=flag)
    if kind == "avg":
        return nn.AvgPool2d(k, stride=s, padding=k // 2, ceil_mode=flag, count_include_pad=not flag)
    if kind == "residual":
        return Residual(c, k | 1, 2 if flag else 1)
    if kind == "same":
        return SamePad(c, k, s)
    if kind == "pad":
        return AsymPad(k, s - 1 + flag)
    return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), ChannelNorm(c))


class Chain(nn.Module):
    def __init__(self, blocks: list[tuple[str, int, int, bool]]) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(2, 3, 3, padding=1)]
        c = 3
        for kind, k, s, flag in blocks:
            if kind == "concat":
                layers.append(Concat(c, k | 1))
                c += 2
            else:
                layers.append(block(kind, c, k, s, flag))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


KINDS = ["conv", "max", "avg", "residual", "concat", "same", "pad", "norm"]


@settings(max_examples=15, deadline=None)
@given(blocks=st.lists(st.tuples(st.sampled_from(KINDS), st.integers(1, 4), st.integers(1, 3), st.booleans()),
                       min_size=1, max_size=6),
       height=st.integers(24, 70), width=st.integers(6, 20), band=st.integers(1, 40), seed=st.integers(0, 99))
def test_hypothesis_local_nets(blocks: list[tuple[str, int, int, bool]], height: int, width: int, band: int,
                               seed: int) -> None:
    torch.manual_seed(seed)
    net = Chain(blocks).double().eval()
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
    x = torch.rand(1, 2, height, width, dtype=torch.float64)
    try:
        with torch.inference_mode():
            reference = net(x)
    except RuntimeError:  # the chain shrank the image to nothing
        return
    if reference.numel() == 0:
        return
    assert_close(streamed(net, x, band), reference)


@pytest.mark.parametrize("ndim", [1, 3])
def test_1d_and_3d_models_stream_along_their_first_dim(ndim: int) -> None:
    torch.manual_seed(1)
    conv, pool = (nn.Conv1d, nn.MaxPool1d) if ndim == 1 else (nn.Conv3d, nn.MaxPool3d)
    net = nn.Sequential(conv(2, 3, 3, padding=1), nn.ReLU(), pool(3, 2, padding=1, ceil_mode=True),
                        conv(3, 4, 3, stride=2, padding=2, dilation=2)).double().eval()
    x = torch.rand(1, 2, *((37,) if ndim == 1 else (23, 6, 5)), dtype=torch.float64)
    with torch.inference_mode():
        reference = net(x)
    for band in (1, 5, 100):
        assert_close(streamed(net, x, band), reference)


def test_chunked_op_is_not_streamable() -> None:
    class Glu(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = x.chunk(2, 1)
            return a * torch.sigmoid(b)

    with pytest.raises(NotStreamable, match="node 'chunk' returns several maps"):
        graph_rows(fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 4, 3), Glu())), (1, 9, 9))


# ----------------------------------------------------------------------------------------------
# tiled_map and plan_for


@settings(max_examples=10, deadline=None)
@given(height=st.integers(16, 90), width=st.integers(16, 90), strip=st.sampled_from([None, 37, 38, 50]),
       seed=st.integers(0, 2**16))
def test_tiled_map_streams_exactly(padded_fcn: fcconv.FullyConvolutional, height: int, width: int,
                                   strip: int | None, seed: int) -> None:
    image = np.random.default_rng(seed).random((2, height, width))
    plan = plan_for(padded_fcn, image, tile=strip)
    assert plan.method == "stream"
    got = fcconv.tiled_map(padded_fcn, image, tile=strip, progress=False)
    assert_same_map(got, untiled(padded_fcn, image))


def test_strip_one_pixel_past_and_smaller_than_one_band(padded_fcn: fcconv.FullyConvolutional) -> None:
    for shape, strip in [((2, 16, 16), None), ((2, 17, 41), 40), ((2, 200, 41), 40)]:
        image = np.random.default_rng(3).random(shape)
        plan = plan_for(padded_fcn, image, tile=strip)
        assert isinstance(plan, StreamPlan)
        assert_same_map(fcconv.tiled_map(padded_fcn, image, tile=strip, progress=False),
                        untiled(padded_fcn, image))


def test_plan_reports_method_factor_and_memory(padded_fcn: fcconv.FullyConvolutional) -> None:
    image = np.zeros((2, 400, 300))
    plan = plan_for(padded_fcn, image)
    assert isinstance(plan, StreamPlan) and plan.method == "stream"
    assert plan.recompute_factor() == 1.0 and len(plan) == 1
    tiles = plan_for(padded_fcn, image, method="tiles", tile=100)
    assert tiles.method == "tiles" and tiles.recompute_factor() > 1.2 and tiles.peak_bytes is None
    # The estimate against the bytes the row buffers really held, within a factor 2.
    from fcconv.tiling._source import open_source

    source = open_source(np.random.default_rng(0).random((2, 400, 300)), layout="CHW", level=0, ndim=2,
                         channels=2)
    stats = StreamStats()
    segment = plan.segments()[0]
    for _ in stream_segment(padded_fcn, source, segment, None, plan.cells_per_tile[0], plan.band, stats):
        pass
    assert 0.5 <= plan.peak_bytes / stats.peak_bytes <= 2.0, (plan.peak_bytes, stats.peak_bytes)
    assert model_placement(padded_fcn)[0] == torch.float64


def test_auto_falls_back_to_tiles_and_says_why() -> None:
    class Glu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 4, 3)
            self.fc = nn.Linear(2 * 6 * 6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = self.conv(x).chunk(2, 1)
            return self.fc(torch.flatten(a * torch.sigmoid(b), 1))

    torch.manual_seed(0)
    fcn = fcconv.convolutionalize(Glu().double().eval(), (1, 8, 8))
    image = np.random.default_rng(0).random((1, 40, 30))
    with pytest.warns(UserWarning, match=r"cannot be streamed \(node 'chunk' returns several maps"):
        got = fcconv.tiled_map(fcn, image, tile=20, progress=False)
    assert_same_map(got, untiled(fcn, image))
    with pytest.raises(FcconvError, match=r"^Cannot stream this model: node 'chunk'"):
        plan_for(fcn, image, method="stream")


def test_a_tile_over_factor_4_is_refused_unless_forced(digits_fcn: fcconv.FullyConvolutional) -> None:
    image = np.random.default_rng(1).random((1, 67, 53))
    with pytest.raises(FcconvError, match=r"^tile \(12, 12\) makes each pixel be read .* tile \d+ or "
                                          r"larger brings it under 2\. .*force=True \(--force\)"):
        plan_for(digits_fcn, image, tile=12, method="tiles")
    got = fcconv.tiled_map(digits_fcn, image, tile=12, method="tiles", force=True, progress=False)
    assert_same_map(got, untiled(digits_fcn, image))
    with pytest.raises(FcconvError, match="^method must be one of"):
        plan_for(digits_fcn, image, method="rows")


def test_zarr_resumes_from_the_first_unfinished_chunk_row(padded_fcn: fcconv.FullyConvolutional,
                                                           tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                           ) -> None:
    import fcconv.tiling._store as store
    from fcconv.tiling import _strips

    image = np.random.default_rng(7).random((2, 300, 90))
    out = tmp_path / "m.zarr"
    plan = plan_for(padded_fcn, image, tile=60)
    assert plan.cells_per_tile[0] < plan.grid[0]  # several chunk rows per strip
    written: list[tuple[int, ...]] = []
    real = store.write_chunk

    def dies_on_the_second_chunk_row(path: str, start: tuple[int, ...], values: np.ndarray) -> None:
        if start[0] > 0:
            raise KeyboardInterrupt
        written.append(tuple(start))
        real(path, start, values)

    monkeypatch.setattr(store, "write_chunk", dies_on_the_second_chunk_row)
    with pytest.raises(KeyboardInterrupt):
        fcconv.tiled_map(padded_fcn, image, tile=60, out=out, progress=False)
    monkeypatch.setattr(store, "write_chunk", real)
    starts: list[tuple[int, ...]] = []
    segment_to_zarr = _strips.segment_to_zarr

    def recording(fcn: object, source: object, segment: object, *args: object, **kwargs: object) -> int:
        starts.append(segment.cell_start)  # type: ignore[attr-defined]
        return segment_to_zarr(fcn, source, segment, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr("fcconv.tiling._map.segment_to_zarr", recording)
    got = fcconv.tiled_map(padded_fcn, image, tile=60, out=out, progress=False)
    assert_same_map(np.asarray(got), untiled(padded_fcn, image))
    rows = plan.cells_per_tile[0]
    assert written and all((rows, *s[1:]) in starts for s in written)  # from the first unfinished row
    assert not set(starts) & set(written)  # finished chunk rows are not redone


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "densenet121", "vgg11_bn", "convnext_tiny"])
def test_torchvision_models_stream_exactly(name: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(num_classes=3).eval().double()
    size = 224 if name == "vgg11_bn" else 64  # vgg's adaptive pool is the identity at 224 only
    fcn = fcconv.convolutionalize(model, (3, size, size))
    image = np.random.default_rng(2).random((3, size + (136 if name != "densenet121" else 86), size + 33))
    plan = plan_for(fcn, image)
    assert plan.method == "stream"
    assert_same_map(fcconv.tiled_map(fcn, image, progress=False), untiled(fcn, image))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet10t", "tf_efficientnet_lite0"])
def test_timm_models_stream_exactly(name: str) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=3).eval().double()
    fcn = fcconv.convolutionalize(model, (3, 64, 64))
    image = np.random.default_rng(2).random((3, 161, 97))
    plan = plan_for(fcn, image)
    assert plan.method == "stream" and len(plan) == 1 and plan.whole == (name == "tf_efficientnet_lite0")
    assert_same_map(fcconv.tiled_map(fcn, image, progress=False, method="stream"), untiled(fcn, image))


@pytest.mark.slow
def test_cli_prints_the_method_and_factor_and_refuses_small_tiles(tmp_path: Path) -> None:
    from click.testing import CliRunner, Result
    from tiling_support import make_canvas

    from fcconv.cli import app

    tifffile = pytest.importorskip("tifffile")
    pixels = (make_canvas(24, 36, seed=3).image[0].numpy() * 255).round().astype(np.uint8)
    tifffile.imwrite(tmp_path / "c.tif", pixels)
    model = ("tiling_support:digits_model", "--input", "1,12,12", str(tmp_path / "c.tif"))

    def run(*args: str) -> Result:
        return CliRunner().invoke(app, ["heatmap", *model, *args], prog_name="fcconv")

    streamed = run("-o", str(tmp_path / "s.zarr"))
    assert streamed.exit_code == 0, streamed.output
    assert "streamed by rows in 1 strip" in streamed.output and "recompute factor 1.00" in streamed.output
    refused = run("-o", str(tmp_path / "t.zarr"), "--method", "tiles", "--tile", "12")
    assert refused.exit_code == 1 and refused.stderr.startswith("Error: tile (12, 12) makes each pixel")
    forced = run("-o", str(tmp_path / "t.zarr"), "--method", "tiles", "--tile", "12", "--force")
    assert forced.exit_code == 0 and "halo tiles of at most 12 px, recompute factor" in forced.output


def test_segments_of_a_strip_each_start_with_a_vertical_halo(padded_fcn: fcconv.FullyConvolutional) -> None:
    from fcconv.tiling._source import open_source
    from fcconv.tiling._strips import compute_segment, split_for

    image = np.random.default_rng(8).random((2, 1100, 40))
    plan = split_for(plan_for(padded_fcn, image), workers=2)
    assert isinstance(plan, StreamPlan) and len(plan) > 1 and plan.segment_rows % plan.cells_per_tile[0] == 0
    source = open_source(image, layout="CHW", level=0, ndim=2, channels=2)
    got = np.full((3, *plan.grid), np.nan)
    for s in plan.segments():
        assert s.read_start[0] % plan.stride[0] == 0
        got[:, s.cell_start[0]:s.cell_stop[0], s.cell_start[1]:s.cell_stop[1]] = compute_segment(
            padded_fcn, source, s, None, chunk_rows=plan.cells_per_tile[0], band=plan.band)
    assert_same_map(got, untiled(padded_fcn, image))
    assert plan.recompute_factor() > 1.0


def test_1d_and_3d_classifiers_stream_through_tiled_map() -> None:
    torch.manual_seed(2)
    one = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.ReLU(), nn.MaxPool1d(2, ceil_mode=True),
                        nn.Flatten(), nn.Linear(3 * 8, 2)).double().eval()
    fcn = fcconv.convolutionalize(one, (2, 16))
    image = np.random.default_rng(0).random((2, 301))
    assert plan_for(fcn, image).method == "stream"
    assert_same_map(fcconv.tiled_map(fcn, image, progress=False), untiled(fcn, image))
    three = nn.Sequential(nn.Conv3d(1, 2, 3, padding=1), nn.ReLU(), nn.AvgPool3d(2),
                          nn.Flatten(), nn.Linear(2 * 2 * 2 * 2, 2)).double().eval()
    fcn = fcconv.convolutionalize(three, (1, 4, 4, 4))
    image = np.random.default_rng(1).random((1, 23, 9, 11))
    assert_same_map(fcconv.tiled_map(fcn, image, tile=(8, 8, 8), progress=False), untiled(fcn, image))
