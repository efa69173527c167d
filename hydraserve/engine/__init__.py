"""The inference engine (torch): model stages, paged KV cache, continuous batching, sampling.

Importing this package does not import torch; ``hydraserve.engine.engine`` does.
"""
