"""First-order rounding-error propagation over ATen ops: the machinery behind the certificate's bounds.

Private: nothing here is public API. :func:`fcconv.certify.compare` runs the float64 copies of both
modules under a :class:`Tracker` (``tracker.py``); the rules it applies live in ``rules_*.py``, one
module per family, registered by ATen op name in ``registry.py``. docs/certificates.md ("The bound")
states them op by op. How they are applied:

* **Bounds.** Next to each floating tensor ``t`` the tracker keeps ``E(t)``, a float64 tensor of
  ``t``'s shape bounding ``|t_computed - t_exact|`` to first order in the unit roundoff, or None
  where it is exactly zero (:data:`Bound`). Tensors without an entry (inputs, parameters) are exact.
* **Channels.** ``Tracker(eps)`` propagates one bound per entry of ``eps`` through the same ops; they
  differ only in the rounding each op adds. ``compare`` uses the working dtype's epsilon and
  float64's; a channel with ``eps = 0`` only carries the ``initial`` bounds of the parameters.
* **Unsupported ops.** An op without a rule (creation ops aside), or a rule that fails, ends the
  propagation: the tracker names the op in ``Tracker.unsupported`` and its bounds must not be used.
* **Writes.** An in-place op is followed through its out-of-place form; a write into a tensor updates
  the bounds of every tracked tensor that shares its storage.
* **Compounding.** A bound that has been through more than one rounded dot product is marked
  :meth:`Tracker.deep`: from there on the worst case compounds and the bound is valid but loose.
"""

from fcconv.certify.rounding import (  # noqa: F401  (importing a family registers its rules)
    rules_backward,
    rules_elementwise,
    rules_linear,
    rules_norm,
    rules_reduce,
    rules_structural,
)
from fcconv.certify.rounding.registry import RULES, Bound, scale_bound, sum_bounds
from fcconv.certify.rounding.tracker import AbsCache, Tracker

__all__ = ["RULES", "AbsCache", "Bound", "Tracker", "scale_bound", "sum_bounds"]
