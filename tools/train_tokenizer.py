"""Train the built-in tiny tokenizer (byte-level BPE, Qwen-style pre-tokenizer, ChatML template).

The corpus is text the project itself makes: invented-entity facts and questions from
``gen-data knowledge``, dialogs from ``gen-data dialog``, arithmetic word problems, and the
English paragraphs below. Re-running this script reproduces ``memcli/assets/tiny/`` exactly.

    python tools/train_tokenizer.py            # writes memcli/assets/tiny/tokenizer*.json
"""

from __future__ import annotations

import random
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from memcli.backbone import CHAT_TEMPLATE, SPECIAL_TOKENS, TINY_DIR
from memcli.data.dialog import generate_dialogs
from memcli.data.knowledge import build_knowledge, synthetic_facts
from memcli.data.convert import INSTRUCTION

QWEN_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

ENGLISH = """
Memory lets a language model look facts up instead of storing every one of them in its weights.
A knowledge base holds short sentences; each sentence is one entry of the memory bank. The model
asks a question, the router finds the entries that answer it, and the answer is read from memory.
When an entry is edited, the answer should change with it. This is what makes memory readable
and editable. A dialog memory carries what was said in earlier turns as a hidden state, so the
model can answer questions about the conversation without reading it again. Reasoning can also
happen partly in a latent space: each step mixes the embedding of the sampled token with a
thinking vector. The quick brown fox jumps over the lazy dog. Hello, how are you today? I am fine,
thank you. What is the answer? The answer is the letter of the correct option. Please think step
by step and write the final answer after four hash marks.
"""


def corpus(seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = [p.strip() for p in ENGLISH.split("\n") if p.strip()]
    for s in range(40):
        facts, pools = synthetic_facts(1024, seed=s)
        kb = build_knowledge(facts, pools, seed=s, heldout_fraction=0.2)
        lines += [item["target"][0]["sentence"] for item in kb["knowledge"]]
        for q in kb["omcq"]:
            t = q["target"][0]
            lines.append(f"{t['question']}\n{t['options']}\n{INSTRUCTION}\n{t['correct_answer']}")
    for row in generate_dialogs(3000, seed=seed, turns=6):
        lines += row["dialog_history"] + [row["memory_query"], row["memory_answer"]]
    for _ in range(3000):
        a, b = rng.randint(0, 99), rng.randint(0, 99)
        lines.append(f"What is {a} plus {b}? {a} + {b} = {a + b}. #### {a + b}")
    return lines


def train(out_dir: Path = TINY_DIR, vocab_size: int = 8192) -> None:
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 2048
    fast.save_pretrained(str(out_dir))
    print(f"tokenizer with {len(fast)} tokens written to {out_dir}")


if __name__ == "__main__":
    train()
