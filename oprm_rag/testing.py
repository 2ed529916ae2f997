"""Tiny offline models for tests: random-init configs and a tokenizer made on the spot.

Nothing is downloaded. Each builder writes a real model folder (config, safetensors
weights, tokenizer files) that ``RecurrentLM.from_pretrained`` loads like any
checkpoint, so tests exercise the real loading path. The integrations' test suites
use these too.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

__all__ = ["FAMILIES", "EXACT_FAMILIES", "CACHE_FAMILIES", "FALLBACK_FAMILIES", "tiny_tokenizer", "tiny_model", "save_tiny_model"]

_TEXT = (
    "The code of alpha is 1234. The code of beta is 5678. What is the code of alpha? Error. "
    "Read the text and answer the question. If the text does not contain the answer, answer Error. "
    "Mamba models keep a fixed size state. Long documents overflow that state. "
    "OPRM splits the context into chunks and scores each chunk by the entropy of the first answer token. "
    "Question: Answer: Text: System: User: Assistant: Summarize the text above in a few sentences. "
    "0 1 2 3 4 5 6 7 8 9 the a of and to in is it that was for on are with as his they be at one have this"
)
_CHAT = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n{% endfor %}"
         "{% if add_generation_prompt %}Assistant:{% endif %}")


@lru_cache(maxsize=4)
def tiny_tokenizer(vocab_size: int = 320, chat: bool = True) -> Any:
    """A byte-level BPE tokenizer trained on a paragraph (any text round-trips)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([_TEXT] * 20, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|pad|>")
    if chat:
        fast.chat_template = _CHAT
    return fast


def _config(family: str, vocab: int, eos: int, pad: int) -> Any:
    import transformers as tf

    common = dict(vocab_size=vocab, eos_token_id=eos, bos_token_id=eos, pad_token_id=pad)
    if family == "mamba":
        return tf.MambaConfig(hidden_size=32, num_hidden_layers=2, state_size=8, **common)
    if family == "falcon_mamba":
        return tf.FalconMambaConfig(hidden_size=32, num_hidden_layers=2, state_size=8, **common)
    if family == "mamba2":
        return tf.Mamba2Config(hidden_size=32, num_hidden_layers=2, state_size=16, head_dim=8, num_heads=8,
                               n_groups=2, chunk_size=16, tie_word_embeddings=True, **common)
    if family == "rwkv":
        return tf.RwkvConfig(hidden_size=32, num_hidden_layers=2, attention_hidden_size=32,
                             intermediate_size=64, context_length=4096, **common)
    if family == "recurrent_gemma":
        return tf.RecurrentGemmaConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                                       num_key_value_heads=1, intermediate_size=64, lru_width=32,
                                       attention_window_size=16, conv1d_width=4, **common)
    cfg = _cache_family_config(tf, family, common)
    if cfg is not None:
        return cfg
    if family == "mistral_swa":  # sliding-window attention: runs on the token-replay fallback
        return tf.MistralConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                intermediate_size=64, sliding_window=16, max_position_embeddings=4096, **common)
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def _cache_family_config(tf: Any, family: str, common: dict[str, Any]) -> Any:
    """The families run on transformers' own cache objects (``backends/hf_cache.py``):
    each mixes its kinds of layers (recurrent first, then attention) in two or three layers."""
    mamba2 = dict(mamba_n_heads=4, mamba_d_head=16, mamba_n_groups=1, mamba_d_state=8, mamba_chunk_size=16)
    attn = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
                max_position_embeddings=4096)
    if family == "llama":  # a plain transformer: keys and values are its whole state
        return tf.LlamaConfig(num_hidden_layers=2, **attn, **common)
    if family == "granitemoehybrid":  # Granite-4.0-H: Mamba-2 + attention, MoE MLPs
        return tf.GraniteMoeHybridConfig(num_hidden_layers=2, layer_types=["mamba", "attention"], num_local_experts=2,
                                         num_experts_per_tok=1, shared_intermediate_size=32,
                                         position_embedding_type="rope", **mamba2, **attn, **common)
    if family == "nemotron_h":  # Nemotron-H: Mamba-2, attention and MLP-only layers
        return tf.NemotronHConfig(layers_block_type=["mamba", "attention", "mlp"], head_dim=16, ssm_state_size=8,
                                  mamba_num_heads=4, mamba_head_dim=16, n_groups=1, chunk_size=16, **attn, **common)
    if family == "bamba":
        return tf.BambaConfig(num_hidden_layers=2, attn_layer_indices=[1], **mamba2, **attn, **common)
    if family == "zamba2":  # Mamba-2 layers and a shared attention block
        return tf.Zamba2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                               mamba_d_state=8, mamba_headdim=8, n_mamba_heads=8, attention_head_dim=16,
                               intermediate_size=64, layers_block_type=["mamba", "hybrid"], use_mem_rope=False,
                               chunk_size=16, max_position_embeddings=4096, **common)
    if family == "falcon_h1":  # attention and Mamba-2 side by side in every layer
        return tf.FalconH1Config(num_hidden_layers=2, mamba_d_ssm=32, **{**mamba2, "mamba_d_head": 8}, **attn, **common)
    if family == "jamba":  # Mamba-1 + attention, MoE MLPs
        return tf.JambaConfig(num_hidden_layers=2, num_experts=2, num_experts_per_tok=1, expert_layer_period=2,
                              expert_layer_offset=1, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8,
                              **attn, **common)
    if family == "qwen3_next":  # gated DeltaNet (linear attention) + gated attention, MoE MLPs
        return tf.Qwen3NextConfig(num_hidden_layers=2, layer_types=["linear_attention", "full_attention"], head_dim=16,
                                  linear_key_head_dim=8, linear_value_head_dim=8, linear_num_key_heads=2,
                                  linear_num_value_heads=4, moe_intermediate_size=32,
                                  shared_expert_intermediate_size=32, num_experts=2, num_experts_per_tok=1,
                                  **attn, **common)
    if family == "lfm2":  # gated short convolutions + attention
        return tf.Lfm2Config(num_hidden_layers=2, layer_types=["conv", "full_attention"], block_multiple_of=16,
                             **attn, **common)
    if family == "xlstm":  # purely recurrent (mLSTM); its config rounds head sizes up to 64
        return tf.xLSTMConfig(hidden_size=64, num_hidden_layers=2, num_heads=2, qk_dim_factor=1.0, chunk_size=16,
                              ffn_round_up_to_multiple_of=16, **common)
    return None


