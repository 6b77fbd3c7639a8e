"""The tiling plan: every cell once, blocks aligned to the stride, within the tile, holding each field."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fcconv import FcconvError
from fcconv.tiling import plan_tiles


@dataclass(frozen=True)
class _Field:
    stride: tuple[int, ...]
    offset: tuple[int, ...]
    extent: tuple[int, ...]


def _grid(size: int, stride: int, offset: int, extent: int) -> int:
    """Cells whose field starts inside the image (the padded-network convention, for the test)."""
    return max(1, (size - max(0, offset + extent)) // stride + 1) if offset >= 0 else (
        (size - 1 - offset) // stride + 1)


@st.composite
def _cases(draw: st.DrawFn) -> tuple[_Field, tuple[int, ...], tuple[int, ...], int]:
    stride = draw(st.integers(1, 8))
    offset = draw(st.integers(-3 * stride, 2))
    extent = draw(st.integers(max(1, 1 - offset), 40))
    size = draw(st.integers(max(1, offset + extent), 300))
    grid = _grid(size, stride, offset, extent)
    tile = draw(st.integers(1, 320))
    return _Field((stride,), (offset,), (extent,)), (size,), (grid,), tile


@settings(max_examples=300, deadline=None)
@given(_cases())
def test_plan_covers_each_cell_once_with_its_field(case: tuple[_Field, tuple[int, ...], tuple[int, ...], int]
                                                   ) -> None:
    field, image, grid, tile = case
    try:
        plan = plan_tiles(field, image, grid, tile)
    except FcconvError as error:
        assert str(error).startswith(f"tile ({tile},) is too small for this model")
        minimum = int(str(error).rsplit("tile >= ", 1)[1].split()[0])
        assert tile < minimum
        plan_tiles(field, image, grid, minimum)  # the stated minimum works
        return
    (t,), (o,), (e,), (size,) = field.stride, field.offset, field.extent, image
    seen = []
    for one in plan:
        (a,), (b,) = one.read_start, one.read_stop
        assert a % t == 0 and 0 <= a < b <= size and b - a <= tile
        assert one.first[0] == one.cell_start[0] - a // t
        for g in range(one.cell_start[0], one.cell_stop[0]):
            start, end = o + t * g, o + t * g + e
            assert start >= a or a == 0  # the field is in the block or starts past the border
            assert end <= b or b == size
            seen.append(g)
    assert seen == list(range(grid[0]))


def test_plan_2d_is_a_product_of_dims() -> None:
    field = _Field((32, 32), (-217, -217), (627, 627))  # resnet18 at 224
    plan = plan_tiles(field, (2000, 3000), (63, 94), 1024)
    assert plan.cells_per_tile == ((1024 - 7 - 627) // 32 + 1,) * 2
    assert len(plan) == len(list(plan)) == plan.tiles_per_dim[0] * plan.tiles_per_dim[1]
    rows = {p.read_start[0] for p in plan}
    assert all(a % 32 == 0 for a in rows)
    pixels = sum(p.pixels for p in plan)
    assert plan.recompute_factor() == pytest.approx(pixels / (2000 * 3000))
    assert list(itertools.islice(plan, 1))[0].index == (0, 0)


def test_tile_below_minimum_states_it() -> None:
    field = _Field((32, 32), (-217, -217), (627, 627))
    with pytest.raises(FcconvError,
                       match=r"^tile \(600, 600\) is too small .* Pass tile >= 634 \(--tile 634 on the "
                             r"command line\)\.$"):
        plan_tiles(field, (5000, 5000), (157, 157), 600)
    with pytest.raises(FcconvError, match="^tile must be a positive int"):
        plan_tiles(field, (5000, 5000), (157, 157), 0)
