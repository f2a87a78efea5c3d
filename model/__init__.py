"""Janus in plain Paddle: config, layers, loader, processor, generation.

Only the pure-Python config names are exported here, so that importing `model.processor`
(or this package) does not import Paddle; import `model.loader.load_model` and
`model.janus.JanusModel` from their modules.
"""
from .config import ConfigError, JanusConfig, expected_hf_shapes

__all__ = ["ConfigError", "JanusConfig", "expected_hf_shapes"]
