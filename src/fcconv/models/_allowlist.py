"""The allow-list: ops known to be local and translation-equivariant, and how each moves the field.

A rule takes a :class:`Call` and returns the output's descriptor, notes padding (``c.pad``) and
size-dependent padding (``c.sized``), or raises :class:`NotLocal` saying why the op is not local.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fcconv._shapes import format_shape
from fcconv.models._descriptors import (
    CONST,
    SIZE,
    Axis,
    Call,
    Desc,
    Map,
    NotLocal,
    Tag,
    argument,
    combine,
    desc_of,
    elementwise,
    ntuple,
    same_pads,
    slide,
)

# ----------------------------------------------------------------------------------------------
# Element by element, per position, per channel


def _pointwise(c: Call) -> Map:
    operands = [(v, desc_of(n, c.descs)) for v, n in zip(c.args, c.node.args)]
    operands += [(c.kwargs[k], desc_of(n, c.descs)) for k, n in c.node.kwargs.items()
                 if k not in ("inplace", "dtype", "approximate", "alpha", "memory_format")]
    return elementwise(c, operands)


def _identity(c: Call) -> Map:
    return c.map()


def _per_channel(c: Call) -> Map:
    """An op that treats each position alike, with per-channel parameters (dim 1 not spatial)."""
    m = c.map()
    if len(m.dims) > 1 and m.dims[1] is not None:
        raise NotLocal("mixes a spatial dim (dim 1 is not the channels)")
    return m


def _over_dims(c: Call, dims: Any, what: str) -> Map:
    """An op that mixes values along ``dims`` only: they must not be spatial."""
    m = c.map()
    rank = len(m.dims)
    for d in (dims if isinstance(dims, (tuple, list)) else (dims,)):
        if not isinstance(d, int) or m.dims[d % rank] is not None:
            raise NotLocal(f"{what} over a spatial dim (global)")
    return m


def _dropout_like(training: bool, index: int = 2) -> Callable[[Call], Map]:
    """Identity unless in training mode (``training`` is the default of argument ``index``)."""

    def rule(c: Call) -> Map:
        if c.module is not None and c.module.training or c.arg(index, "training", training):
            raise NotLocal("is random in training mode (call model.eval())")
        return c.map()
    return rule


def _batch_norm(c: Call) -> Map:
    if c.module is not None:
        stats, training = c.module.running_mean is not None, c.module.training
    else:
        stats, training = c.arg(1, "running_mean") is not None, c.arg(5, "training", False)
    if training or not stats:
        raise NotLocal("normalizes with batch statistics (training mode or "
                        "track_running_stats=False): global")
    return _per_channel(c)


def _layer_norm(c: Call) -> Map:
    shape = c.module.normalized_shape if c.module is not None else c.arg(1, "normalized_shape")
    n = len(shape) if isinstance(shape, (tuple, list, torch.Size)) else 1
    return _over_dims(c, tuple(range(-n, 0)), "normalizes")


def _linear(c: Call) -> Map:
    if c.module is None and c.desc(1, "weight") is not CONST:
        raise NotLocal("multiplies by a matrix computed from the input")
    return _over_dims(c, -1, "mixes values")


def _global(why: str) -> Callable[[Call], Map]:
    def rule(c: Call) -> Map:
        raise NotLocal(why)
    return rule


def _softmax(c: Call) -> Map:
    if c.module is not None:
        dim = -3 if isinstance(c.module, nn.Softmax2d) else c.module.dim
    else:
        dim = c.arg(1, "dim")
    if dim is None:
        dim = 0 if c.value.dim() in (0, 1, 3) else 1  # torch's legacy implicit dim
    return _over_dims(c, dim, "normalizes")


def _reduce(c: Call) -> Desc:
    """mean/sum/amax/... over explicit non-spatial dims (e.g. CBAM's channel mean)."""
    dim = c.arg(1, "dim")
    if isinstance(dim, Tensor) or (dim is None and c.node.target in ("max", "min", torch.max, torch.min)
                                   and len(c.args) > 1):
        return _pointwise(c)  # torch.max(a, b): element by element
    if dim is None:
        raise NotLocal("reduces over every dim (global)")
    m = _over_dims(c, dim, "reduces")
    out = c.value[0] if isinstance(c.value, tuple) else c.value
    rank = len(m.dims)
    dropped = {d % rank for d in (dim if isinstance(dim, (tuple, list)) else (dim,))}
    kept = m.dims if out.dim() == rank else tuple(e for i, e in enumerate(m.dims) if i not in dropped)
    return [Map(kept), Map(kept)] if isinstance(c.value, tuple) else Map(kept)


# ----------------------------------------------------------------------------------------------
# Sliding ops: convolutions, pools, padding

# Conv subclasses whose forward is still a convolution with the module's parameters; "Same" ones
# (timm's Conv2dSame, StdConv2dSame, ...) pad TF-"same" at run time.
_KNOWN_CONVS = {"UnfoldConv1d", "UnfoldConv2d", "UnfoldConv3d", "StdConv2d", "ScaledStdConv2d"}
_PLAIN_CONV = {nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward}


def _static_pads(padding: Any, kernel: tuple[int, ...], dilation: tuple[int, ...]) -> list[tuple[int, int]]:
    if padding == "valid":
        return [(0, 0)] * len(kernel)
    if padding == "same":
        return [((d * (k - 1)) // 2, d * (k - 1) - (d * (k - 1)) // 2) for k, d in zip(kernel, dilation)]
    return [(p, p) for p in ntuple(padding, len(kernel))]


def _note_pads(c: Call, pads: Sequence[tuple[int, int]], what: str, ceil_mode: bool = False) -> None:
    if any(p for pair in pads for p in pair):
        c.pad(f"pads the map ({what} {[list(p) for p in pads]}), so border cells are not their crop")
    elif ceil_mode:
        c.pad("uses ceil_mode=True: partial windows at the border act as padding")


def _conv(c: Call) -> Map:
    x, m = c.args[0], c.module
    if m is not None:
        if isinstance(m, nn.modules.conv._ConvTransposeNd):
            raise NotLocal("is a transposed convolution (upsampling), not on the allow-list")
        name = type(m).__name__
        if type(m).forward not in _PLAIN_CONV and name not in _KNOWN_CONVS and "Same" not in name:
            raise NotLocal(f"{name} overrides forward and is not on the allow-list of convolutions")
        kernel, stride, dilation = tuple(m.kernel_size), tuple(m.stride), tuple(m.dilation)
        pads = _static_pads(m.padding, kernel, dilation)
        if "Same" in name and getattr(m, "same_pad", True):  # timm: pad_same, then the conv
            same = same_pads(x, kernel, stride, dilation)
            pads = [(a + p, b + q) for (a, b), (p, q) in zip(same, pads)]
            c.sized = c.sized or any(s > 1 and (k - 1) * d > 0 for k, s, d in zip(kernel, stride, dilation))
        if m.padding_mode == "circular" and any(p for pair in pads for p in pair):
            raise NotLocal("pads circularly: border cells read the opposite border")
        _note_pads(c, pads, f"{m.padding_mode} padding")
    else:
        if c.desc(1, "weight") is not CONST:
            raise NotLocal("convolves with a kernel computed from the input")
        kernel = tuple(c.args[1].shape[2:])
        stride = ntuple(c.arg(3, "stride", 1), len(kernel))
        dilation = ntuple(c.arg(5, "dilation", 1), len(kernel))
        pads = _static_pads(c.arg(4, "padding", 0), kernel, dilation)
        _note_pads(c, pads, "padding")
    return slide(c.map(), x, c.value, kernel, stride, pads, dilation)


_POOLS: dict[type[nn.Module], int] = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3,
                           nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_MAX_POOL_FNS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}
_AVG_POOL_FNS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3}


def _pool(c: Call) -> Map:
    x, m = c.args[0], c.module
    if m is not None:
        n = next(v for k, v in _POOLS.items() if isinstance(m, k))
        name = type(m).__name__
        if type(m).forward is not next(k for k in _POOLS if isinstance(m, k)).forward and "Same" not in name:
            raise NotLocal(f"{name} overrides forward and is not on the allow-list of pools")
        kernel, stride = ntuple(m.kernel_size, n), ntuple(m.stride or m.kernel_size, n)
        dilation, padding = ntuple(getattr(m, "dilation", 1), n), m.padding
        ceil_mode, indices = m.ceil_mode, getattr(m, "return_indices", False)
        same = [(0, 0)] * n
        if "Same" in name:  # timm's MaxPool2dSame, AvgPool2dSame: F.pad TF-"same", then the pool
            same = same_pads(x, kernel, stride, dilation)
            c.sized = c.sized or any(s > 1 and (k - 1) * d > 0 for k, s, d in zip(kernel, stride, dilation))
    else:
        is_max = c.node.target in _MAX_POOL_FNS
        n = (_MAX_POOL_FNS if is_max else _AVG_POOL_FNS)[c.node.target]  # type: ignore[index]
        kernel = ntuple(c.arg(1, "kernel_size"), n)
        stride = ntuple(c.arg(2, "stride") or kernel, n)
        padding = c.arg(3, "padding", 0)
        dilation = ntuple(c.arg(4, "dilation", 1), n) if is_max else (1,) * n
        ceil_mode = bool(c.arg(5 if is_max else 4, "ceil_mode", False))
        indices = is_max and c.arg(6, "return_indices", False)
        same = [(0, 0)] * n
    if indices:
        raise NotLocal("returns indices, absolute positions in the map")
    pads = [(a + p, b + p) for (a, b), p in zip(same, ntuple(padding, n))]
    _note_pads(c, pads, "padding", ceil_mode)
    return slide(c.map(), x, c.value, kernel, stride, pads, dilation, ceil_mode)


_PAD_MODES = {nn.ConstantPad1d: "constant", nn.ConstantPad2d: "constant", nn.ConstantPad3d: "constant",
              nn.ZeroPad2d: "constant", nn.ReflectionPad1d: "reflect", nn.ReflectionPad2d: "reflect",
              nn.ReflectionPad3d: "reflect", nn.ReplicationPad1d: "replicate",
              nn.ReplicationPad2d: "replicate", nn.ReplicationPad3d: "replicate"}


def _pad(c: Call) -> Map:
    """F.pad and the padding modules; pairs run from the last dim backwards."""
    if c.module is not None:
        mode = next((v for k, v in _PAD_MODES.items() if type(c.module) is k), None)
        if mode is None:
            raise NotLocal(f"{type(c.module).__name__} is not on the allow-list of paddings")
        amounts = list(c.module.padding)
    else:
        mode, amounts = c.arg(2, "mode", "constant"), list(c.arg(1, "pad"))
        if c.desc(1, "pad") is SIZE:
            c.sized = True
    m = c.map()
    dims = list(m.dims)
    pairs = [(amounts[i], amounts[i + 1]) for i in range(0, len(amounts), 2)]
    for k, (left, right) in enumerate(pairs):
        i = len(dims) - 1 - k
        e = dims[i]
        if isinstance(e, Axis):
            if left or right:
                if mode == "circular":
                    raise NotLocal("pads circularly: border cells read the opposite border")
                c.pad(f"pads the map ({mode} {[list(p) for p in pairs]}), so border cells are not "
                      "their crop")
            dims[i] = Axis(e.axis, e.stride, e.offset - e.stride * left, e.extent)
    return Map(tuple(dims))


# ----------------------------------------------------------------------------------------------
# Layout: reshape, permute, indexing, split, cat


def _reshape(c: Call) -> Map:
    """view/reshape/flatten/squeeze/...: each spatial dim must come out whole, as a dim of its own."""
    m, shape_in, shape_out = c.map(), tuple(c.args[0].shape), tuple(c.value.shape)
    before_in = [math.prod(shape_in[:i]) for i in range(len(shape_in) + 1)]
    before_out = [math.prod(shape_out[:j]) for j in range(len(shape_out) + 1)]
    dims: list[Axis | None] = [None] * len(shape_out)
    j0 = 0
    for i, e in enumerate(m.dims):
        if e is None:
            continue
        j = next((j for j in range(j0, len(shape_out)) if before_out[j] == before_in[i]
                  and before_out[j + 1] == before_in[i + 1] and dims[j] is None), None)
        if j is None:
            raise NotLocal(f"reshapes {format_shape(shape_in)} to {format_shape(shape_out)}, "
                            "merging or splitting a spatial dim")
        dims[j], j0 = e, j + 1
    return Map(tuple(dims))


def _permute(c: Call) -> Map:
    """permute/transpose/movedim: replayed on a meta tensor of distinct sizes to read the order."""
    m = c.map()
    probe = torch.empty(tuple(range(2, 2 + len(m.dims))), device="meta")
    target = c.node.target
    fn = getattr(probe, target) if isinstance(target, str) else (lambda *a, **k: target(probe, *a, **k))
    order = [s - 2 for s in fn(*c.args[1:], **c.kwargs).shape]
    return Map(tuple(m.dims[i] for i in order))


def _getitem(c: Call) -> Desc:
    d = c.desc(0)
    if not isinstance(d, Map) or not isinstance(c.args[0], Tensor):
        raise NotLocal("indexes a value that is not a map")
    if c.desc(1) is SIZE:
        raise NotLocal("indexes at a position computed from the input size")
    index = c.args[1] if isinstance(c.args[1], tuple) else (c.args[1],)
    if any(isinstance(i, (Tensor, list)) for i in index):
        raise NotLocal("indexes with tensors (advanced indexing)")
    used = sum(i is not None and i is not Ellipsis for i in index)
    if Ellipsis in index:
        k = index.index(Ellipsis)
        index = index[:k] + (slice(None),) * (len(d.dims) - used) + index[k + 1:]
    index = index + (slice(None),) * (len(d.dims) - sum(i is not None for i in index))
    dims: list[Axis | None] = []
    src = 0
    for i in index:
        if i is None:
            dims.append(None)
            continue
        e, size = d.dims[src], c.args[0].shape[src]
        src += 1
        if isinstance(i, slice):
            dims.append(_slice_axis(e, i, size))
        elif e is not None:
            raise NotLocal("picks one position along a spatial dim")
    return Map(tuple(dims))


def _slice_axis(e: Axis | None, s: slice, size: int) -> Axis | None:
    if e is None:
        return None
    start, step = s.start or 0, s.step or 1
    if start < 0 or step < 1 or (s.stop is not None and s.stop < size):
        raise NotLocal("crops a spatial dim at a position fixed relative to its end")
    return Axis(e.axis, e.stride * step, e.offset + e.stride * start, e.extent)


def _split(c: Call) -> list[Desc]:
    """chunk/split/unbind along a non-spatial dim: one map per piece."""
    default = 0
    dim = c.arg(1 if c.node.target in ("unbind", torch.unbind) else 2, "dim", default)
    m = _over_dims(c, dim, "splits")
    if c.node.target in ("unbind", torch.unbind):
        m = Map(tuple(e for i, e in enumerate(m.dims) if i != dim % len(m.dims)))
    return [m for _ in c.value]


def _cat(c: Call) -> Map:
    tensors, nodes = c.args[0], argument(c.node.args, c.node.kwargs, 0, "tensors")
    descs = [desc_of(n, c.descs) for n in nodes]
    rank = c.value.dim()
    dim = c.arg(1, "dim", 0) % rank
    maps = [d for d in descs if isinstance(d, Map)]
    if any(m.dims[dim] is not None for m in maps):
        raise NotLocal("concatenates along a spatial dim")
    result = Map(tuple(combine([m.dims[i] for m in maps], "concatenates") for i in range(rank)))
    if any(d is SIZE for d in descs):
        raise NotLocal("concatenates a tensor built from the input size (e.g. coordinate channels)",
                        result)
    if any(d is CONST for d, t in zip(descs, tensors) if t.numel()):
        raise NotLocal("concatenates a tensor that does not come from the input (position-dependent)",
                        result)
    return result


# ----------------------------------------------------------------------------------------------
# The allow-list


def _shape_of(c: Call) -> list[Tag]:
    """The input's shape, per dim: SIZE for its spatial dims, CONST for batch and channels."""
    d = c.desc(0)
    return [SIZE if e is not None else CONST for e in d.dims] if isinstance(d, Map) else [SIZE]


def _size(c: Call) -> Desc:
    shape = _shape_of(c)
    dim = c.arg(1, "dim")
    return shape if dim is None else shape[dim]


def _attribute(c: Call) -> Desc:
    if c.args[1] in ("dtype", "device", "ndim", "is_cuda", "layout"):
        return CONST
    if c.args[1] == "shape":
        return _shape_of(c)
    raise NotLocal(f"reads the attribute {c.args[1]!r}, not on the allow-list")


_ACTIVATIONS = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Mish,
                nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Sigmoid, nn.Tanh, nn.Softplus,
                nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.Threshold, nn.Hardshrink, nn.Softshrink,
                nn.Identity)
