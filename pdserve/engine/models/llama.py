"""The Llama-family forward pass (Llama, Mistral, Qwen2) over the paged KV cache.

A pure function of (token ids, positions, attention metadata, KV cache): no
module state but the weights. q/k/v and gate/up are fused into one matrix each.

With a quantized model (load_model(quantization=...)) the decoder layers' seven
linears arrive as int4 or int8 weights and the LM head as int8 (its own copy when
tied), and run as quantization.Int4Linear / Int8Linear; the embedding and the norms
stay dense in the model's dtype. quantization.quantize_weights decides, and says why.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pdserve.engine.attention import AttentionMetadata
from pdserve.engine.kv_cache import KVCache, write_kv
from pdserve.engine.models.layers import AnyLinear, RotaryEmbedding, make_linear, rms_norm
from pdserve.engine.models.spec import ModelSpec
from pdserve.engine.quantization import QuantizedWeight, concat_rows

# Called after a layer's K/V of this step are in the cache (layer-wise KV streaming).
LayerHook = Callable[[int], None]
# HF names -> dense tensors, or quantized weights for the linears of a quantized model.
Weights = dict[str, torch.Tensor | QuantizedWeight]


class DecoderLayer:
    def __init__(self, spec: ModelSpec, w: Weights, prefix: str, rotary: RotaryEmbedding) -> None:
        attn, mlp = f"{prefix}.self_attn", f"{prefix}.mlp"
        qkv_bias = None
        if spec.qkv_bias:
            qkv_bias = torch.cat([w[f"{attn}.{n}_proj.bias"] for n in "qkv"])
        self.qkv: AnyLinear = make_linear(concat_rows([w[f"{attn}.{n}_proj.weight"] for n in "qkv"]), qkv_bias)
        self.o_proj: AnyLinear = make_linear(w[f"{attn}.o_proj.weight"])
        self.gate_up: AnyLinear = make_linear(concat_rows([w[f"{mlp}.gate_proj.weight"], w[f"{mlp}.up_proj.weight"]]))
        self.down: AnyLinear = make_linear(w[f"{mlp}.down_proj.weight"])
        self.input_norm = w[f"{prefix}.input_layernorm.weight"]
        self.post_attn_norm = w[f"{prefix}.post_attention_layernorm.weight"]
        self.rotary = rotary
        self.num_heads, self.num_kv_heads, self.head_dim = spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.eps = spec.rms_norm_eps
        self.scale = spec.head_dim**-0.5

    def __call__(
        self,
        h: torch.Tensor,  # [T, hidden]
        cos: torch.Tensor,  # [T, 1, D]
        sin: torch.Tensor,
        meta: AttentionMetadata,
        k_cache: torch.Tensor,  # this layer's cache
        v_cache: torch.Tensor,
        after_kv_write: Callable[[], None] | None = None,
    ) -> torch.Tensor:  # [T, hidden]
        """One decoder layer. A function of its arguments and the weights only, so that
        compiled_decode can compile it once and run it for every layer."""
        heads, kv_heads, d = self.num_heads, self.num_kv_heads, self.head_dim
        x = rms_norm(h, self.input_norm, self.eps)
        qkv = self.qkv(x)  # [T, (H + 2 Hkv) * D]
        # q and k rotate together: one rope over [T, H + Hkv, D].
        qk = self.rotary.apply(qkv[:, : (heads + kv_heads) * d].view(-1, heads + kv_heads, d), cos, sin)
        q, k = qk.split([heads, kv_heads], dim=1)
        v = qkv[:, (heads + kv_heads) * d :].view(-1, kv_heads, d)
        write_kv(k_cache, v_cache, meta.slots, k, v)
        if after_kv_write is not None:
            after_kv_write()
        h = h + self.o_proj(meta.backend(q, k_cache, v_cache, meta, self.scale))
        x = rms_norm(h, self.post_attn_norm, self.eps)
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return h + self.down(F.silu(gate) * up)


class LlamaModel:
    def __init__(self, spec: ModelSpec, hf_config, weights: Weights, max_positions: int) -> None:
        self.spec = spec
        emb = weights["model.embed_tokens.weight"]
        self.embed = emb
        self.rotary = RotaryEmbedding(hf_config, spec.head_dim, max_positions, emb.dtype, emb.device)
        self.layers = [DecoderLayer(spec, weights, f"model.layers.{i}", self.rotary) for i in range(spec.num_layers)]
        self.norm = weights["model.norm.weight"]
        # A quantized model carries its LM head even when tied: an int8 copy of the embedding.
        tied = spec.tie_word_embeddings and "lm_head.weight" not in weights
        self.lm_head = make_linear(emb if tied else weights["lm_head.weight"])

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,  # [T]
        positions: torch.Tensor,  # [T]
        meta: AttentionMetadata,
        kv_cache: KVCache,
        layer_hook: LayerHook | None = None,
        layer_fn: Callable[..., torch.Tensor] | None = None,
    ) -> torch.Tensor:  # [T, hidden]
        """The step's final hidden states. layer_fn(layer, h, cos, sin, meta, k_cache, v_cache)
        runs each layer in place of calling it (compiled_decode's compiled layer)."""
        cos, sin = self.rotary.lookup(positions)
        h = F.embedding(input_ids, self.embed)
        for i, layer in enumerate(self.layers):
            k_cache, v_cache = kv_cache.k[i], kv_cache.v[i]
            if layer_fn is not None:
                h = layer_fn(layer, h, cos, sin, meta, k_cache, v_cache)
            else:
                h = layer(h, cos, sin, meta, k_cache, v_cache,
                          None if layer_hook is None else functools.partial(layer_hook, i))
        return rms_norm(h, self.norm, self.spec.rms_norm_eps)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, hidden] -> [N, V]
        return self.lm_head(hidden)
