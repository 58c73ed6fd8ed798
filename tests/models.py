"""Tiny models shared by the tests: HF models built from configs (random weights, no download).

Every factory returns a fresh model in training mode (as the constructor leaves it) with the same
small shape so tests stay fast: hidden 64, 2 layers, 4 attention heads, vocab 96, at most 64
positions. GQA families (Mistral, Qwen2, Phi-3) use 2 key/value heads. ``**overrides`` go into the
config, so ``tiny_llama(num_key_value_heads=2)`` gives a GQA Llama.

``lm_batch`` builds matching keyword inputs; ``labels`` is a separate tensor from ``input_ids``
(if it were the same object, ``torch.export`` would dedupe the two inputs into one).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

__all__ = [
    "HIDDEN",
    "LAYERS",
    "HEADS",
    "KV_HEADS",
    "VOCAB",
    "INTERMEDIATE",
    "tiny_llama",
    "tiny_mistral",
    "tiny_qwen2",
    "tiny_phi3",
    "tiny_gpt2",
    "tiny_gpt_neox",
    "tiny_opt",
    "tiny_bert",
    "tiny_bert_mlm",
    "tiny_bert_classifier",
    "tiny_mlp",
    "HandwrittenBlock",
    "MHABlock",
    "lm_batch",
]

HIDDEN = 64
LAYERS = 2
HEADS = 4
KV_HEADS = 2  # for the GQA families
VOCAB = 96  # differs from INTERMEDIATE and POSITIONS so that shape coincidences cannot hide bugs
INTERMEDIATE = 128
POSITIONS = 64

_DECODER = dict(
    hidden_size=HIDDEN,
    intermediate_size=INTERMEDIATE,
    num_hidden_layers=LAYERS,
    num_attention_heads=HEADS,
    vocab_size=VOCAB,
    max_position_embeddings=POSITIONS,
)


def _seeded(build: Any, config: Any) -> nn.Module:
    torch.manual_seed(0)  # the same weights every call, so numeric tests are reproducible
    return build(config)


def tiny_llama(**overrides: Any) -> nn.Module:
    """LlamaForCausalLM, MHA (4 heads, 4 kv heads) unless overridden."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**_DECODER, "num_key_value_heads": HEADS, **overrides})
    return _seeded(LlamaForCausalLM, cfg)


