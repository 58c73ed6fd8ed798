"""Model families beyond the decoder-only Llama shape, built from configs (random weights, tiny).

Encoder-decoders (T5, BART), mixture-of-experts decoders (Mixtral, Qwen2-MoE, OLMoE), Falcon, Bloom
(ALiBi), GPT-NeoX (partial rotary), OPT, Phi-3 (fused projections), a BERT classifier, and
modules built from torch's own ``nn.TransformerEncoder`` / ``nn.MultiheadAttention`` — the
families whose structure the Llama-shaped tests do not exercise. Each factory returns a fresh
model in training mode and ``seq2seq_batch`` / ``tests.models.lm_batch`` give matching inputs.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tests.models import HEADS, HIDDEN, INTERMEDIATE, LAYERS, POSITIONS, VOCAB

__all__ = ["tiny_t5", "tiny_bart", "tiny_mixtral", "tiny_qwen2_moe", "tiny_olmoe", "tiny_falcon", "tiny_bloom",
           "tiny_gpt_neox", "tiny_opt", "tiny_phi3", "tiny_bert_classifier", "classifier_batch", "TorchEncoderLM",
           "CustomLinearish", "seq2seq_batch"]


def _seeded(build: Any, config: Any) -> nn.Module:
    torch.manual_seed(0)
    return build(config)


def tiny_t5(**overrides: Any) -> nn.Module:
    """T5ForConditionalGeneration: relative attention, gated-GELU feed-forward, tied embeddings."""
    from transformers import T5Config, T5ForConditionalGeneration

    base = dict(vocab_size=VOCAB, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=INTERMEDIATE, num_layers=LAYERS,
                num_decoder_layers=LAYERS, num_heads=HEADS, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return _seeded(T5ForConditionalGeneration, T5Config(**{**base, **overrides}))


def tiny_bart(**overrides: Any) -> nn.Module:
    """BartForConditionalGeneration: learned positions, biased projections, a shared embedding."""
    from transformers import BartConfig, BartForConditionalGeneration

    base = dict(vocab_size=VOCAB, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
                encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=INTERMEDIATE,
                decoder_ffn_dim=INTERMEDIATE, max_position_embeddings=POSITIONS, dropout=0.0, attention_dropout=0.0,
                activation_dropout=0.0, pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
                forced_eos_token_id=None)
    return _seeded(BartForConditionalGeneration, BartConfig(**{**base, **overrides}))


def _moe(**extra: Any) -> dict:
    return dict(hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=POSITIONS, **extra)


def tiny_mixtral(**overrides: Any) -> nn.Module:
    """MixtralForCausalLM: 4 experts, top-2 routing (experts are 3-D parameters, the router a weight)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    return _seeded(MixtralForCausalLM, MixtralConfig(**{**_moe(num_local_experts=4, num_experts_per_tok=2),
                                                       **overrides}))


def tiny_qwen2_moe(**overrides: Any) -> nn.Module:
    """Qwen2MoeForCausalLM: routed experts plus a gated shared expert."""
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    extra = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                 decoder_sparse_step=1, mlp_only_layers=[])
    return _seeded(Qwen2MoeForCausalLM, Qwen2MoeConfig(**{**_moe(**extra), **overrides}))


def tiny_olmoe(**overrides: Any) -> nn.Module:
    """OlmoeForCausalLM: 4 experts, top-2, q/k norms."""
    from transformers import OlmoeConfig, OlmoeForCausalLM

    return _seeded(OlmoeForCausalLM, OlmoeConfig(**{**_moe(num_experts=4, num_experts_per_tok=2), **overrides}))


def tiny_falcon(**overrides: Any) -> nn.Module:
    """FalconForCausalLM: fused query_key_value, ``FalconLinear`` (an nn.Linear subclass), parallel attention."""
    from transformers import FalconConfig, FalconForCausalLM

    base = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, vocab_size=VOCAB,
                max_position_embeddings=POSITIONS, new_decoder_architecture=False, multi_query=True,
                parallel_attn=True, bias=False, alibi=False, hidden_dropout=0.0, attention_dropout=0.0)
    return _seeded(FalconForCausalLM, FalconConfig(**{**base, **overrides}))