_MODULE_RULES: list[tuple[tuple[type[nn.Module], ...], Callable[[Call], Desc]]] = [
    (_ACTIVATIONS, _identity),
    ((nn.PReLU,), _per_channel),
    ((nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
      nn.RReLU), _dropout_like(False)),
    ((nn.modules.conv._ConvNd,), _conv),
    (tuple(_POOLS), _pool),
    (tuple(_PAD_MODES) + (nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d), _pad),
    ((nn.modules.batchnorm._BatchNorm,), _batch_norm),
    ((nn.LayerNorm,), _layer_norm),
    ((nn.Linear,), _linear),
    ((nn.Softmax, nn.LogSoftmax, nn.Softmin, nn.Softmax2d), _softmax),
    ((nn.Flatten, nn.Unflatten), _reshape),
    ((nn.GroupNorm, nn.modules.instancenorm._InstanceNorm),
     _global("normalizes over the whole map (global statistics)")),
    ((nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
      nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d), _global("pools to a fixed output size (global)")),
    ((nn.Upsample,), _global("resamples the map (not a sliding op)")),
]
# Subclasses that keep the base's computation although they override forward.
_KNOWN_SUBCLASSES: dict[str, tuple[type, Callable[[Call], Desc]]] = {
    "ChannelLayerNorm": (nn.LayerNorm, _per_channel),  # fcconv's LayerNorm over dim 1
    "Linear": (nn.Linear, _linear),                    # timm.layers.Linear: F.linear with a cast
}

