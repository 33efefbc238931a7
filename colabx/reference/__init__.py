"""Deprecated alias package: colabx's pure-PyTorch twins moved to :mod:`colabx.twins` and the
twins of the published CoLab code to :mod:`colabx.compat.twins`; importing it raises a
DeprecationWarning. Its submodules are the moved modules themselves."""

import warnings

warnings.warn("colabx.reference is deprecated: the twins moved to colabx.twins (and "
              "colabx.compat.twins)", DeprecationWarning, stacklevel=2)
