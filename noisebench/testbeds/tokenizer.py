"""A small byte-level BPE tokenizer built in code, with Qwen2's own pre-tokenizer, for the tiny testbed.

Why Qwen2's pre-tokenizer and byte-level BPE (shared notes, trl-grpo.md): for a folder whose config says
``model_type=qwen2``, transformers 5 ``AutoTokenizer`` (and so TRL and lm-eval when handed a path) builds a
``Qwen2Tokenizer`` that re-imposes Qwen2's byte-level pre-tokenization. A tokenizer that already is exactly that
loads identically through ``AutoTokenizer`` and ``PreTrainedTokenizerFast``; a character-level one silently does not.
Qwen2's split pattern also makes every digit its own token, which is what small models need for arithmetic.
"""
from __future__ import annotations

from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

#: Qwen2's pre-tokenizer split pattern (transformers ``Qwen2Tokenizer``).
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
                 r"""|\s*[\r\n]+|\s+(?!\S)|\s+""")
EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]
#: ChatML, as Qwen2.5 uses, so ``use_chat_template`` also works with this tokenizer (smoke tests of the real recipe).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>'"
    " + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(texts: Iterable[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on ``texts`` and wrap it for transformers.

    Args:
        texts (Iterable[str]): the corpus (questions, prompts, solutions) the tokenizer must cover.
        vocab_size (int): BPE vocabulary size including the 256 byte symbols and the special tokens.

    Returns:
        PreTrainedTokenizerFast: eos = pad = ``<|endoftext|>`` (as in Qwen2 base models), no BOS, left padding
        for generation, ChatML chat template.
    """
    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"testbed.tokenizer.vocab_size must be >= {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=EOS,
                                   additional_special_tokens=SPECIAL_TOKENS[1:], padding_side="left",
                                   clean_up_tokenization_spaces=False, model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    return fast