def tiny_bloom(**overrides: Any) -> nn.Module:
    """BloomForCausalLM: ALiBi position biases (no position embeddings), fused query_key_value."""
    from transformers import BloomConfig, BloomForCausalLM

    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, n_layer=LAYERS, n_head=HEADS, hidden_dropout=0.0,
                attention_dropout=0.0)
    return _seeded(BloomForCausalLM, BloomConfig(**{**base, **overrides}))


def tiny_gpt_neox(**overrides: Any) -> nn.Module:
    """GPTNeoXForCausalLM: rotary on a quarter of each head (partial rotary), parallel residual."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=INTERMEDIATE, max_position_embeddings=POSITIONS, rotary_pct=0.25,
                hidden_dropout=0.0, attention_dropout=0.0)
    return _seeded(GPTNeoXForCausalLM, GPTNeoXConfig(**{**base, **overrides}))


def tiny_opt(**overrides: Any) -> nn.Module:
    """OPTForCausalLM: learned positions offset by 2, ReLU feed-forward, biased projections."""
    from transformers import OPTConfig, OPTForCausalLM

    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                ffn_dim=INTERMEDIATE, max_position_embeddings=POSITIONS, word_embed_proj_dim=HIDDEN, dropout=0.0,
                attention_dropout=0.0, pad_token_id=1)
    return _seeded(OPTForCausalLM, OPTConfig(**{**base, **overrides}))


def tiny_phi3(**overrides: Any) -> nn.Module:
    """Phi3ForCausalLM: fused qkv_proj and gate_up_proj."""
    from transformers import Phi3Config, Phi3ForCausalLM

    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                num_key_value_heads=HEADS, intermediate_size=INTERMEDIATE, max_position_embeddings=POSITIONS,
                pad_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attention_dropout=0.0)
    return _seeded(Phi3ForCausalLM, Phi3Config(**{**base, **overrides}))


def tiny_bert_classifier(**overrides: Any) -> nn.Module:
    """BertForSequenceClassification: an encoder with token types and a pooled classification head."""
    from transformers import BertConfig, BertForSequenceClassification

    base = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=INTERMEDIATE, max_position_embeddings=POSITIONS, num_labels=3,
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return _seeded(BertForSequenceClassification, BertConfig(**{**base, **overrides}))


def classifier_batch(batch: int = 4, seq: int = 16) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and one label per sequence (3 classes)."""
    gen = torch.Generator().manual_seed(0)
    return {"input_ids": torch.randint(0, VOCAB, (batch, seq), generator=gen),
            "attention_mask": torch.ones(batch, seq, dtype=torch.long),
            "labels": torch.randint(0, 3, (batch,), generator=gen)}


class TorchEncoderLM(nn.Module):
    """An LM on torch's own ``nn.TransformerEncoder`` (packed in-projection inside ``nn.MultiheadAttention``)."""

    def __init__(self, layers: int = LAYERS, dropout: float = 0.0) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(VOCAB, HIDDEN)
        layer = nn.TransformerEncoderLayer(HIDDEN, HEADS, INTERMEDIATE, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(HIDDEN, VOCAB)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.head(self.encoder(self.embed(input_ids)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
        return out


class _Scaled(nn.Module):
    """Owns a ``weight`` and calls ``F.linear`` inside a larger forward: not a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(HIDDEN, HIDDEN) / HIDDEN**0.5)
        self.gain = nn.Parameter(torch.ones(HIDDEN))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(nn.functional.linear(x, self.weight)) * self.gain + x


class CustomLinearish(nn.Module):
    """Two ``nn.Linear`` layers around a custom module that owns a ``.weight`` (left alone by memopt)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up = nn.Linear(HIDDEN, HIDDEN)
        self.custom = _Scaled()
        self.down = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.custom(self.up(x)))


def seq2seq_batch(model: nn.Module, batch: int = 2, source: int = 16, target: int = 12) -> dict[str, torch.Tensor]:
    """``input_ids``, ``attention_mask`` and ``labels`` for an encoder-decoder (its seq2seq loss)."""
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch, source), generator=gen)
    labels = torch.randint(3, vocab, (batch, target), generator=gen)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
