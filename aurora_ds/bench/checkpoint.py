"""A random-weight checkpoint of a registered transformers backbone, laid out as the hub's:
``config.json``, ``generation_config.json``, sharded safetensors behind
``model.safetensors.index.json``, the processor's ``preprocessor_config.json`` and, for the
BLIP-2 OPT shapes, OPT's GPT-2 BPE tokenizer files (trained here: nothing is downloaded).

What scaling runs load when the real weights cannot be fetched (tests, a cluster rehearsal). The
model is never materialised: its tensor names and shapes come from a build on the meta device,
and the values are drawn one shard file at a time, so writing a 3.7 B checkpoint holds one shard.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# OPT's special ids: <s> 0, <pad> 1, </s> 2 (also its bos), <unk> 3.
OPT_SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
WORDS = ("what is the color of a cat dog yes no how many people are there in picture on left right red blue green "
         "white black one two three question answer")


def _meta_model(spec, dtype):
    import transformers

    config = getattr(transformers, spec.extra["config_class"])(**spec.shape)
    with torch.device("meta"):
        model = getattr(transformers, spec.extra["model_class"])._from_config(config, dtype=dtype)
    return config, model


def _tensors(model) -> list[tuple[str, torch.Tensor]]:
    """Every tensor a checkpoint holds, once (a tied tensor under its first name), on meta."""
    state = model.state_dict(keep_vars=True)
    seen, out = set(), []
    for name, tensor in state.items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out.append((name, tensor))
    return out


def _values(name: str, like: torch.Tensor, norms: set[str], generator) -> torch.Tensor:
    """Normalisation scales 1 and every bias 0 (so that activations stay finite through 32+
    layers of a random model), everything else N(0, 0.02)."""
    if name in norms:
        return torch.ones(like.shape, dtype=like.dtype)
    if name.endswith("bias"):
        return torch.zeros(like.shape, dtype=like.dtype)
    return torch.randn(like.shape, generator=generator, dtype=torch.float32).mul_(0.02).to(like.dtype)


def write_opt_tokenizer(out: Path, vocab_size: int = 512, size: int = 50265) -> None:
    """OPT's tokenizer files (GPT-2 byte-level BPE: vocab.json, merges.txt, OPT's special ids and
    tokenizer_config), trained on a few words and filled up to OPT's ``size`` with added words, so
    that any id a random model generates decodes to text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=OPT_SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([WORDS, WORDS.title(), "Question: Answer:"], trainer)
    # OPT puts </s> (its bos) before every text
    tok.post_processor = processors.TemplateProcessing(single="</s> $A", pair="</s> $A </s> $B",
                                                       special_tokens=[("</s>", 2)])
    tok.model.save(str(out))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="</s>", eos_token="</s>", unk_token="</s>",
                                   pad_token="<pad>", model_max_length=2048)
    fast.add_tokens([f"w{i}" for i in range(len(fast), size)])
    fast.save_pretrained(str(out))
    config = json.loads((out / "tokenizer_config.json").read_text())
    config.update(tokenizer_class="GPT2Tokenizer", add_bos_token=True)
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def write_random_checkpoint(backbone: str, out, dtype: torch.dtype = torch.bfloat16,
                            max_shard_bytes: int = 2 * 2**30, seed: int = 0) -> Path:
    """Write ``backbone``'s shape with random values to ``out`` in the hub layout; returns it."""
    import transformers
    from safetensors.torch import save_file

    from ..backbones import get_spec

    spec = get_spec(backbone)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config, model = _meta_model(spec, dtype)
    norms = {f"{m}.{p}" if m else p for m, module in model.named_modules()
             if isinstance(module, torch.nn.LayerNorm) for p, _ in module.named_parameters(recurse=False)}
    shards, current, size = [], [], 0
    for name, tensor in _tensors(model):
        nbytes = tensor.numel() * tensor.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = [], 0
        current.append((name, tensor))
        size += nbytes
    shards.append(current)
    generator = torch.Generator().manual_seed(seed)
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        values = {name: _values(name, like, norms, generator) for name, like in shard}
        save_file(values, str(out / file), metadata={"format": "pt"})
        total += sum(v.numel() * v.element_size() for v in values.values())
        weight_map.update(dict.fromkeys(values, file))
        del values
    (out / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.architectures = [spec.extra["model_class"]]
    config.dtype = dtype
    config.save_pretrained(out)
    transformers.GenerationConfig.from_model_config(config).save_pretrained(out)
    transformers.BlipImageProcessor(size={"height": spec.image_size, "width": spec.image_size},
                                    image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD),
                                    resample=3).save_pretrained(out)
    if hasattr(config, "num_query_tokens"):
        (out / "processor_config.json").write_text(json.dumps(
            {"processor_class": "Blip2Processor", "num_query_tokens": config.num_query_tokens}, indent=2))
    text = getattr(config, "text_config", None)
    if getattr(text, "model_type", "") == "opt":
        write_opt_tokenizer(out, size=min(50265, text.vocab_size))
    return out
