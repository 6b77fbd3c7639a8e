"""fcconv.demo.picture: one colour per class index, never grey; the score map drawn over its cells."""

from __future__ import annotations

import colorsys

import matplotlib
import pytest
import torch

from fcconv.demo.picture import class_colour, draw_score_map

matplotlib.use("Agg", force=False)


def test_class_colours_are_distinct_and_never_grey() -> None:
    colours = [class_colour(c) for c in range(19)]
    assert len(set(colours)) == 19
    for c, rgb in enumerate(colours):
        _, _, saturation = colorsys.rgb_to_hls(*rgb)
        assert saturation > 0.25, f"class {c} is grey: {rgb}"  # tab10 grey: 0
    assert class_colour(7) != pytest.approx((0.5, 0.5, 0.5), abs=0.1)
    assert class_colour(19) == class_colour(0)  # more classes cycle


def test_score_map_colours_come_from_the_class_index_not_the_order_of_appearance() -> None:
    from matplotlib.figure import Figure

    def drawn(winner: torch.Tensor) -> torch.Tensor:
        fig = Figure(figsize=(2, 2), dpi=50)
        ax = fig.add_subplot()
        draw_score_map(ax, winner, torch.ones_like(winner, dtype=torch.float32),
                       lambda cell: (cell[0] * 4, cell[1] * 4, cell[0] * 4 + 4, cell[1] * 4 + 4), (4, 4),
                       opacity=lambda c: c, hidden=[0])
        return torch.from_numpy(ax.images[0].get_array().data.copy())

    first = drawn(torch.tensor([[7, 3], [0, 7]]))
    second = drawn(torch.tensor([[3, 3], [3, 7]]))  # 3 appears first here, 7 first above
    assert first[0, 0, :3].tolist() == pytest.approx(list(class_colour(7)))
    assert second[1, 1, :3].tolist() == pytest.approx(list(class_colour(7)))
    assert first[0, 1, :3].tolist() == pytest.approx(list(class_colour(3)))
    assert first[1, 0, 3] == 0.0  # hidden class: clear
