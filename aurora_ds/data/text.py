"""Caption and question cleaning as BLIP does it, and tokenisation of a batch of strings."""

import re

_CAPTION_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


def pre_caption(caption, max_words=50):
    """BLIP's caption cleaning: lowercase, punctuation to spaces, collapse spaces, truncate."""
    caption = _CAPTION_PUNCT.sub(" ", caption.lower())
    caption = _SPACES.sub(" ", caption).rstrip("\n").strip(" ")
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def pre_question(question, max_words=50):
    """BLIP's question cleaning: lowercase, punctuation removed, truncate."""
    question = _CAPTION_PUNCT.sub("", question.lower()).rstrip(" ")
    words = question.split(" ")
    if len(words) > max_words:
        question = " ".join(words[:max_words])
    return question


def tokenize(tokenizer, texts, max_tokens):
    """``input_ids`` and ``attention_mask`` (long tensors) for a list of strings.

    A Hugging Face tokenizer pads to ``max_tokens`` (fixed shapes: batches from different ranks
    are gathered together) and truncates; any other callable is called as ``tokenizer(texts)``
    and must return a dict of tensors with those keys.
    """
    if hasattr(tokenizer, "model_max_length"):
        out = tokenizer(texts, padding="max_length", truncation=True, max_length=max_tokens,
                        return_tensors="pt")
    else:
        out = tokenizer(texts)
    return {"input_ids": out["input_ids"].long(), "attention_mask": out["attention_mask"].long()}


class HashTokenizer:
    """A vocabulary-free stand-in tokenizer (one id per whitespace word, by crc32), padded to the
    longest: for benchmarks and tests that need token tensors but no real model. Picklable."""

    def __init__(self, vocab_size=30522, max_tokens=35):
        self.vocab_size = vocab_size
        self.max_tokens = max_tokens

    def __call__(self, texts):
        import zlib

        import torch

        ids = [[zlib.crc32(w.encode()) % (self.vocab_size - 1) + 1 for w in t.split()][: self.max_tokens] or [1]
               for t in texts]
        width = max(map(len, ids))
        return {"input_ids": torch.tensor([x + [0] * (width - len(x)) for x in ids]),
                "attention_mask": torch.tensor([[1] * len(x) + [0] * (width - len(x)) for x in ids])}
