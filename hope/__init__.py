"""HOPE (Nested Learning) and its baselines as Hugging Face models. See HOPE_SPEC.md / docs/."""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .config import HopeConfig, ModelConfigError
from .modeling_hope import HopeCache, HopeForCausalLM, HopeModel

# With the package installed, the Auto classes know model_type "hope" without trust_remote_code.
AutoConfig.register("hope", HopeConfig, exist_ok=True)
AutoModel.register(HopeConfig, HopeModel, exist_ok=True)
AutoModelForCausalLM.register(HopeConfig, HopeForCausalLM, exist_ok=True)

__all__ = ["HopeConfig", "HopeForCausalLM", "HopeModel", "HopeCache", "ModelConfigError"]
