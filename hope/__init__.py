"""HOPE (Nested Learning) and its baselines as Hugging Face models. See HOPE_SPEC.md / docs/."""
from .config import HopeConfig, ModelConfigError
from .modeling_hope import HopeCache, HopeForCausalLM, HopeModel

__all__ = ["HopeConfig", "HopeForCausalLM", "HopeModel", "HopeCache", "ModelConfigError"]
