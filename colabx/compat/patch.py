"""Install the drop-ins into a running copy of the public CoLab code, in one call."""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from colabx.compat.common import calcualte_loss_val, calculate_loss
from colabx.compat.utilities import hessian_vector_product_Unet, one_hot2dist
from colabx.models.cpu_convolutions import enable_onednn_convolutions

__all__ = ["apply_to_reference"]

#: Module of the reference code → the names replaced in it.
_REPLACEMENTS = {
    "common": {
        "calculate_loss": calculate_loss,
        "calcualte_loss_val": calcualte_loss_val,
        # common.py imports it from utilities by name, so its own binding is replaced too
        "hessian_vector_product_Unet": hessian_vector_product_Unet,
    },
    "utilities": {
        "one_hot2dist": one_hot2dist,
        "hessian_vector_product_Unet": hessian_vector_product_Unet,
    },
}


def apply_to_reference(common: ModuleType | None = None,
                       utilities: ModuleType | None = None, *,
                       cpu_convolutions: bool | None = None) -> list[str]:
    """Replace the reference's hot functions by colabx's drop-ins, in place.

    Call it once at the top of the reference's ``train.py`` (after its own imports)::

        import colabx.compat
        colabx.compat.apply_to_reference()

    Parameters
    ----------
    common, utilities : module, optional
        The reference's ``common`` and ``utilities`` modules; by default imported by those names
        (so the reference's folder must be on ``sys.path``, as it is when its scripts run).
    cpu_convolutions : bool, optional
        Also run the calling thread's 3D convolutions of float32 CPU tensors on oneDNN from now
        on (:func:`colabx.models.enable_onednn_convolutions`): the reference's per-sample passes
        are batch 1, which PyTorch otherwise sends to its slow unfold + GEMM kernel. The routing
        is a torch function mode that stays on in the calling thread (until
        :func:`colabx.models.disable_onednn_convolutions`); it also runs InstanceNorm without
        running statistics as GroupNorm with one group per channel (the same statistics, float32
        rounding apart: about 2e-7 on the outputs). Default: on when torch sees no CUDA device
        (a CPU run), off otherwise (the mode would add a Python call to every torch call of a
        GPU run and change nothing).

    Returns
    -------
    list of str
        The replaced attributes, as ``"module.name"``, then ``"torch.conv3d"`` and
        ``"torch.conv_transpose3d"`` when the convolutions were routed (InstanceNorm is then
        rerouted too, see ``cpu_convolutions``).

    Raises
    ------
    ImportError
        A module cannot be imported by its default name.
    AttributeError
        A module lacks one of the functions it is expected to define (not the reference code).

    Code that already holds the originals (``from common import calculate_loss`` executed before
    this call, in another module) keeps them; worker processes started with ``fork`` after the
    call inherit the replacements, those started with ``spawn`` must call it again.
    """
    modules = {"common": common, "utilities": utilities}
    for name, mod in modules.items():
        if mod is None:
            modules[name] = importlib.import_module(name)
    for name, mod in modules.items():
        missing = [attr for attr in _REPLACEMENTS[name] if not hasattr(mod, attr)]
        if missing:
            raise AttributeError(f"apply_to_reference: module {mod.__name__!r} has no "
                                 f"{', '.join(missing)}; is it the CoLab reference's {name}.py?")
    replaced = []
    for name, mod in modules.items():
        for attr, fn in _REPLACEMENTS[name].items():
            setattr(mod, attr, fn)
            replaced.append(f"{mod.__name__}.{attr}")
    if cpu_convolutions is None:
        cpu_convolutions = not torch.cuda.is_available()
    if cpu_convolutions and enable_onednn_convolutions():
        replaced += ["torch.conv3d", "torch.conv_transpose3d"]
    return replaced