def tiny_mistral(**overrides: Any) -> nn.Module:
    """MistralForCausalLM with GQA (4 heads, 2 kv heads)."""
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(**{**_DECODER, "num_key_value_heads": KV_HEADS, "head_dim": HIDDEN // HEADS, **overrides})
    return _seeded(MistralForCausalLM, cfg)


def tiny_qwen2(**overrides: Any) -> nn.Module:
    """Qwen2ForCausalLM with GQA (4 heads, 2 kv heads) and biased q/k/v."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**{**_DECODER, "num_key_value_heads": KV_HEADS, **overrides})
    return _seeded(Qwen2ForCausalLM, cfg)


def tiny_phi3(**overrides: Any) -> nn.Module:
    """Phi3ForCausalLM: fused ``qkv_proj`` and fused ``gate_up_proj``, GQA (4 heads, 2 kv heads)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    tokens = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)  # defaults (32000) exceed VOCAB
    cfg = Phi3Config(**{**_DECODER, "num_key_value_heads": KV_HEADS, **tokens, **overrides})
    return _seeded(Phi3ForCausalLM, cfg)


def tiny_gpt2(**overrides: Any) -> nn.Module:
    """GPT2LMHeadModel: Conv1D layers (weight [in, out]), fused ``c_attn``, tied lm_head."""
    from transformers import GPT2Config, GPT2LMHeadModel

    base = dict(n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_inner=INTERMEDIATE, vocab_size=VOCAB,
                n_positions=POSITIONS, bos_token_id=0, eos_token_id=0)
    return _seeded(GPT2LMHeadModel, GPT2Config(**{**base, **overrides}))


def tiny_gpt_neox(**overrides: Any) -> nn.Module:
    """GPTNeoXForCausalLM: fused ``query_key_value`` laid out per head as [q | k | v]."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    base = dict(_DECODER, rotary_pct=0.25)
    return _seeded(GPTNeoXForCausalLM, GPTNeoXConfig(**{**base, **overrides}))


def tiny_opt(**overrides: Any) -> nn.Module:
    """OPTForCausalLM: separate q/k/v/out_proj with bias, fc1/fc2 ReLU MLP."""
    from transformers import OPTConfig, OPTForCausalLM

    base = dict(hidden_size=HIDDEN, ffn_dim=INTERMEDIATE, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                vocab_size=VOCAB, max_position_embeddings=POSITIONS, word_embed_proj_dim=HIDDEN)
    return _seeded(OPTForCausalLM, OPTConfig(**{**base, **overrides}))


def _bert_config(**overrides: Any) -> Any:
    from transformers import BertConfig

    base = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                intermediate_size=INTERMEDIATE, vocab_size=VOCAB, max_position_embeddings=POSITIONS)
    return BertConfig(**{**base, **overrides})


def tiny_bert(**overrides: Any) -> nn.Module:
    """BertModel (encoder + pooler, no head)."""
    from transformers import BertModel

    return _seeded(BertModel, _bert_config(**overrides))


def tiny_bert_mlm(**overrides: Any) -> nn.Module:
    """BertForMaskedLM (prediction head: transform dense + decoder tied to the word embeddings)."""
    from transformers import BertForMaskedLM

    return _seeded(BertForMaskedLM, _bert_config(**overrides))


def tiny_bert_classifier(num_labels: int = 3, **overrides: Any) -> nn.Module:
    """BertForSequenceClassification with ``num_labels`` classes."""
    from transformers import BertForSequenceClassification

    return _seeded(BertForSequenceClassification, _bert_config(num_labels=num_labels, **overrides))


def tiny_mlp(sizes: tuple[int, ...] = (32, 64, 64, 10)) -> nn.Sequential:
    """A plain nn.Sequential of Linear + ReLU layers (no HF)."""
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class HandwrittenBlock(nn.Module):
    """A pre-norm transformer block written by hand: GQA attention (eager softmax) + SwiGLU MLP.

    Input ``[B, T, dim]``. ``q``/``k``/``v``/``o`` and ``gate``/``up``/``down`` are nn.Linear.
    """

    def __init__(self, dim: int = 32, heads: int = 4, kv_heads: int = 2, hidden: int = 48) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o = nn.Linear(heads * self.head_dim, dim, bias=False)
        self.gate, self.up = nn.Linear(dim, hidden), nn.Linear(dim, hidden)
        self.down = nn.Linear(hidden, dim)

    def _split(self, x: torch.Tensor, heads: int) -> torch.Tensor:
        b, t, _ = x.shape
        return x.view(b, t, heads, self.head_dim).transpose(1, 2)  # [B, H, T, D]

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        q = self._split(self.q(x), self.heads)
        k = self._split(self.k(x), self.kv_heads).repeat_interleave(self.heads // self.kv_heads, dim=1)
        v = self._split(self.v(x), self.kv_heads).repeat_interleave(self.heads // self.kv_heads, dim=1)
        scores = torch.softmax(q @ k.transpose(-2, -1) / self.head_dim**0.5, dim=-1)  # [B, H, T, T]
        return self.o((scores @ v).transpose(1, 2).reshape(b, t, -1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attend(self.norm1(x))
        h = self.norm2(x)
        return x + self.down(nn.functional.silu(self.gate(h)) * self.up(h))


class MHABlock(nn.Module):
    """A post-norm block with ``nn.MultiheadAttention`` (packed in_proj) and a ReLU MLP."""

    def __init__(self, dim: int = 32, heads: int = 4, hidden: int = 64) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, x, x, need_weights=False)[0])
        return self.norm2(x + self.fc2(torch.relu(self.fc1(x))))


def lm_batch(model: nn.Module, batch: int = 2, seq: int = 16, labels: bool = True) -> dict[str, torch.Tensor]:
    """Keyword inputs for ``model``: ``input_ids`` (+ ``attention_mask``, + ``labels``).

    Labels are token ids for LM heads and class ids for sequence classifiers (``config.num_labels``).
    """
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    device = next(model.parameters()).device
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), generator=gen).to(device)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if labels:
        if type(model).__name__.endswith("ForSequenceClassification"):
            out["labels"] = torch.randint(0, cfg.num_labels, (batch,), generator=gen).to(device)
        else:
            out["labels"] = ids.clone()
    return out