FUNCTION_RULES: dict[Any, Callable[[Call], Desc]] = {
    **dict.fromkeys([
        F.relu, F.relu_, F.relu6, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish,
        F.hardsigmoid, F.hardtanh, F.leaky_relu, F.softplus, F.logsigmoid, F.softsign, F.tanhshrink,
        F.threshold, F.sigmoid, F.tanh, torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp,
        torch.log, torch.abs, torch.sqrt, torch.rsqrt, torch.neg, torch.clamp, torch.clip, torch.square,
        torch.erf, torch.add, torch.sub, torch.mul, torch.div, torch.true_divide, torch.maximum,
        torch.minimum, torch.pow, operator.add, operator.sub, operator.mul, operator.truediv,
        operator.pow, operator.neg, operator.pos, operator.iadd, operator.isub, operator.imul,
        operator.itruediv], _pointwise),
    F.prelu: _per_channel,
    **dict.fromkeys([F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
                     F.feature_alpha_dropout], _dropout_like(True)),
    F.rrelu: _dropout_like(False, 3),
    **dict.fromkeys([F.conv1d, F.conv2d, F.conv3d], _conv),
    **dict.fromkeys([*_MAX_POOL_FNS, *_AVG_POOL_FNS], _pool),
    F.pad: _pad,
    F.batch_norm: _batch_norm,
    F.layer_norm: _layer_norm,
    F.linear: _linear,
    **dict.fromkeys([F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax], _softmax),
    F.normalize: lambda c: _over_dims(c, c.arg(2, "dim", 1), "normalizes"),
    **dict.fromkeys([torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min, torch.std,
                     torch.var, torch.logsumexp, torch.prod], _reduce),
    **dict.fromkeys([torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze], _reshape),
    **dict.fromkeys([torch.permute, torch.transpose, torch.movedim, torch.swapaxes], _permute),
    **dict.fromkeys([torch.chunk, torch.split, torch.unbind], _split),
    torch.cat: _cat,
    torch.concat: _cat,
    operator.getitem: _getitem,
    getattr: _attribute,
    **dict.fromkeys([F.group_norm, F.instance_norm],
                    _global("normalizes over the whole map (global statistics)")),
    **dict.fromkeys([F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                     F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d],
                    _global("pools to a fixed output size (global)")),
    F.interpolate: _global("resamples the map (not a sliding op)"),
}

