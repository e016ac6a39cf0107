"""Shared fixtures: a real SeaweedFS S3 server for the whole session, stable caches, one thread.

Every test, and every training/evaluation process a test starts, runs with
``AURORA_STRICT_DEVICES=1``: a tensor from another device reaching a collective, or a buffer the
engine could not place, is an error here rather than on a user's GPUs.
"""

import os
import sys

# DeepSpeed's JIT-built ops (shm comm, CPU Adam) per interpreter: two environments sharing one
# folder rebuild them in turn, and a build killed there leaves a lock every later build waits on.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(sys.prefix, "torch_extensions"))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ["AURORA_STRICT_DEVICES"] = "1"

import pytest  # noqa: E402


class S3Endpoint:
    """What a test needs to reach the session's S3 server."""

    def __init__(self, server, bucket):
        self.server = server
        self.endpoint_url = server.endpoint_url
        self.access_key = server.access_key
        self.secret_key = server.secret_key
        self.bucket = bucket

    def env(self):
        return self.server.env()


@pytest.fixture(scope="session")
def s3_server():
    """A SeaweedFS S3 endpoint with bucket ``aurora-test``; the AWS_* variables point at it
    (restored afterwards)."""
    from aurora_ds.data.seaweed import SeaweedServer

    with SeaweedServer() as server, server.environment():
        yield S3Endpoint(server, server.create_bucket("aurora-test"))


