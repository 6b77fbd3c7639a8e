"""The same call on a dask.distributed cluster: equal maps, the model shipped once per worker."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiling_support import assert_same_map, untiled

import fcconv

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client() -> Iterator[Any]:
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None,
                                  ) as cluster, distributed.Client(cluster) as c:
        yield c


def test_cluster_map_equals_untiled(client: Any, padded_fcn: fcconv.FullyConvolutional, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    scattered: list[tuple[Any, dict[str, Any]]] = []
    submitted: list[tuple[Any, ...]] = []
    scatter, submit = client.scatter, client.submit

    def spy_scatter(data: Any, **kwargs: Any) -> Any:
        scattered.append((data, kwargs))
        return scatter(data, **kwargs)

    def spy_submit(*args: Any, **kwargs: Any) -> Any:
        submitted.append(args)
        return submit(*args, **kwargs)

    monkeypatch.setattr(client, "scatter", spy_scatter)
    monkeypatch.setattr(client, "submit", spy_submit)
    image = np.random.default_rng(0).random((2, 80, 95))
    expected = untiled(padded_fcn, image)
    assert_same_map(fcconv.tiled_map(padded_fcn, image, tile=40, client=client, progress=False), expected)
    stored = fcconv.tiled_map(padded_fcn, image, tile=40, client=client, out=tmp_path / "s.zarr",
                              progress=False)
    assert_same_map(stored[...], expected)
    assert_same_map(fcconv.tiling.open_map(tmp_path / "s.zarr")[...], expected)  # every shard checksummed
    tiles = len(fcconv.tiling.plan_for(padded_fcn, image, tile=40))
    assert len(submitted) == 2 * tiles > 4
    models = [kwargs for data, kwargs in scattered if isinstance(data, fcconv.FullyConvolutional)]
    assert models == [{"broadcast": True, "hash": False}] * 2  # once per run, to every worker
    assert not any(isinstance(arg, torch.nn.Module) for args in submitted for arg in args)  # a future


def test_dask_map_computes_on_the_cluster(client: Any, padded_fcn: fcconv.FullyConvolutional) -> None:
    image = np.random.default_rng(1).random((2, 70, 66))
    lazy = fcconv.dask_map(padded_fcn, image, tile=40)
    assert_same_map(client.compute(lazy).result(), untiled(padded_fcn, image))
