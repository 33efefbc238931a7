"""``colabx bench``: the fused ops against their pure-PyTorch twins on this machine.

:mod:`colabx.bench.harness` times implementations of the same work and takes every ratio against
a baseline of the same run; :mod:`colabx.bench.cases` holds one module of cases per op
(``context_labels``, ``distance_transform``, ``dice_ce_loss``); :mod:`colabx.bench.ops` is the
command. The training-level benchmarks (meta step, data pipeline, trainer) live in the source
tree's ``benchmarks/`` folder.
"""
