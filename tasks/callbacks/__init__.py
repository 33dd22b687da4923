"""Lightning callbacks and plugins the tasks run with: atomic checkpoints and last.ckpt on Ctrl-C
(:mod:`.checkpointing`), W&B tracking and the saved config (:mod:`.tracking`), validation
episodes as images (:mod:`.visualise`), prediction writers (:mod:`.predictions`), test results
files (:mod:`.results`) and BatchNorm synchronised on any device (:mod:`.sync_batchnorm`).

Models live in :mod:`backbones` and :mod:`tasks.heads`; the LightningModules and their command
lines in :mod:`tasks.segment`, :mod:`tasks.classify` (:mod:`tasks.base`, :mod:`tasks.cli`).
"""
