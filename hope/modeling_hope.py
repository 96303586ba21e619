"""HopeForCausalLM: token embedding -> N x HopeBlock -> RMSNorm -> LM head (HOPE_SPEC.md section 1).

    x = x + Mixer(norm(x))             # self-modifying Titans (HOPE) or attention (Transformer++)
    for level in CMS levels:           # continuum memory system, fastest first
        x = x + level(norm(x))

A CMS level is a residual SwiGLU MLP whose parameters carry `update_period_tokens`: the outer
optimizer updates them every that many training tokens (0 = every step). The model itself knows
nothing of optimizers or distribution; the tag is read by train/optim.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .config import HopeConfig
from .layers import CausalSelfAttention, CausalDepthwiseConv, RMSNorm, SwiGLU
from .titans import SelfModifyingTitans


# transformers 5.2x renamed the decoding state `past_key_values` to `cache` (generate()'s keyword and the
# output classes' field): both names are taken, and the output uses the installed version's.
CACHE_FIELD = "cache" if "cache" in {f.name for f in dataclasses.fields(CausalLMOutputWithPast)} else "past_key_values"


class HopeCache:
    """Decoding state: one dict per layer (fast-weight memories and conv tails, or keys/values).

    Its size does not grow with the context for HOPE: every new token costs the same.
    """

    def __init__(self, num_layers: int):
        self.layers: list[dict] = [{} for _ in range(num_layers)]
        self.seen_tokens = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seen_tokens

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: keep, for every new beam, the state of the beam it came from (batch dim 0)."""
        self.layers = [_select_batch(layer, beam_idx) for layer in self.layers]


def _select_batch(item, index: torch.LongTensor):
    """`item` (tensors in dicts / tuples / dataclasses such as MemoryState) with batch rows `index`."""
    if torch.is_tensor(item):
        return item.index_select(0, index.to(item.device))
    if isinstance(item, dict):
        return {key: _select_batch(value, index) for key, value in item.items()}
    if isinstance(item, (tuple, list)):
        return type(item)(_select_batch(value, index) for value in item)
    if dataclasses.is_dataclass(item):
        return dataclasses.replace(item, **{f.name: _select_batch(getattr(item, f.name), index)
                                            for f in dataclasses.fields(item)})
    return item  # ints (positions within a chunk), None


class CMSLevel(nn.Module):
    def __init__(self, config: HopeConfig, hidden: int, period_tokens: int):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLU(config.hidden_size, hidden)
        for p in self.parameters():
            p.update_period_tokens = period_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class HopeBlock(nn.Module):
    def __init__(self, config: HopeConfig):
        super().__init__()
        self.mixer_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.mixer == "attention":
            self.mixer = CausalSelfAttention(config.hidden_size, config.num_heads, config.rope_theta)
        else:
            self.mixer = SelfModifyingTitans(config)
        self.cms = nn.ModuleList(
            CMSLevel(config, hidden, period) for hidden, period in zip(config.cms_hidden_sizes, config.cms_periods)
        )

    def forward(self, x: torch.Tensor, cache: dict | None = None) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x), cache)
        for level in self.cms:
            x = level(x)
        return x


class HopePreTrainedModel(PreTrainedModel):
    config_class = HopeConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["HopeBlock"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, (RMSNorm, CausalDepthwiseConv, SelfModifyingTitans)):
            module.reset_parameters()


class HopeModel(HopePreTrainedModel):
    def __init__(self, config: HopeConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(HopeBlock(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.gradient_checkpointing = config.gradient_checkpointing_layers
        self.post_init()

    def forward(self, input_ids: torch.Tensor, cache: HopeCache | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for i, layer in enumerate(self.layers):
            layer_cache = None if cache is None else cache.layers[i]
            if self.gradient_checkpointing and self.training and cache is None:
                x = checkpoint(layer, x, use_reentrant=False)
            else:
                x = layer(x, layer_cache)
        if cache is not None:
            cache.seen_tokens += input_ids.shape[1]
        return self.norm(x)


class HopeForCausalLM(HopePreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: HopeConfig):
        super().__init__(config)
        self.model = HopeModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    # ------------------------------------------------------------------ generation
    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # generate() must not build a DynamicCache: forward() makes a HopeCache

    def prepare_inputs_for_generation(self, input_ids: torch.LongTensor, past_key_values: HopeCache | None = None,
                                      use_cache: bool | None = True, cache: HopeCache | None = None, **kwargs) -> dict:
        """Feed only the tokens the cache has not seen (the whole prompt first, then one token).

        The attention mask is not used: batches must be unpadded (or right-aligned prompts of equal length).
        """
        cache = cache if cache is not None else past_key_values
        if cache is not None and cache.seen_tokens:
            input_ids = input_ids[:, cache.seen_tokens:]
        return {"input_ids": input_ids.contiguous(), "cache": cache, "use_cache": use_cache}

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        past_key_values: HopeCache | None = None,
        use_cache: bool | None = None,
        cache: HopeCache | None = None,
        shift_labels: bool = True,
        logits_to_keep: int = 0,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Causal LM forward. `labels` follow the Hugging Face convention (aligned with input_ids,
        shifted here) unless shift_labels=False, in which case labels[t] is the target of
        position t (the trainer passes inputs s[:, :-1] and targets s[:, 1:])."""
        cache = cache if cache is not None else past_key_values
        if use_cache and cache is None:
            cache = HopeCache(self.config.num_layers)
        hidden = self.model(input_ids, cache)
        if logits_to_keep:
            hidden = hidden[:, -logits_to_keep:]
        logits = self.lm_head(hidden)
        loss = None
        if labels is not None:
            if shift_labels:
                logits_for_loss, targets = logits[:, :-1], labels[:, 1:]
            else:
                logits_for_loss, targets = logits, labels
            loss = F.cross_entropy(logits_for_loss.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits, **{CACHE_FIELD: cache})