METHOD_RULES: dict[str, Callable[[Call], Desc]] = {
    **dict.fromkeys(["relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "abs",
                     "sqrt", "rsqrt", "neg", "clamp", "clamp_", "clamp_min", "clamp_max", "clip",
                     "square", "pow", "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_",
                     "maximum", "minimum"], _pointwise),
    **dict.fromkeys(["float", "double", "half", "bfloat16", "to", "type_as", "contiguous", "clone",
                     "detach"], _identity),
    **dict.fromkeys(["view", "reshape", "flatten", "squeeze", "unsqueeze", "unflatten", "view_as",
                     "reshape_as"], _reshape),
    **dict.fromkeys(["permute", "transpose", "movedim", "swapaxes", "swapdims"], _permute),
    **dict.fromkeys(["mean", "sum", "amax", "amin", "max", "min", "std", "var", "logsumexp", "prod"],
                    _reduce),
    **dict.fromkeys(["chunk", "split", "unbind"], _split),
    **dict.fromkeys(["softmax", "log_softmax"], _softmax),
    "size": _size,
    "numel": lambda c: SIZE,
    "dim": lambda c: CONST,
    "ndimension": lambda c: CONST,
}


def module_rule(m: nn.Module) -> Callable[[Call], Desc] | None:
    name = type(m).__name__
    if name in _KNOWN_SUBCLASSES and isinstance(m, _KNOWN_SUBCLASSES[name][0]):
        return _KNOWN_SUBCLASSES[name][1]
    for classes, rule in _MODULE_RULES:
        base = next((k for k in classes if isinstance(m, k)), None)
        if base is None:
            continue
        if rule in (_conv, _pool) or type(m).forward is base.forward:
            return rule  # _conv/_pool check subclasses themselves
        return _global(f"{name} subclasses {base.__name__} but overrides forward; not on the "
                       "allow-list")
    return None

# Functions of optional libraries, by (module, name): torchvision's stochastic depth (eval: identity).
_NAMED_FUNCTION_RULES: dict[tuple[str, str], Callable[[Call], Desc]] = {
    ("torchvision.ops.stochastic_depth", "stochastic_depth"): _dropout_like(True, 3),
}


def function_rule(target: Any) -> Callable[[Call], Desc] | None:
    """The rule of a called function, or None if it is not on the allow-list."""
    try:
        rule = FUNCTION_RULES.get(target)
    except TypeError:  # unhashable target
        return None
    key = (getattr(target, "__module__", None) or "", getattr(target, "__name__", ""))
    return rule or _NAMED_FUNCTION_RULES.get(key)
