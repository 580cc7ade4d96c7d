"""The ``llama`` student family: a transformers ``LlamaForCausalLM`` sized from width and depth.

``student.width`` is the hidden size and ``student.depth`` the number of decoder layers;
everything else follows from them by fixed rules, SmolLM2-135M's layout scaled down
(576 wide, 30 layers: 9 heads of 64, MLP 1536, tied embeddings, RoPE θ = 100,000,
RMSNorm ε = 1e-5):

- heads: ``max(1, width // 64)``, each ``width // heads`` wide. A width must therefore
  be a multiple of 64, or an even number below 64 (one head that wide; RoPE rotates
  pairs of dimensions).
- KV heads = heads (no grouped-query attention). GQA shrinks the KV cache of long
  generations, which distillation never builds; at student sizes K and V are a small
  share of the weights (the embedding dominates), and full heads are the one layout
  every width allows (SmolLM2's 3:1 grouping needs a head count divisible by 3).
- MLP (SwiGLU) size: 8/3 · width rounded up to a multiple of 64, as Llama rounds its
  own (576 → 1536, exactly SmolLM2's).
- Tied input and output embeddings (as SmolLM2): at small widths the vocabulary is
  most of the parameters.
- Vocabulary, pad/bos/eos ids: the tokenizer's (the teacher's, so logits line up:
  ``still.lm_models.check_vocab``). ``max_positions`` (``max_position_embeddings``)
  must be at least ``data.seq_len`` (``still.lm_models.check_seq_len``); RoPE has no
  learned positions, so it costs no parameters.

Parameter count: ``V·w + L·(4·w² + 3·w·I + 2·w) + w`` for vocabulary V, width w, depth L
and MLP size I (``still.models.count_parameters`` counts the tied matrix once).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from still.errors import StillError

HEAD_DIM = 64
"""Width of an attention head for widths of 64 and more."""
ROPE_THETA = 100_000.0
RMS_NORM_EPS = 1e-5
DEFAULT_MAX_POSITIONS = 2048
SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id")


@dataclasses.dataclass(frozen=True)
class LlamaSizes:
    """The sizes a width implies (see the module docstring for the rules).

    Attributes:
        hidden: The hidden size (the width).
        heads: Attention heads.
        kv_heads: Key/value heads (equal to ``heads``).
        head_dim: Width of one head.
        intermediate: Size of the SwiGLU MLP's hidden layer.
    """

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int


def llama_sizes(width: float) -> LlamaSizes:
    """The layer sizes of a ``llama`` student of this width.

    Args:
        width: ``student.width``: the hidden size (a whole number).

    Raises:
        StillError: The width is not a multiple of 64 nor an even number below 64.
    """
    hidden = int(width) if float(width).is_integer() else -1
    if hidden < 2 or (hidden < HEAD_DIM and hidden % 2) or (hidden >= HEAD_DIM and hidden % HEAD_DIM):
        step = 2 if width < HEAD_DIM else HEAD_DIM
        nearest = sorted({max(2, step * math.floor(width / step)), max(2, step * math.ceil(width / step))})
        raise StillError(f"student.width={width} does not fit the llama family: the hidden size must be a "
                         f"multiple of {HEAD_DIM} (heads of {HEAD_DIM}), or an even number below {HEAD_DIM}; "
                         f"nearest: {' or '.join(map(str, nearest))}")
    heads = max(1, hidden // HEAD_DIM)
    intermediate = HEAD_DIM * math.ceil(8 * hidden / (3 * HEAD_DIM))
    return LlamaSizes(hidden, heads, heads, hidden // heads, intermediate)


def llama_config(width: float, depth: int, vocab_size: int, max_positions: int = DEFAULT_MAX_POSITIONS,
                 special_ids: Mapping[str, int | None] | None = None) -> Any:
    """The ``LlamaConfig`` of a ``llama`` student.

    Args:
        width: Hidden size (``student.width``).
        depth: Decoder layers (``student.depth``), at least 1.
        vocab_size: The tokenizer's (and teacher's) vocabulary size.
        max_positions: ``max_position_embeddings``: at least ``data.seq_len``.
        special_ids: ``pad_token_id``, ``bos_token_id``, ``eos_token_id`` of the tokenizer
            (``still.lm_models.special_token_ids``); absent ones are None.

    Raises:
        StillError: A size out of range, or a special id that is not a key above.
    """
    from transformers import LlamaConfig

    sizes = llama_sizes(width)
    for name, value in (("student.depth", depth), ("vocabulary size", vocab_size), ("max positions", max_positions)):
        if int(value) != value or value < 1:
            raise StillError(f"{name} of a llama student must be a positive whole number, got {value}")
    unknown = set(special_ids or {}) - set(SPECIAL_IDS)
    if unknown:
        raise StillError(f"unknown special token ids {sorted(unknown)}; expected some of {', '.join(SPECIAL_IDS)}")
    ids = {name: (special_ids or {}).get(name) for name in SPECIAL_IDS}
    return LlamaConfig(
        vocab_size=int(vocab_size), hidden_size=sizes.hidden, intermediate_size=sizes.intermediate,
        num_hidden_layers=int(depth), num_attention_heads=sizes.heads, num_key_value_heads=sizes.kv_heads,
        head_dim=sizes.head_dim, max_position_embeddings=int(max_positions), rms_norm_eps=RMS_NORM_EPS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA}, tie_word_embeddings=True,
        **ids,
    )


def build_llama_student(width: float, depth: int, vocab_size: int, max_positions: int = DEFAULT_MAX_POSITIONS,
                        special_ids: Mapping[str, int | None] | None = None) -> Any:
    """Builds a freshly initialised ``LlamaForCausalLM`` student (the ``llama`` family).

    The arguments are :func:`llama_config`'s; they are also the family's ``model_args``
    in a still checkpoint. Initialisation follows transformers (normal, std 0.02), seeded
    by the caller's ``torch.manual_seed``.

    Returns:
        The model, in training mode, float32, on the CPU.
    """
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(llama_config(width, depth, vocab_size, max_positions, special_ids))
