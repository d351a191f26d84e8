"""Flatness-seeking methods and curvature tracking inside other people's trainers.

* :mod:`flatness.integrations.lightning` - :class:`~flatness.integrations.lightning.FlatnessMixin`
  (every method under Lightning's automatic optimization: closure, per-update
  schedulers, ``accumulate_grad_batches``, mixed precision, DDP) and
  :class:`~flatness.integrations.lightning.CurvatureCallback`.
* :mod:`flatness.integrations.hf` - :class:`~flatness.integrations.hf.FlatnessTrainer`
  (the two-pass methods under ``transformers.Trainer``) and
  :class:`~flatness.integrations.hf.CurvatureCallback`.

Experiment loggers (the ``log(metrics, step)`` protocol and TensorBoard) live in
:mod:`flatness.loggers`, in the library, because ``flatness train --log`` uses them:
integrations import the library, never the other way.

Nothing here is imported by ``import flatness``; each module imports its
optional package (``pip install 'flatness[lightning]'``, ``'flatness[hf]'``,
``'flatness[tensorboard]'``) when it is itself imported.
"""
