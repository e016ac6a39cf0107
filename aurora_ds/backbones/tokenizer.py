"""Tokenizers: a checkpoint's own, or a WordPiece vocabulary trained here on the captions.

Random-init backbones (tests, demos, benchmarks) have no tokenizer to download, so one is
trained locally with the ``tokenizers`` package. Its special-token ids match the tiny configs'
(pad 0, [CLS] 2, [SEP] 3 = eos, [DEC] 5 = bos for the answer decoder, [ENC] 6).
"""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", "[ENC]"]


def train_tokenizer(texts, vocab_size: int = 1024, out_dir: str | Path | None = None):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(list(texts), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS))
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
        mask_token="[MASK]", bos_token="[DEC]", eos_token="[SEP]", model_max_length=512)
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast


def has_tokenizer(path) -> bool:
    """Whether ``path`` holds a tokenizer: a ``tokenizer.json``, or a WordPiece ``vocab.txt``
    (the Salesforce BLIP checkpoints ship a BertTokenizer)."""
    return bool(path) and any(Path(path, f).is_file() for f in ("tokenizer.json", "vocab.txt"))


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
