"""The patch-trained networks (FG-UNET and the seed's baselines), one module per concern.

Imports nothing heavy: :mod:`spec` and :mod:`settings` are torch-free, so the config check and the
registry can ask about a network (pooling factor, settings) without loading torch.

- :mod:`~pipeline.nets.spec` a network's shape as data; :mod:`~pipeline.nets.arch` the modules.
- :mod:`~pipeline.nets.settings` the config's ``nets`` section, typed and checked.
- :mod:`~pipeline.nets.patches` patch positions, class-first sampling, reading, inputs; the
  ``patches`` stage.
- :mod:`~pipeline.nets.data` every tile's patches for training; what the sampler can draw.
- :mod:`~pipeline.nets.loss` eq. 1 and the eq.-4 class weights.
- :mod:`~pipeline.nets.distributed` several training processes (tile ownership, the batch plan).
- :mod:`~pipeline.nets.checkpoints`, :mod:`~pipeline.nets.history` what a run leaves behind.
- :mod:`~pipeline.nets.train` the training loop (the ``train`` stage of a network);
  :mod:`~pipeline.nets.finetune` checks a starting model (``nets.init_from``).
- :mod:`~pipeline.nets.weights` the ``weights.pt`` file; :mod:`~pipeline.nets.capability`
  hardware probes (fast paths, bf16).
- :mod:`~pipeline.nets.classifier` the registry entries: the same interface as RF;
  :mod:`~pipeline.nets.hybrid` ``fgunet_rf``, the network's penultimate features under the RF.

Import order (no cycles, tests/test_packaging.py): spec -> arch -> weights/loss/settings/patches ->
distributed -> data -> checkpoints/history/finetune -> train -> classifier -> hybrid.
"""
