"""Reading, decode-checking, re-encoding and (optionally) resizing media; runs in the converter's
worker processes. Which formats go into a shard is the shard contract's (``shard_format``) call."""

import io

from PIL import Image

from aurora_ds.data.shard_format import (IMAGE_EXTS, PIL_FORMATS, REENCODE_AS, REENCODED_IMAGE_EXTS,
                                         VIDEO_EXTS, file_ext)


def decode_image(data):
    """Fully decode image bytes with PIL (load(), not verify(): truncated files must fail)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        return img.size


def decode_video(data):
    """Open video bytes with decord and decode the first, middle and last frame."""
    import decord

    reader = decord.VideoReader(io.BytesIO(data), ctx=decord.cpu(0), num_threads=1)
    n = len(reader)
    if n == 0:
        raise ValueError("video has no frames")
    reader.get_batch(sorted({0, n // 2, n - 1})).asnumpy()
    return n


def decode_media(ext, data):
    """Decode-check bytes by extension; raises on anything a loader would choke on."""
    if ext in IMAGE_EXTS or ext in REENCODED_IMAGE_EXTS:
        return decode_image(data)
    if ext in VIDEO_EXTS:
        return decode_video(data)
    raise ValueError(f"unsupported media extension {ext!r}: shards hold {'/'.join(IMAGE_EXTS + VIDEO_EXTS)} "
                     f"(and {'/'.join(REENCODED_IMAGE_EXTS)} images, re-encoded as {REENCODE_AS})")


def reencode_image(data):
    """Losslessly re-encode an image the loader does not read (BMP, GIF: the first frame) as
    REENCODE_AS, so it trains instead of being skipped; returns (ext, bytes)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        buf = io.BytesIO()
        img.save(buf, format=PIL_FORMATS[REENCODE_AS])
    return REENCODE_AS, buf.getvalue()


def _scaled(width, height, short_side):
    scale = short_side / min(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def resize_image(data, ext, short_side):
    """Re-encode in the same format with the shorter side at most short_side pixels."""
    img = Image.open(io.BytesIO(data))
    if min(img.size) <= short_side:
        return data
    img = img.resize(_scaled(*img.size, short_side), Image.BICUBIC)
    buf = io.BytesIO()
    fmt = PIL_FORMATS[ext]
    img.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def resize_video(data, short_side):
    """Re-encode as H.264 MP4 with the shorter side at most short_side (even) pixels, same frame rate."""
    import av

    src = av.open(io.BytesIO(data))
    vin = src.streams.video[0]
    width, height = vin.codec_context.width, vin.codec_context.height
    if min(width, height) <= short_side:
        src.close()
        return data
    width, height = (2 * (v // 2) for v in _scaled(width, height, short_side))
    buf = io.BytesIO()
    with src, av.open(buf, mode="w", format="mp4") as dst:
        vout = dst.add_stream("libx264", rate=vin.average_rate or 25)
        vout.width, vout.height, vout.pix_fmt = width, height, "yuv420p"
        vout.codec_context.options = {"threads": "1"}
        for frame in src.decode(vin):
            frame = av.VideoFrame.from_ndarray(frame.to_ndarray(width=width, height=height, format="rgb24"))
            for packet in vout.encode(frame):
                dst.mux(packet)
        for packet in vout.encode():
            dst.mux(packet)
    return buf.getvalue()


def load_media(task):
    """Worker entry: (index, path, resize) -> (index, ext, bytes, None) or (index, None, None, fault).

    ``ext`` is the extension stored in the shard: the file's own, or REENCODE_AS for an image in a
    format the loader does not read. A fault is (reason, message) with reason "missing_media" or
    "unreadable_media".
    """
    index, path, resize = task
    ext = file_ext(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return index, None, None, ("missing_media", "file not found")
    except OSError as exn:
        return index, None, None, ("unreadable_media", f"{type(exn).__name__}: {exn}")
    try:
        decode_media(ext, data)
        if ext in REENCODED_IMAGE_EXTS:
            ext, data = reencode_image(data)
        if resize:
            data = resize_video(data, resize) if ext in VIDEO_EXTS else resize_image(data, ext, resize)
            decode_media(ext, data)
    except Exception as exn:  # any decoder error means the sample is unusable; it is reported, not raised
        return index, None, None, ("unreadable_media", f"{type(exn).__name__}: {exn}")
    return index, ext, data, None
