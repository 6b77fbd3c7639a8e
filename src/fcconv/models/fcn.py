"""Whole models: :func:`convolutionalize` turns a classifier into a :class:`FullyConvolutional` net.

Caffe's "net surgery", OverFeat, FCN: on an image larger than the training resolution, one forward
pass of the result returns a map of class scores, one cell per window of the training size, slid
with the network's total stride. The model is traced (:mod:`~fcconv.models.tracing`), its shapes
recorded on ``meta`` tensors at ``input_shape`` (:mod:`~fcconv.models.shapes`), its head rewritten
(:mod:`~fcconv.models.head`) and the geometry of the map measured (:mod:`~fcconv.models.grid`).

Example:
    >>> fcn = convolutionalize(torchvision.models.resnet18().eval(), (3, 224, 224))
    >>> fcn(torch.rand(1, 3, 448, 448)).shape
    torch.Size([1, 1000, 8, 8])
"""

from __future__ import annotations

import copy
import itertools
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, fx, nn

from fcconv._shapes import (
    STOCHASTIC_FUNCTIONS,
    check_input_shape,
    dim_labels,
    format_shape,
    per_dim,
    stochastic_in_training,
)
from fcconv.errors import FcconvError
from fcconv.models.descriptors import spatial_descriptors
from fcconv.models.grid import measure_geometry
from fcconv.models.head import Pass, convert_head
from fcconv.models.modules import HEAD_IMPLS
from fcconv.models.ops import flatten_points
from fcconv.models.receptive import Analysis, analyze
from fcconv.models.shapes import NodeFailure, node_failure, record_shapes
from fcconv.models.tracing import leaf_matchers, trace, unwrap

__all__ = ["FullyConvolutional", "check_inference_mode", "convolutionalize"]

_CACHED_ANALYSES = 8  # analyses kept per FCN (one per image size)