class ShardFactory:
    """Small COCO-, MSRVTT- and VQA-like sets with real JPEG/MP4 bytes, written as tar shards in the
    shard contract (``aurora_ds.data.shard_format``: ``{key}.jpg|mp4`` + ``{key}.json``, sizes.json,
    manifest.json).

    Samples are dicts ``{"__key__", "jpg"|"mp4": bytes, "json": dict}`` (tests damage them before
    ``write``; a ``json`` given as bytes is written as it is)."""

    def __init__(self, seed=0):
        import random

        self.rng = random.Random(seed)

    def jpeg(self, w=48, h=40):
        import io

        import numpy as np
        from PIL import Image

        pixels = np.array([[[self.rng.randrange(256)] * 3]], dtype=np.uint8) + np.random.default_rng(
            self.rng.randrange(2**31)).integers(0, 40, (h, w, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=80)
        return buf.getvalue()

    def mp4(self, frames=12, w=32, h=32):
        import io

        import av
        import numpy as np

        buf = io.BytesIO()
        base = self.rng.randrange(200)
        with av.open(buf, "w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=8)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            for i in range(frames):
                frame = av.VideoFrame.from_ndarray(np.full((h, w, 3), base + i * 4, np.uint8), format="rgb24")
                for packet in stream.encode(frame):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return buf.getvalue()

    @staticmethod
    def sample(key, ext, data, file, dataset, **text):
        from aurora_ds.data import shard_format

        return {shard_format.KEY: key, ext: data,
                shard_format.JSON: shard_format.sample_meta(key, file, dataset, "train", **text)}

    def coco(self, n, prefix="coco"):
        return [self.sample("%s_%06d" % (prefix, i), "jpg", self.jpeg(), "img%d.jpg" % i, "coco",
                            captions=["A photo number %d, caption %d!" % (i, c) for c in range(2 + i % 3)])
                for i in range(n)]

    def msrvtt(self, n, prefix="video"):
        return [self.sample("%s%d" % (prefix, i), "mp4", self.mp4(), "video%d.mp4" % i, "msrvtt",
                            captions=["Video %d: a person is doing thing %d." % (i, c) for c in range(2)])
                for i in range(n)]

    def vqa(self, n, prefix="vqa"):
        from aurora_ds.data.shard_format import question

        return [self.sample("%s_%06d" % (prefix, i), "jpg", self.jpeg(), "q%d.jpg" % i, "vqa",
                            questions=[question(i * 10 + q, "What is in picture %d, part %d?" % (i, q),
                                                ["cat"] * 3 + ["dog"]) for q in range(1 + i % 2)])
                for i in range(n)]

    @staticmethod
    def write(samples, out_dir, name, per_shard, kind="image", manifest=True, texts=True):
        """Shards ``{name}-{i:06d}.tar`` in ``out_dir`` (local dir or s3://bucket/prefix); returns the spec.

        As ``aurora-shard convert`` writes them: the manifest counts each shard's captions or
        questions (``texts=False``: a manifest from before it did) and QA kinds get answers.json."""
        import hashlib
        import tempfile
        from collections import Counter

        import webdataset as wds

        from aurora_ds.data import shard_format, storage

        chunks = [samples[i:i + per_shard] for i in range(0, len(samples), per_shard)]
        entries = {}
        with tempfile.TemporaryDirectory() as tmp:
            for i, chunk in enumerate(chunks):
                shard = "%s-%06d.tar" % (name, i)
                local = os.path.join(tmp, shard)
                with wds.TarWriter(local, encoder=False) as writer:
                    for s in chunk:
                        writer.write({k: (shard_format.encode_meta(v) if isinstance(v, dict) else v)
                                      for k, v in s.items()})
                with open(local, "rb") as f:
                    data = f.read()
                storage.put_file(local, shard_format.join(out_dir, shard))
                entries[shard] = {"count": len(chunk), "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
                if texts:
                    for meta in _metas(chunk):
                        for field, n in shard_format.text_counts(meta).items():
                            entries[shard][field] = entries[shard].get(field, 0) + n
            if manifest:
                shard_format.write_manifest(out_dir, {"kind": kind, "num_samples": len(samples), "shards": entries})
                if kind.endswith("_qa"):
                    answers = Counter()
                    for meta in _metas(samples):
                        answers.update(shard_format.answer_counts(meta))
                    shard_format.write_answers(out_dir, answers)
        return "%s/%s-{%06d..%06d}.tar" % (out_dir.rstrip("/"), name, 0, len(chunks) - 1)

    @staticmethod
    def write_img2dataset(samples, folder, per_shard):
        """Shards as img2dataset (images) or video2dataset (videos) write them: ``{key}.jpg|mp4`` +
        ``{key}.txt`` (the sample's first caption) + ``{key}.json``, ``{shard}_stats.json``,
        sizes.json; returns the spec."""
        import json

        import webdataset as wds

        os.makedirs(folder, exist_ok=True)
        sizes = {}
        for n, i in enumerate(range(0, len(samples), per_shard)):
            name = "%05d.tar" % n
            with wds.TarWriter(os.path.join(folder, name), encoder=False) as writer:
                for j, s in enumerate(samples[i:i + per_shard]):
                    key = "%05d%04d" % (n, j)
                    ext = "mp4" if "mp4" in s else "jpg"
                    caption = s["json"]["captions"][0]
                    writer.write({"__key__": key, ext: s[ext], "txt": caption.encode(),
                                  "json": json.dumps({"key": key, "caption": caption, "status": "success",
                                                      "url": "http://example/%s.%s" % (key, ext)}).encode()})
            with open(os.path.join(folder, "%05d_stats.json" % n), "w") as f:
                json.dump({"count": per_shard, "successes": len(samples[i:i + per_shard])}, f)
            sizes[name] = len(samples[i:i + per_shard])
        with open(os.path.join(folder, "sizes.json"), "w") as f:
            json.dump(sizes, f)
        return "%s/{00000..%05d}.tar" % (folder, len(sizes) - 1)


def _metas(samples):
    """The json dicts of samples (tests damage some: those are not counted)."""
    return [s["json"] for s in samples if isinstance(s.get("json"), dict)]


@pytest.fixture(scope="session")
def shard_factory():
    return ShardFactory()


@pytest.fixture(scope="session")
def word_tokenizer():
    from aurora_ds.data.text import HashTokenizer

    return HashTokenizer()


# ---- a Salesforce-layout BLIP checkpoint, built offline ------------------------------------------

BERT_SPECIALS = {0: "[PAD]", 100: "[UNK]", 101: "[CLS]", 102: "[SEP]", 103: "[MASK]"}
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _bert_vocab() -> list[str]:
    """A WordPiece ``vocab.txt`` of BERT's 30522 lines: BERT's special ids, the pieces and words
    the sample datasets use, [unused] fillers."""
    import string

    words = ["a", "an", "the", "photo", "number", "caption", "video", "person", "is", "doing", "thing", "what",
             "in", "picture", "part", "cat", "dog", "yes", "no", "how", "many", "color", "of", "on", "there"]
    pieces = list(string.ascii_lowercase) + list(string.digits) + list("!?,.:;'\"-()")
    pieces += ["##" + c for c in string.ascii_lowercase + string.digits]
    vocab = [BERT_SPECIALS.get(i, f"[unused{i - 1}]") for i in range(104)]
    vocab += [w for w in dict.fromkeys(pieces + words) if w not in vocab]
    vocab += [f"[unused{i}]" for i in range(len(vocab), 30522)]
    assert len(vocab) == 30522
    return vocab


def salesforce_checkpoint(out, kind="retrieval", image_size=32, mean=CLIP_MEAN, std=CLIP_STD, seed=0):
    """A directory laid out as ``Salesforce/blip-itm-base-coco`` / ``blip-vqa-base`` on the hub,
    with a tiny random model: BLIP's text ``vocab_size`` 30524 and ``bos_token_id`` 30522 ([DEC]),
    a BERT WordPiece ``vocab.txt`` of 30522 lines with BERT's special ids, a hub-style
    ``tokenizer_config.json`` with no bos and no [DEC]/[ENC], and a ``preprocessor_config.json``
    written by ``BlipImageProcessor``. Returns the path."""
    import json
    from pathlib import Path

    import torch
    import transformers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(_bert_vocab()) + "\n")
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512, "cls_token": "[CLS]",
        "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]"}))
    (out / "special_tokens_map.json").write_text(json.dumps({
        "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]", "unk_token": "[UNK]", "mask_token": "[MASK]"}))
    config = transformers.BlipConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                     "max_position_embeddings": 64, "vocab_size": 30524, "bos_token_id": 30522, "pad_token_id": 0,
                     "sep_token_id": 102, "eos_token_id": 2},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": image_size, "patch_size": 8, "initializer_range": 0.02},
        image_text_hidden_size=16)
    torch.manual_seed(seed)
    cls = transformers.BlipForImageTextRetrieval if kind == "retrieval" else transformers.BlipForQuestionAnswering
    cls(config).save_pretrained(out)
    transformers.BlipImageProcessor(size={"height": image_size, "width": image_size}, image_mean=list(mean),
                                    image_std=list(std), resample=3).save_pretrained(out)
    return out


