"""Drop-in replacements for the hot functions of the public CoLab code (ZerojumpLine/CoLab).

Same names, signatures, results and side effects as the reference functions, on colabx's fused
kernels. In an existing CoLab checkout, replace::

    from common import calculate_loss, calcualte_loss_val
    from utilities import one_hot2dist, hessian_vector_product_Unet

with::

    from colabx.compat import (calculate_loss, calcualte_loss_val, one_hot2dist,
                               hessian_vector_product_Unet)

* :func:`calculate_loss` (``common.py``) — deep-supervision labels resized on the device instead
  of a CPU round trip per level, and CE + Dice of all levels in one fused call.
* :func:`calcualte_loss_val` (``common.py``, the reference's spelling) — the meta loss L_ROI by
  the fused ROI BCE; its nine logged diagnostics in one pass without autograd graphs.
* :func:`hessian_vector_product_Unet` (``utilities.py``) — the θ± forwards without autograd
  graphs and one generator backward instead of two.
* :func:`one_hot2dist` (``utilities.py``) — colabx's threaded exact EDT instead of scipy's.

Or, without editing imports, call :func:`apply_to_reference` once at the top of the
reference's ``train.py``: it replaces those functions in its ``common`` and ``utilities`` modules.

Their pure-PyTorch/NumPy twins, which redo the reference's steps literally, are in
:mod:`colabx.reference.compat`.
"""

from colabx.compat.common import calcualte_loss_val, calculate_loss
from colabx.compat.patch import apply_to_reference
from colabx.compat.train import train
from colabx.compat.utilities import hessian_vector_product_Unet, one_hot2dist

__all__ = [
    "apply_to_reference",
    "calcualte_loss_val",
    "calculate_loss",
    "hessian_vector_product_Unet",
    "one_hot2dist",
    "train",
]