class FullyConvolutional(nn.Module):
    """A classifier turned fully convolutional, with the geometry of its score map.

    ``forward(x)`` takes ``(N, C, *spatial)`` with every spatial size at least ``min_size`` (and
    an accepted size, :meth:`accepts`, for models that run only at some sizes) and returns the
    dense score map ``(N, num_classes, *grid_shape(spatial))``. Cell ``i`` (one index per spatial
    dim) scores the crop ``window_of(i)``: ``window`` pixels from ``i * stride``.

    Attributes:
        graph_module: the converted ``torch.fx.GraphModule``.
        input_shape: the per-sample training shape ``(C, *spatial)`` the model was converted at.
        stride: pixels between neighbouring cells, per spatial dim (the product of all strides).
        window: the input size that one cell sees, per spatial dim: the training size when the
            model gives one output per training image.
        min_size: the smallest input size that gives one cell, per spatial dim.
        exact_sliding_window: proven (:func:`~fcconv.models.receptive.analyze`): True only when
            every op is on the allow-list of local, translation-equivariant ops and nothing pads;
            then every cell equals the model run on its crop, up to rounding. With padding, cells
            see the neighbouring pixels where a crop sees zeros at its border; a GroupNorm or a
            squeeze-and-excitation block reads the whole image. ``why_not_exact`` names the node.
        head_impl: ``"auto"``, ``"conv"`` or ``"matmul"``, how the convs of the head compute.
        num_classes: the number of channels of the score map (classes).
        size_modulus: per spatial dim, the step between the input sizes the model accepts: 1
            for any size from ``min_size``; 32 for a model that runs only at sizes ``S0 + 32k``
            (DLA, HRNet: branches of different strides added). See :meth:`accepts`.
    """

    def __init__(self, graph_module: fx.GraphModule, *, input_shape: Sequence[int],
                 stride: Sequence[int], window: Sequence[int], min_size: Sequence[int],
                 exact_sliding_window: bool = True, head_impl: str = "auto",
                 num_classes: int | None = None, size_modulus: Sequence[int] | None = None,
                 why_not_exact: str | None = None) -> None:
        super().__init__()
        self.graph_module = graph_module
        self.input_shape = tuple(int(s) for s in input_shape)
        self.stride = tuple(int(s) for s in stride)
        self.window = tuple(int(s) for s in window)
        self.min_size = tuple(int(s) for s in min_size)
        # What the size arithmetic claims; the property ANDs it with the proof, never trusts it alone.
        self._claimed_exact = bool(exact_sliding_window)
        self._why_not_claimed = why_not_exact or (
            None if exact_sliding_window else "the score map's size arithmetic does not show it")
        self._analyses: OrderedDict[tuple[Any, ...], Analysis | FcconvError] = OrderedDict()
        self.head_impl = head_impl
        self.num_classes = num_classes
        self.size_modulus = tuple(int(m) for m in size_modulus or (1,) * len(self.min_size))
        self.training = graph_module.training

    @property
    def ndim(self) -> int:
        """Number of spatial dims."""
        return len(self.input_shape) - 1

    def forward(self, x: Tensor) -> Any:
        if x.dim() != self.ndim + 2 or x.shape[1] != self.input_shape[0] or any(
                s < m for s, m in zip(x.shape[2:], self.min_size)):
            raise FcconvError(
                f"FullyConvolutional expects inputs (N, {self.input_shape[0]}, *spatial) with "
                f"{self.ndim} spatial dim(s) of at least {format_shape(self.min_size)}; got "
                f"{format_shape(x.shape)}. Pass a batch of images at least that large."
            )
        if any(m != 1 for m in self.size_modulus):  # (not for symbolic sizes that any model takes: export)
            self._check_accepted(tuple(x.shape[2:]))
        return self.graph_module(x)

    def accepts(self, spatial: Sequence[int] | int) -> bool:
        """Whether the model runs at this spatial size: ``>= min_size`` and ``== input size`` modulo
        ``size_modulus`` in each dim (see :meth:`accepted_sizes`)."""
        sizes = per_dim(spatial, self.ndim, "spatial")
        return all(s >= lo and (s - s0) % m == 0 for s, lo, s0, m in
                   zip(sizes, self.min_size, self.input_shape[1:], self.size_modulus))

    def accepted_sizes(self) -> str:
        """The sizes the model accepts, e.g. ``'H = 32k, W = 32k (k >= 7)'``; ``'any >= min_size'``."""
        if all(m == 1 for m in self.size_modulus):
            return f"any size >= {format_shape(self.min_size)}"
        parts = []
        for label, s0, m, lo in zip(dim_labels(self.ndim)[2:], self.input_shape[1:],
                                    self.size_modulus, self.min_size):
            r = s0 % m
            parts.append(f"{label} = {m}k{f' + {r}' if r else ''} >= {lo}" if m > 1 else f"{label} >= {lo}")
        return ", ".join(parts)

    def _check_accepted(self, sizes: tuple[int, ...]) -> None:
        if self.accepts(sizes):
            return
        nearest = []
        for s, s0, m, lo in zip(sizes, self.input_shape[1:], self.size_modulus, self.min_size):
            below = s - (s - s0) % m
            nearest.append([s] if below == s and s >= lo else
                           sorted({max(below, lo + (s0 - lo) % m), max(below + m, lo)}))
        shown = " or ".join(format_shape(c) for c in itertools.product(*nearest))
        raise FcconvError(
            f"This model accepts spatial sizes {self.accepted_sizes()}; got "
            f"{format_shape(sizes)}. Crop or pad the input to an accepted size, e.g. {shown}."
        )

    def grid_shape(self, spatial: Sequence[int] | int) -> tuple[int, ...]:
        """The spatial size of the score map for an input of spatial size ``spatial``.

        Example:
            >>> fcn.grid_shape((448, 448))   # resnet18 converted at 224
            (8, 8)
        """
        sizes = per_dim(spatial, self.ndim, "spatial")
        if any(s < m for s, m in zip(sizes, self.min_size)):
            raise FcconvError(
                f"An input of spatial size {format_shape(sizes)} gives no cell: each dim must be "
                f"at least min_size = {format_shape(self.min_size)}."
            )
        self._check_accepted(sizes)
        return tuple((s - m) // t + 1 for s, m, t in zip(sizes, self.min_size, self.stride))

    def analysis(self, image_size: Sequence[int] | int | None = None) -> Analysis:
        """What :func:`~fcconv.models.receptive.analyze` proves about the net at one input size.

        Args:
            image_size: spatial size of the image; None for the training size. The last few
                analyses are cached.

        Raises:
            FcconvError: if the image gives no cell or the graph cannot be analyzed at that size.

        Example:
            >>> fcn.analysis((800, 800)).field   # resnet18 converted at 224
            ReceptiveField(stride=(32, 32), offset=(-217, -217), extent=(627, 627))
        """
        size = self.input_shape[1:] if image_size is None else per_dim(image_size, self.ndim, "image_size")
        if image_size is not None:
            self.grid_shape(size)  # refuses an image that gives no cell
        # keyed by the modes too: a Dropout in training mode is not a sliding op, in eval mode it is
        key = (size, tuple(m.training for m in self.graph_module.modules()))
        found = self._analyses.get(key)
        if found is None:
            try:
                found = analyze(self.graph_module, (self.input_shape[0], *size))
            except FcconvError as error:
                found = error
            self._analyses[key] = found
            if len(self._analyses) > _CACHED_ANALYSES:
                self._analyses.popitem(last=False)
        self._analyses.move_to_end(key)
        if isinstance(found, FcconvError):
            raise found
        return found

    @property
    def exact_sliding_window(self) -> bool:
        """Every cell equals the model run on its crop ``window_of(cell)``, proven (see the class)."""
        return self.why_not_exact is None

    @property
    def why_not_exact(self) -> str | None:
        """The first node that breaks :attr:`exact_sliding_window`, and why; None when exact."""
        training = stochastic_in_training(self.graph_module)
        if training:
            return (f"module '{training[0]}' ({type(self.graph_module.get_submodule(training[0])).__name__}) "
                    "is in training mode: its output depends on the batch or on chance (call fcn.eval())")
        try:
            why = self.analysis().why_not_exact
        except FcconvError as error:
            why = f"the proof could not run: {error}"
        return why or self._why_not_claimed

    def _sized_analysis(self, image_size: Sequence[int] | int | None, what: str) -> Analysis:
        """The analysis at ``image_size``; refuses None where the geometry depends on the size."""
        if image_size is None and self.analysis().size_dependent:
            raise FcconvError(
                f"{what} depends on the image size for this model (its padding is computed from "
                "the input size, like TF 'same'); got image_size=None. Pass the spatial size of "
                "the image, e.g. image_size=x.shape[2:]."
            )
        return self.analysis(image_size)

    def receptive_field_of(self, cell: Sequence[int] | int,
                           image_size: Sequence[int] | int | None = None) -> tuple[int, ...]:
        """The input box that cell ``cell`` depends on, in input pixels, half-open.

        Everything the cell's scores read, through every layer's padding: it contains the
        support of the gradient of the cell with respect to the input, and is its bounding box
        where it lies inside the image. In 2d ``(top, left, bottom, right)``; it may extend past
        the image (negative starts with padding). The halo of a tile, the region of a saliency
        map; :meth:`window_of` is the crop the cell scores.

        Args:
            cell: one index per spatial dim (ints, numpy ints or 0-d tensors).
            image_size: spatial size of the image; needed only where the geometry depends on it
                (TF "same" padding), else the training size is used.

        Raises:
            FcconvError: if the cell depends on the whole image (a global statistic, a position
                read at run time: the message names the node), if ``image_size`` is needed and
                missing, or if the cell is not in the map of ``image_size``.

        Example:
            >>> fcn.receptive_field_of((8, 8))   # resnet18 converted at 224
            (39, 39, 666, 666)
        """
        a = self._sized_analysis(image_size, "The receptive field")
        if a.field is None:
            raise FcconvError(
                f"The cells of this model have no bounded receptive field: {a.why_not_local}. "
                "Each cell depends on the whole image."
            )
        index = self._cell(cell, image_size)
        return a.field.box(index)

    def window_of(self, cell: Sequence[int] | int,
                  image_size: Sequence[int] | int | None = None) -> tuple[int, ...]:
        """The crop that cell ``cell`` scores, in input pixels, ends exclusive.

        In 2d ``(top, left, bottom, right)``; in general ``(*starts, *ends)`` with
        ``starts = cell * stride`` and ``ends = starts + window``: what a sliding-window
        classifier would feed the model for this cell. For padded models the last cells of a map
        may extend past the image (the zero padding fills them). Where padding is computed from
        the input size (TF "same"), the window moves with the receptive field: pass ``image_size``.

        Example:
            >>> fcn.window_of((1, 2))        # resnet18 converted at 224: stride 32
            (32, 64, 256, 288)
        """
        index = self._cell(cell, image_size)
        shift = (0,) * self.ndim
        if self.analysis().size_dependent:
            field = self._sized_analysis(image_size, "The window of a cell").field
            base = self.analysis().field
            if field is None or base is None:
                raise FcconvError(
                    "The window of a cell moves with the image size for this model, but its "
                    f"receptive field is not bounded: {self.analysis().why_not_local}."
                )
            shift = tuple(o - o0 for o, o0 in zip(field.offset, base.offset))
        starts = tuple(i * t + d for i, t, d in zip(index, self.stride, shift))
        return starts + tuple(s + w for s, w in zip(starts, self.window))

    def _cell(self, cell: Sequence[int] | int, image_size: Sequence[int] | int | None) -> tuple[int, ...]:
        index = per_dim(cell, self.ndim, "cell")
        if any(i < 0 for i in index):
            raise FcconvError(f"cell indices must be >= 0; got {format_shape(index)}.")
        if image_size is not None:
            grid = self.grid_shape(image_size)
            if any(i >= g for i, g in zip(index, grid)):
                raise FcconvError(
                    f"cell {format_shape(index)} is outside the {format_shape(grid)} map of an "
                    f"image of size {format_shape(per_dim(image_size, self.ndim, 'image_size'))}."
                )
        return index

    def geometry(self) -> dict[str, Any]:
        """The geometry as plain ints, tuples, bools and str, to save beside the state dict.

        ``{"state_dict": fcn.state_dict(), "geometry": fcn.geometry()}`` is a checkpoint that
        :meth:`from_state_dict` reloads with ``torch.load(..., weights_only=True)``.
        """
        modulus = {} if all(m == 1 for m in self.size_modulus) else {"size_modulus": self.size_modulus}
        return {
            **modulus,
            "input_shape": self.input_shape,
            "stride": self.stride,
            "window": self.window,
            "min_size": self.min_size,
            "exact_sliding_window": self.exact_sliding_window,
            "head_impl": self.head_impl,
            "num_classes": self.num_classes,
        }

    @classmethod
    def from_state_dict(cls, model: nn.Module, state_dict: Mapping[str, Any],
                        geometry: Mapping[str, Any] | None = None, *,
                        leaf_modules: object = ()) -> FullyConvolutional:
        """Rebuild a saved FCN: convert ``model`` (the architecture) again and load the weights.

        Args:
            model: an instance of the original architecture (its weights and its mode do not
                matter: it may be in training mode; the FCN has its mode, call ``.eval()`` on the
                result for inference).
            state_dict: ``fcn.state_dict()``, or a checkpoint ``{"state_dict": ..., "geometry": ...}``.
            geometry: ``fcn.geometry()``; taken from the checkpoint when omitted.
            leaf_modules: as for :func:`convolutionalize`.

        Raises:
            FcconvError: if the geometry is missing or differs from the rebuilt one.

        Example:
            >>> ckpt = torch.load("fcn.pt", weights_only=True)
            >>> fcn = FullyConvolutional.from_state_dict(resnet18(), ckpt)
        """
        if geometry is None and "geometry" in state_dict and "state_dict" in state_dict:
            geometry = state_dict["geometry"]
            state_dict = state_dict["state_dict"]
        if geometry is None or "input_shape" not in geometry:
            raise FcconvError(
                "from_state_dict needs the geometry saved with the weights (fcn.geometry(), with "
                "'input_shape'); got none. Save {'state_dict': fcn.state_dict(), 'geometry': "
                "fcn.geometry()}."
            )
        # The weights and statistics are replaced, so the model's mode does not matter here: a
        # freshly built architecture (in training mode) is accepted, and the FCN keeps its mode.
        fcn = _convolutionalize(model, tuple(geometry["input_shape"]), inplace=False,
                                leaf_modules=leaf_modules, head_impl=_saved_head_impl(geometry),
                                check_training=False)
        for key in ("stride", "window", "min_size", "size_modulus"):
            if key in geometry and tuple(geometry[key]) != getattr(fcn, key):
                raise FcconvError(
                    f"The saved geometry has {key}={tuple(geometry[key])} but the model converts to "
                    f"{key}={getattr(fcn, key)}. Pass an instance of the architecture that was saved."
                )
        fcn.load_state_dict(state_dict)
        return fcn

    def extra_repr(self) -> str:
        return (
            f"input_shape={format_shape(self.input_shape)}, stride={self.stride}, "
            f"window={self.window}, min_size={self.min_size}, num_classes={self.num_classes}, "
            f"exact_sliding_window={self.exact_sliding_window}, head_impl={self.head_impl!r}"
            + ("" if all(m == 1 for m in self.size_modulus) else
               f", accepted sizes: {self.accepted_sizes()}")
        )


def _training_error(model: nn.Module, found: list[str]) -> FcconvError:
    shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
    mode = "is in training mode and contains" if model.training else "contains, in training mode,"
    return FcconvError(
        f"{type(model).__name__} {mode} {shown}, whose output depends on "
        "the batch or on chance: converted as they are, each cell of the score map would be "
        "normalised over the whole map or randomly dropped, not scored like its window. Call "
        "model.eval() first (fcconv never changes the model's mode itself)."
    )


def _check_not_training(model: nn.Module) -> None:
    """Refuse a model whose BatchNorm, Dropout or RReLU modules are in training mode."""
    found = [f"{type(m).__name__} '{name}'" if name else type(m).__name__
             for name in stochastic_in_training(model) for m in [model.get_submodule(name)]]
    if found:
        raise _training_error(model, found)


def _check_no_training_calls(model: nn.Module, gm: fx.GraphModule) -> None:
    """Refuse traced calls like ``F.dropout(x, training=self.training)`` of a model in training mode."""
    if not model.training:
        return
    found = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in STOCHASTIC_FUNCTIONS:
            continue
        pair = node.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
        if pair is not None and pair.kwargs.get("training", node.target is not F.batch_norm) is True:
            found.append(f"node '{node.name}' ({node.target.__name__}(..., training=True))")
    if found:
        raise _training_error(model, found)


def check_inference_mode(model: nn.Module, gm: fx.GraphModule) -> None:
    """Refuse a model (traced as ``gm``) whose BatchNorm, Dropout or RReLU run in training mode.

    Raises:
        FcconvError: naming the modules or traced calls, and saying to call ``model.eval()``.
    """
    _check_not_training(model)
    _check_no_training_calls(model, gm)


def convolutionalize(model: nn.Module, input_shape: Sequence[int], *, inplace: bool = False,
                     leaf_modules: object = (), head_impl: str = "auto") -> FullyConvolutional:
    """Turn a classifier into a fully convolutional network that returns dense score maps.

    The model is traced with torch.fx and run once on ``meta`` tensors at ``input_shape``; the
    head that follows the last feature map is rewritten (see the module docstring), nothing else.
    At ``input_shape`` the result returns the model's scores as a ``(N, num_classes, 1, 1)`` map; on a
    larger input, one score vector per window: cell ``i`` scores the crop ``fcn.window_of(i)``.

    Before: ``features -> AdaptiveAvgPool2d(1) -> flatten -> Linear(512, 1000)``.
    After: ``features -> AvgPool2d(7, stride=1) -> Conv2d(512, 1000, 1)``.

    Args:
        model: the classifier, in eval mode: a model whose BatchNorm, Dropout (or RReLU)
            modules are in training mode is refused, as their output depends on the batch or on
            chance (call ``model.eval()`` first; fcconv never changes the model's mode). A
            model in training mode without them converts, and the FCN keeps every module's mode.
            Torchvision classifiers in eval mode work as they are.
        input_shape: the per-sample training shape ``(C, *spatial)``, e.g. ``(3, 224, 224)``;
            1, 2 or 3 spatial dims.
        inplace: if False (default) the model is deep-copied first and never changes. If True it
            is not copied: the returned FCN shares its parameters and its Linear, BatchNorm1d,
            LayerNorm and pooling submodules are replaced by their convolutional versions, so its
            own forward no longer works on flat features.
        leaf_modules: module types, module instances or qualified names that tracing keeps
            whole (for submodules with data-dependent control flow); they must work on larger
            inputs as they are.
        head_impl: how the convs that replace the head's Linear layers compute: ``"conv"`` standard
            ``nn.ConvNd`` (portable, exportable), ``"matmul"`` unfold + one matmul
            (:class:`UnfoldConv2d`), ``"auto"`` (default) the matmul on CPU, where oneDNN's
            convs are slow on the small maps of a head (vgg's 7x7 over 512 channels on 10x10),
            and the conv on other devices.

    Returns:
        A :class:`FullyConvolutional` with the converted ``graph_module`` and its geometry.

    Raises:
        FcconvError: on a malformed ``input_shape`` or ``head_impl``, or a model in training mode
            that contains BatchNorm, Dropout or RReLU modules (or traced ``F.dropout``,
            ``F.batch_norm`` calls with ``training=True``).
        NotEquivalentError: if tracing fails (the message names the module and suggests
            ``leaf_modules``), or a node cannot be converted or slid (the message names it).

    Example:
        >>> fcn = convolutionalize(torchvision.models.vgg11().eval(), (3, 224, 224))
        >>> fcn(torch.rand(1, 3, 320, 320)).shape, fcn.stride
        (torch.Size([1, 1000, 4, 4]), (32, 32))
    """
    return _convolutionalize(model, input_shape, inplace=inplace, leaf_modules=leaf_modules,
                             head_impl=head_impl, check_training=True)


def _convolutionalize(model: nn.Module, input_shape: Sequence[int], *, inplace: bool,
                      leaf_modules: object, head_impl: str, check_training: bool) -> FullyConvolutional:
    """:func:`convolutionalize`; ``check_training=False`` converts a model in training mode too."""
    model = unwrap(model) if isinstance(model, nn.Module) else model
    if not isinstance(model, nn.Module):
        raise FcconvError(
            f"convolutionalize expects an nn.Module; got {type(model).__name__}. Pass the model."
        )
    shape = check_input_shape(input_shape)
    if head_impl not in HEAD_IMPLS:
        raise FcconvError(
            f"head_impl must be one of {', '.join(map(repr, HEAD_IMPLS))}; got {head_impl!r}."
        )
    ndim = len(shape) - 1
    if check_training:
        _check_not_training(model)
    # Module instances become their qualified names here, so they survive the deep copy.
    types, names = leaf_matchers(model, leaf_modules)
    leaves = [*types, *sorted(names)]
    source = model if inplace else copy.deepcopy(model)
    gm = trace(source, leaves)
    if check_training:
        _check_no_training_calls(model, gm)
    try:
        shapes = record_shapes(gm, shape)
    except NodeFailure as error:
        raise node_failure(error, gm, shape, f"{type(model).__name__} on its training input",
                            "Pass the per-sample shape the model was trained on as input_shape, "
                            "e.g. (3, 224, 224)") from None
    desc = spatial_descriptors(gm, shapes, ndim, flatten_points(gm, shapes, ndim))
    state = Pass(gm, source, inplace, ndim, head_impl, shapes, dict(desc.desc))
    try:
        convert_head(state, desc)
        grid = measure_geometry(gm, shape)
    except NodeFailure as error:  # a raw PyTorch error never leaves: name the node that raised it
        raise node_failure(error, gm, shape, "The converted model on its training input",
                           "This is a bug in fcconv; please report it with the model") from None
    return FullyConvolutional(
        gm, input_shape=shape, stride=grid.stride, window=grid.window,
        min_size=grid.min_size, exact_sliding_window=grid.exact, head_impl=head_impl,
        num_classes=grid.num_classes, size_modulus=grid.modulus,
    )



def _saved_head_impl(geometry: Mapping[str, Any]) -> str:
    """The saved ``head_impl``; checkpoints of fcconv 0.1 call it ``head``."""
    return str(geometry.get("head_impl", geometry.get("head", "auto")))