#: Families with an exact-state backend of their own; families run from transformers' own
#: cache objects (exact states that include attention keys); families on the replay fallback.
EXACT_FAMILIES = ("mamba", "falcon_mamba", "mamba2", "rwkv", "recurrent_gemma")
CACHE_FAMILIES = ("granitemoehybrid", "nemotron_h", "bamba", "zamba2", "falcon_h1", "jamba", "qwen3_next", "lfm2",
                  "xlstm", "llama")
FALLBACK_FAMILIES = ("mistral_swa",)
FAMILIES = EXACT_FAMILIES + CACHE_FAMILIES + FALLBACK_FAMILIES


def tiny_model(family: str, seed: int = 0, sharpen: float = 8.0) -> tuple[Any, Any]:
    """A random-init model of ``family`` and the tiny tokenizer, in memory.

    ``sharpen`` scales the output embedding so logits have clear gaps: a random model's
    near-ties would otherwise let float noise flip a greedy token and blur what a test
    of exactness can show.
    """
    import torch
    from transformers import AutoModelForCausalLM

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = _config(family, len(tok), tok.eos_token_id, tok.pad_token_id)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(sharpen)
    return model.eval(), tok


def save_tiny_model(family: str, path: str | Path, seed: int = 0,
                    extra_files: dict[str, str] | None = None) -> Path:
    """Write a tiny ``family`` model folder (config, safetensors, tokenizer) to ``path``."""
    model, tok = tiny_model(family, seed)
    path = Path(path)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    for name, text in (extra_files or {}).items():
        (path / name).write_text(text)
    return path


def fixture_factory(tmp_root: Path) -> Callable[[str], Path]:
    """A memoising ``family -> folder`` builder for a test session's temp dir."""
    made: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in made:
            made[family] = save_tiny_model(family, tmp_root / family)
        return made[family]

    return build


def pdf_bytes(lines: list[str]) -> bytes:
    """A one-page PDF whose text layer holds ``lines`` (Helvetica), with a correct xref table.

    Built by hand so that PDF-reading tests need no PDF writer installed.
    """
    ops = ["BT", "/F1 12 Tf", "72 720 Td", "14 TL"] + [f"({line}) Tj T*" for line in lines] + ["ET"]
    content = "\n".join(ops).encode("latin-1")
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>",
               b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    return out
