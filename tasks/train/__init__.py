"""The train stage: its params section (the run, shared with finetune) and the torchrun
launcher. The trainer itself lives in ``model/``."""