def salesforce_blip2_checkpoint(out, image_size=32, seed=0):
    """A directory laid out as ``Salesforce/blip2-itm-vit-g`` on the hub, with a tiny random
    ``Blip2ForImageTextRetrieval``: BERT's WordPiece ``vocab.txt`` with bos [DEC] added as id 30522
    (LAVIS's Q-Former tokenizer, as transformers' conversion script saves it), Q-Former
    ``vocab_size`` 30523 with text input on, a ``preprocessor_config.json`` (CLIP mean/std,
    bicubic), and weights sharded behind ``model.safetensors.index.json`` as large checkpoints
    are. Returns the path."""
    import json
    from pathlib import Path

    import torch
    import transformers

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_text("\n".join(_bert_vocab()) + "\n")
    specials = {"bos_token": "[DEC]", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                "unk_token": "[UNK]", "mask_token": "[MASK]"}
    (out / "added_tokens.json").write_text(json.dumps({"[DEC]": 30522}))
    (out / "special_tokens_map.json").write_text(json.dumps(specials))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "BertTokenizer", "do_lower_case": True, "model_max_length": 512,
        "truncation_side": "right", "processor_class": "Blip2Processor", **specials}))
    transformers.BlipImageProcessor(size={"height": image_size, "width": image_size}, image_mean=list(CLIP_MEAN),
                                    image_std=list(CLIP_STD), resample=3).save_pretrained(out)
    config = transformers.Blip2Config(
        vision_config={"hidden_size": 48, "intermediate_size": 208, "num_hidden_layers": 2, "num_attention_heads": 2,
                       "image_size": image_size, "patch_size": 8, "initializer_range": 0.02},
        qformer_config={"hidden_size": 32, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2,
                        "vocab_size": 30523, "max_position_embeddings": 64, "encoder_hidden_size": 48,
                        "cross_attention_frequency": 1, "use_qformer_text_input": True},
        num_query_tokens=4, image_text_hidden_size=16)
    torch.manual_seed(seed)
    model = transformers.Blip2ForImageTextRetrieval(config)
    torch.nn.init.normal_(model.query_tokens, std=0.02)  # trained queries differ from each other
    model.save_pretrained(out, max_shard_size="3MB")
    return out


@pytest.fixture(scope="session")
def salesforce_checkpoints(tmp_path_factory):
    """Salesforce-layout checkpoints: ``retrieval`` and ``vqa`` (BLIP), ``blip2`` (BLIP-2 retrieval)."""
    base = tmp_path_factory.mktemp("salesforce")
    made = {kind: salesforce_checkpoint(base / kind, kind) for kind in ("retrieval", "vqa")}
    return {**made, "blip2": salesforce_blip2_checkpoint(base / "blip2")}


@pytest.fixture(scope="session")
def make_salesforce_checkpoint():
    """``salesforce_checkpoint`` itself, for tests that need their own variant."""
    return salesforce_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    """A random-init tiny BLIP retrieval backbone saved once (``save_pretrained`` layout)."""
    import torch

    from aurora_ds import build_backbone

    path = tmp_path_factory.mktemp("backbone") / "blip-tiny"
    torch.manual_seed(0)
    build_backbone("blip-tiny-retrieval").save_pretrained(path)
    return path


def _rank_main(rank, size, port, errors, body):
    """One spawned rank: gloo on 127.0.0.1, then ``body(rank, size)``; what it raises goes to the parent."""
    import torch

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(size),
                      LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=size)
    try:
        body(rank, size)
    except BaseException as e:  # reported to the parent, which fails the test
        errors.put(f"rank {rank}: {type(e).__name__}: {e}")
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="session")
def on_two_ranks():
    """``on_two_ranks(body)``: ``body(rank, size)``, a module-level function, in two spawned
    processes joined by gloo; the test fails with whatever a rank raised."""
    import torch.multiprocessing as mp

    from aurora_ds.dist import free_port

    def run(body):
        errors = mp.get_context("spawn").SimpleQueue()
        mp.start_processes(_rank_main, args=(2, free_port(), errors, body), nprocs=2, join=True, start_method="spawn")
        found = []
        while not errors.empty():
            found.append(errors.get())
        assert not found, found

    return run
