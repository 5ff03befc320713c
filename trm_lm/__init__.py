"""trm-lm: Tiny Recursive Models (Jolicoeur-Martineau 2025) as Hugging Face-native causal LMs.

    from trm_lm import TRMConfig, TRMForCausalLM
    model = TRMForCausalLM(TRMConfig(vocab_size=4096))

Importing the package registers `trm_lm` with AutoConfig / AutoModel / AutoModelForCausalLM, and
marks the classes for `register_for_auto_class`, so `save_pretrained` writes the modeling code next
to the weights and `from_pretrained(dir, trust_remote_code=True)` works where trm_lm is not installed.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_trm import TRMConfig
from .generation import inspect_generation
from .inspection import format_trace_table
from .modeling_trm import TokenTrace, TRMCausalLMOutputWithPast, TRMForCausalLM, TRMModel, TRMPreTrainedModel

AutoConfig.register(TRMConfig.model_type, TRMConfig, exist_ok=True)
AutoModel.register(TRMConfig, TRMModel, exist_ok=True)
AutoModelForCausalLM.register(TRMConfig, TRMForCausalLM, exist_ok=True)
TRMConfig.register_for_auto_class()
TRMModel.register_for_auto_class("AutoModel")
TRMForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__version__ = "0.1.0"
__all__ = ["TRMConfig", "TRMForCausalLM", "TRMModel", "TRMPreTrainedModel", "TRMCausalLMOutputWithPast",
           "inspect_generation", "format_trace_table", "TokenTrace"]
