"""Distill: curriculum knowledge distillation (and the optional teacher SFT) on Ray Train.

Read top-down:

- ``stage``: the pipeline stages' entry points: bucket or row datasets in, a trained model folder out;
- ``driver``: the Ray Train job (TorchTrainer, checkpoint retention, Ctrl-C, the stage summary);
- ``worker``: what each Ray Train worker runs: setup, then the curriculum stage by stage;
- ``step``: one optimizer step and the held-out metric, under plain ``torch.distributed`` (no Ray);
- ``losses``: the divergences and the chunked loss that owns masking, reduction and normalisation;
- ``batches``: which rows each step trains on, on which worker, in which micro-batch;
- ``parallel``: DDP / FSDP2 wrapping, meta-device loading and precision;
- ``state``: ``TrainState``, exactly what a checkpoint holds.
"""
