"""Training and the jobs run on its checkpoints, each a module for ``python -m``:

``pretrain``             train a run config (``--config RUN.yaml [--set key=value ...]``, pretrain/train.py)
``pretrain.eval``        validation loss and perplexity of a checkpoint
``pretrain.generate``    text from a checkpoint, the recurrent state carried; the state saves and resumes
``pretrain.export``      any engine's checkpoint as one consolidated safetensors file and its config
``pretrain.quickstart``  raw text to a trained model and a sample, end to end (``make quickstart``)
"""
