"""Tokenizers: a checkpoint's own, or a WordPiece vocabulary trained here on the captions.

Random-init backbones (tests, demos, benchmarks) have no tokenizer to download, so one is
trained locally with the ``tokenizers`` package. Its special-token ids match the tiny configs'
(pad 0, [CLS] 2, [SEP] 3 = eos, [DEC] 5 = bos for the answer decoder, [ENC] 6).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from pathlib import Path

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]
# What a transformers tokenizer is read from (a checkpoint directory holds the model beside them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model")


def wordpiece_vocab(texts, size: int, tok) -> dict[str, int]:
    """Specials, every character (alone and as a ``##`` continuation, so any word splits into
    known pieces), then whole words by frequency, ties in alphabetical order, up to ``size``.

    Built here rather than by the ``tokenizers`` trainer, which breaks ties in hash order: the
    same captions gave different vocabularies, hence different losses, from run to run.
    """
    counts = Counter()
    for text in texts:
        counts.update(word for word, _ in tok.pre_tokenizer.pre_tokenize_str(tok.normalizer.normalize_str(text)))
    chars = sorted({c for word in counts for c in word})
    words = sorted((w for w in counts if len(w) > 1), key=lambda w: (-counts[w], w))
    pieces = list(dict.fromkeys(SPECIAL_TOKENS + chars + [f"##{c}" for c in chars]))
    pieces += words[: max(0, size - len(pieces))]
    return {piece: i for i, piece in enumerate(pieces)}


def train_tokenizer(texts, vocab_size: int = 1024, out_dir: str | Path | None = None):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.model = models.WordPiece(wordpiece_vocab(texts, vocab_size, tok), unk_token="[UNK]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", bos_token="[DEC]", eos_token="[SEP]", model_max_length=512)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def has_tokenizer(path) -> bool:
    """Whether ``path`` holds a tokenizer: a ``tokenizer.json``, a WordPiece ``vocab.txt`` (the
    Salesforce BLIP checkpoints ship a BertTokenizer) or GPT-2's BPE files (OPT's tokenizer)."""
    if not path:
        return False
    return (any(Path(path, f).is_file() for f in ("tokenizer.json", "vocab.txt"))
            or all(Path(path, f).is_file() for f in ("vocab.json", "merges.txt")))


def tokenizer_files(path) -> list[Path]:
    """The tokenizer's own files in ``path`` (not the model weights beside them)."""
    return [Path(path, f) for f in TOKENIZER_FILES if Path(path, f).is_file()]


def tokenizer_identity(path) -> str:
    """SHA-256 over the names and contents of the tokenizer's files: equal for a copy, different
    for another vocabulary or other special tokens."""
    digest = hashlib.sha256()
    for file in tokenizer_files(path):
        digest.update(f"{file.name}\0".encode() + file.read_bytes() + b"\0")
    return digest.hexdigest()


def load_tokenizer(path: str | Path, key: str = "backbone.tokenizer"):
    """The tokenizer saved in ``path``; a ``vocab.txt`` alone (no tokenizer config) is read as
    BERT's lower-casing WordPiece tokenizer. Errors name ``key`` and the path."""
    from transformers import AutoTokenizer, BertTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{key}={path}: tokenizer directory does not exist")
    if not has_tokenizer(path):
        raise FileNotFoundError(f"{key}={path}: no tokenizer.json or vocab.txt there")
    if not any(Path(path, f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        return BertTokenizer(vocab=str(path / "vocab.txt"), do_lower_case=True)
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
