"""Pictures of distillation: ``acamkd viz masks`` (what a method's masks look at, per image) and
``acamkd viz history`` (training curves of runs, overlaid). matplotlib on the Agg canvas only
(:mod:`acamkd.viz.figure`): no GUI backend, nothing downloaded."""
