"""fcconv.models.tracing, shapes, ops and descriptors: the torch.fx layer under convolutionalize."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from fcconv.errors import NotEquivalentError
from fcconv.models.descriptors import FLAT, UNKNOWN, Spatial, desc_labels, spatial_descriptors
from fcconv.models.ops import flatten_points, permutation_of
from fcconv.models.shapes import NodeFailure, record_shapes
from fcconv.models.tracing import arg, data_inputs, describe, first_tensor_output, leaf_matchers, trace


class Branchy(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if x.sum() > 0 else -x


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.block = Branchy()
        self.fc = nn.Linear(4 * 4 * 4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.block(F.relu(self.conv(x)))
        return self.fc(torch.flatten(x, 1))


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def test_trace_names_the_failing_module_and_suggests_leaf_modules() -> None:
    with pytest.raises(NotEquivalentError, match=r"^Cannot trace Net with torch.fx inside module 'block' "
                                                 r"\(Branchy\).*leaf_modules=\[Branchy\]"):
        trace(Net())


@pytest.mark.parametrize("leaf", [Branchy, "block", "instance"])
def test_trace_keeps_leaf_modules_whole(leaf: object) -> None:
    net = Net()
    gm = trace(net, [net.block if leaf == "instance" else leaf])
    calls = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert calls == ["conv", "block", "fc"]
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(gm(x), net(x))


def test_leaf_matchers_refuses_foreign_modules_and_bad_items() -> None:
    net = Net()
    assert leaf_matchers(net, nn.ReLU) == ((nn.ReLU,), set())
    assert leaf_matchers(net, [net.block, "conv"]) == ((), {"block", "conv"})
    with pytest.raises(NotEquivalentError, match=r"^leaf_modules holds a Linear that is not a submodule"):
        leaf_matchers(net, [nn.Linear(2, 2)])
    with pytest.raises(NotEquivalentError, match=r"^leaf_modules must be a sequence"):
        leaf_matchers(net, 3)


def test_node_helpers_read_arguments_inputs_and_outputs() -> None:
    gm = trace(Net(), [Branchy])
    flat = _node(gm, "flatten")
    assert arg(flat, 1, "start_dim") == 1 and arg(flat, 2, "end_dim", -1) == -1
    assert data_inputs(flat) == [_node(gm, "block")]
    assert describe(_node(gm, "fc"), gm).startswith("node 'fc' (module 'fc': Linear(in_features=64")
    assert describe(flat, gm) == "node 'flatten' (call to torch.flatten)"
    assert first_tensor_output(gm) is _node(gm, "fc")


def test_record_shapes_on_meta_leaves_modes_and_parameters_alone() -> None:
    net = Net().train()
    gm = trace(net, [Branchy])
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    shapes = record_shapes(gm, (3, 8, 8), batch=3)
    assert shapes[_node(gm, "conv")] == (3, 4, 4, 4)
    assert shapes[_node(gm, "flatten")] == (3, 64) and shapes[_node(gm, "fc")] == (3, 5)
    assert all(m.training for m in gm.modules())
    assert all(torch.equal(v, before[k]) for k, v in gm.state_dict().items())


def test_record_shapes_reports_the_failing_node() -> None:
    gm = trace(Net(), [Branchy])
    with pytest.raises(NodeFailure) as failure:
        record_shapes(gm, (3, 10, 10))  # 5x5 maps: the Linear gets 100 features, not 64
    assert failure.value.node.name == "fc"


def test_spatial_descriptors_give_the_closed_form_of_a_conv_chain() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2, padding=1), nn.MaxPool2d(2, ceil_mode=True),
                          nn.Conv2d(2, 2, (1, 3)))
    gm = trace(model)
    shapes = record_shapes(gm, (1, 20, 24))
    desc = spatial_descriptors(gm, shapes, 2)
    out = desc.desc[first_tensor_output(gm)]
    assert isinstance(out, tuple) and out[:2] == (None, None)
    assert all(isinstance(e, Spatial) for e in out[2:])
    for h, w in [(20, 24), (21, 30), (33, 17)]:  # the closed form matches real sizes
        real = model(torch.zeros(1, 1, h, w)).shape[2:]
        assert (out[2].size(h), out[3].size(w)) == tuple(real)  # type: ignore[union-attr]
    assert {n.target for n in desc.pads} == {"0", "1"}  # padding, ceil_mode


def test_spatial_descriptors_flag_a_linear_along_a_spatial_dim() -> None:
    gm = trace(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Linear(6, 4)))
    shapes = record_shapes(gm, (1, 8, 8))
    desc = spatial_descriptors(gm, shapes, 2)
    assert [n.target for n in desc.linear_on_space] == ["1"]
    assert desc.desc[first_tensor_output(gm)][-1] is UNKNOWN  # type: ignore[index]


def test_flatten_points_and_permutations() -> None:
    class Permuted(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.permute(0, 2, 3, 1).flatten(1)

    gm = trace(Permuted())
    shapes = record_shapes(gm, (3, 4, 5))
    permute, flatten = _node(gm, "permute"), _node(gm, "flatten")
    assert permutation_of(permute, 4) == (0, 2, 3, 1)
    assert flatten_points(gm, shapes, 2) == {flatten}
    desc = spatial_descriptors(gm, shapes, 2, {flatten})
    assert desc_labels(desc.desc[permute], 2) == ("N", "H", "W", "C")  # type: ignore[arg-type]
    assert desc.desc[flatten] == (None, FLAT)
