"""Drop-in replacements for the hot functions of the public CoLab code (ZerojumpLine/CoLab).

Same names, signatures, results and side effects as the reference functions, on colabx's fused
kernels. The reference's ``common.py`` *defines* ``calculate_loss`` and ``calcualte_loss_val``
and calls them by name, so importing the drop-ins at its top changes nothing. Instead call
:func:`apply_to_reference` once in its ``train.py`` after its own imports (it replaces the
functions in its ``common`` and ``utilities`` modules), or import them at the END of those
modules::

    # end of common.py
    from colabx.compat import calculate_loss, calcualte_loss_val, hessian_vector_product_Unet
    # end of utilities.py
    from colabx.compat import one_hot2dist, hessian_vector_product_Unet

* :func:`calculate_loss` (``common.py``) — deep-supervision labels resized on the device instead
  of a CPU round trip per level, and CE + Dice of all levels in one fused call.
* :func:`calcualte_loss_val` (``common.py``, the reference's spelling) — the meta loss L_ROI by
  the fused ROI BCE; its nine logged diagnostics in one vectorised pass, differentiable.
* :func:`hessian_vector_product_Unet` (``utilities.py``) — the θ± forwards without autograd
  graphs and one generator backward instead of two.
* :func:`one_hot2dist` (``utilities.py``) — colabx's threaded exact EDT instead of scipy's; safe
  in the reference sampler's ``fork`` pool; :func:`cache_distance_maps` keeps each case's map
  on disk so the sampler computes it once per run instead of once per epoch.
* :func:`train` (``common.py``) — the whole epoch on :class:`colabx.method.MetaStep`, per sample as
  the reference or batched; import it in ``train.py`` in place of ``common.train``.

Their pure-PyTorch/NumPy twins, which redo the reference's steps literally, are in
:mod:`colabx.compat.twins` (``train_reference`` for the epoch).
"""

from colabx.compat.common import calcualte_loss_val, calculate_loss
from colabx.compat.patch import apply_to_reference
from colabx.compat.train import train
from colabx.compat.utilities import (
    cache_distance_maps,
    hessian_vector_product_Unet,
    one_hot2dist,
)

__all__ = [
    "apply_to_reference",
    "cache_distance_maps",
    "calcualte_loss_val",
    "calculate_loss",
    "hessian_vector_product_Unet",
    "one_hot2dist",
    "train",
]
