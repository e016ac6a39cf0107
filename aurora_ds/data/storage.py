"""Reading and writing shards on local disk, S3-compatible object storage, http(s) and pipes.

S3 settings come from the environment, as for the AWS tools:
AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL), AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION.
Every network read has a connect and a read timeout (AURORA_S3_CONNECT_TIMEOUT, default 3 s;
AURORA_S3_READ_TIMEOUT, default 10 s) and few retries (AURORA_S3_RETRIES, default 1 attempt per
call): a frozen endpoint must turn into an error, and the loader's shard-level retry is the one
place that decides how often to try again. Secrets are never logged.

Shards are read from S3 with one GET per object, streamed by a background thread up to
``READ_AHEAD`` bytes ahead of the reader: network time overlaps decoding, and a shard costs one
request (s3fs' buffered files add a HEAD per open and fetch block by block, each block waited
for). Listing, sizes and uploads go through s3fs.

Importing this module registers ``s3``, ``http`` and ``https`` openers in webdataset's
``gopen_schemes``, so plain ``wds.WebDataset("s3://...")`` streams too (forked workers inherit
the table).
"""

import os
import queue
import shlex
import threading
import time
from urllib.parse import urlparse

from webdataset.gopen import gopen_pipe, gopen_schemes

READ_CHUNK = 2**20
READ_AHEAD = 16 * READ_CHUNK  # per open shard: bounds a worker's buffered bytes
UPLOAD_CHUNK = 64 * 2**20
UPLOAD_ATTEMPTS = 3
CURL_FLAGS = "-s -f -L -g --connect-timeout 3 --speed-limit 1024 --speed-time 10"


def _env_float(name, default):
    return float(os.environ.get(name, default))


def s3_settings():
    """The S3 endpoint and credentials from the environment (secrets included: do not log)."""
    return dict(
        endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"),
        key=os.environ.get("AWS_ACCESS_KEY_ID"),
        secret=os.environ.get("AWS_SECRET_ACCESS_KEY"),
        anonymous=os.environ.get("AURORA_S3_ANONYMOUS", "0") == "1",
        region=os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        connect_timeout=_env_float("AURORA_S3_CONNECT_TIMEOUT", 3),
        read_timeout=_env_float("AURORA_S3_READ_TIMEOUT", 10),
        retries=int(os.environ.get("AURORA_S3_RETRIES", 1)),
    )


_filesystems = {}


def s3_filesystem():
    """An s3fs filesystem configured from the environment, one per process and settings.

    Kept here rather than in fsspec's instance cache: fsspec drops inherited instances in a
    forked worker, and their garbage collection then tries to close the parent's aiohttp session
    on the child's event loop ("attached to a different loop"). Holding them avoids that.
    """
    import s3fs

    s = s3_settings()
    key = (os.getpid(),) + tuple(sorted(s.items()))
    fs = _filesystems.get(key)
    if fs is None:
        fs = s3fs.S3FileSystem(
            # Without keys in the environment, botocore's own chain: the shared credentials file
            # (~/.aws/credentials, AWS_PROFILE), then an instance role. That is how ranks on other
            # nodes get credentials: launchers forward no secrets, and none goes on a command line.
            key=s["key"], secret=s["secret"], anon=s["anonymous"],
            endpoint_url=s["endpoint_url"], skip_instance_cache=True,
            client_kwargs={"region_name": s["region"]},
            config_kwargs={"connect_timeout": s["connect_timeout"], "read_timeout": s["read_timeout"],
                           "retries": {"total_max_attempts": 1}},
        )
        fs.retries = max(1, s["retries"])
        _filesystems[key] = fs
    return fs


_clients = {}  # (pid, settings) -> the client that process reads with


def _new_client(s):
    import botocore
    import botocore.config
    import botocore.session

    config = botocore.config.Config(
        connect_timeout=s["connect_timeout"], read_timeout=s["read_timeout"],
        retries={"total_max_attempts": max(1, s["retries"])},
        signature_version=botocore.UNSIGNED if s["anonymous"] else None)
    # Without keys in the environment botocore's own chain applies, as for s3_filesystem.
    return botocore.session.get_session().create_client(
        "s3", endpoint_url=s["endpoint_url"], region_name=s["region"], aws_access_key_id=s["key"],
        aws_secret_access_key=s["secret"], config=config)


def s3_client():
    """A botocore S3 client for streaming reads, configured like ``s3_filesystem``, one per
    process and settings: a forked process must not share its parent's connections."""
    s = s3_settings()
    key = (os.getpid(),) + tuple(sorted(s.items()))
    client = _clients.get(key)
    if client is None:  # (two reader threads may get here at once: one client wins, for both)
        client = _clients.setdefault(key, _new_client(s))
    return client


class S3Reader:
    """An S3 object as a binary stream: one GET, sent and its body read by a thread up to
    ``READ_AHEAD`` bytes ahead, so opening returns at once. Errors (timeouts included: the
    client's connect and read timeouts bound every wait of the thread) are raised by ``read`` as
    S3Errors naming the URL."""

    def __init__(self, url):
        self.url = url
        self._body = None
        self._chunks = queue.Queue(maxsize=max(1, READ_AHEAD // READ_CHUNK))
        self._stop = threading.Event()
        self._buffer = memoryview(b"")
        self._error = None
        self._eof = self._done = False
        self.closed = False
        threading.Thread(target=self._fetch, name="s3-read-ahead", daemon=True).start()

    def _fetch(self):
        bucket, _, key = _s3_path(self.url).partition("/")
        try:
            self._body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
            while not self._stop.is_set() and not self._eof:
                chunk = self._body.read(READ_CHUNK)
                self._eof = not chunk
                self._put(chunk)
            if not self._eof:  # closed by the reader before the end (perhaps before the body came)
                self._body.close()
        except Exception as exn:  # handed to the reader, which raises it
            self._put(exn)

    def _put(self, item):
        while not self._stop.is_set():
            try:
                self._chunks.put(item, timeout=0.5)
                return
            except queue.Full:
                pass

    def read(self, n=-1):
        if self.closed:
            raise ValueError("read from a closed S3Reader (%s)" % self.url)
        if self._error is not None:
            raise self._error
        parts = []
        while n != 0 and not self._done:
            if not self._buffer:
                try:
                    item = self._chunks.get(timeout=self._patience())
                except queue.Empty:
                    item = TimeoutError("no data from the S3 endpoint for %.0f s" % self._patience())
                if isinstance(item, Exception):
                    self._error = s3_error(self.url, item)
                    raise self._error from item
                if not item:
                    self._done = True
                    break
                self._buffer = memoryview(item)
            take = self._buffer if n < 0 else self._buffer[:n]
            parts.append(bytes(take))
            self._buffer = self._buffer[len(take):]
            n = n if n < 0 else n - len(take)
        return b"".join(parts)

    @staticmethod
    def _patience():
        """The longest a read waits for the thread: every attempt's connect and read timeouts,
        plus a margin; only a thread that died or a trickling server gets here."""
        s = s3_settings()
        return (s["connect_timeout"] + s["read_timeout"]) * max(1, s["retries"]) + 30

    @property
    def fetched(self):
        """Whether the whole object has been received (what is left to read is in memory)."""
        return self._eof

    def readable(self):
        return True

    def close(self):
        if not self.closed:
            self.closed = True
            self._stop.set()
            body = self._body
            if body is not None and not self._eof:  # (read to its end, its connection is back in the pool)
                body.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def is_s3(url):
    return url.startswith("s3://")


def _s3_path(url):
    return url[len("s3://"):]


def curl_command(url):
    """A shell command streaming ``url`` with curl, bounded by connect and low-speed timeouts."""
    return "curl %s %s" % (CURL_FLAGS, shlex.quote(url))


def open_url(url, mode="rb"):
    """Open a local path, ``file://``, ``s3://``, ``http(s)://`` or ``pipe:`` URL as a binary stream.

    ``pipe:`` commands written by users run as given; URLs we interpolate into a shell are quoted.
    """
    assert mode in ("rb", "wb"), mode
    if is_s3(url):
        try:
            if mode == "rb":
                return S3Reader(url)
            return s3_filesystem().open(_s3_path(url), "wb", block_size=UPLOAD_CHUNK)
        except Exception as exn:
            raise s3_error(url, exn) from exn
    scheme = urlparse(url).scheme
    if scheme in ("http", "https"):
        if mode != "rb":
            raise ValueError("cannot write to %s" % url)
        return gopen_pipe("pipe:" + curl_command(url), mode)
    if scheme == "pipe":
        return gopen_pipe(url, mode)
    if scheme == "file":
        url = urlparse(url).path
    if mode == "wb":
        os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
    return open(url, mode)


class S3Error(OSError):
    """An S3 request failed; the message names the URL, the bucket and the endpoint."""


class S3NotFound(S3Error, FileNotFoundError):
    """No such object (or bucket): still a FileNotFoundError for callers that expect one."""


class S3Forbidden(S3Error, PermissionError):
    pass


def s3_error(url, exn):
    """``exn`` as an S3Error saying which URL, bucket and endpoint, and what most likely is wrong."""
    if isinstance(exn, S3Error):
        return exn
    bucket = _s3_path(url).split("/", 1)[0]
    endpoint = s3_settings()["endpoint_url"] or "the default AWS endpoint"
    text = "%s: %s" % (type(exn).__name__, exn)
    response = getattr(exn, "response", None)
    status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") if isinstance(response, dict) else None
    if status:  # botocore's ClientError names the code (e.g. SignatureDoesNotMatch), not always the status
        text += " (HTTP %d)" % status
    low = text.lower()
    cls = S3Error
    unreachable = ("cannot reach the S3 endpoint %s (bucket %r): is it running, and is AWS_ENDPOINT_URL right?"
                   % (endpoint, bucket))
    if "could not connect" in low or "connecttimeout" in low or isinstance(exn, (ConnectionError, TimeoutError)):
        why = unreachable  # (s3fs reports some of these as a PermissionError)
    elif "nosuchbucket" in low or "bucket does not exist" in low:
        cls, why = S3NotFound, "bucket %r does not exist at %s" % (bucket, endpoint)
    elif isinstance(exn, PermissionError) or "forbidden" in low or "accessdenied" in low or "(http 403)" in low:
        cls, why = S3Forbidden, ("access to bucket %r at %s is forbidden: check AWS_ACCESS_KEY_ID / "
                                 "AWS_SECRET_ACCESS_KEY or the shared credentials file" % (bucket, endpoint))
    elif isinstance(exn, FileNotFoundError) or "nosuchkey" in low or "not found" in low:
        cls, why = S3NotFound, "no such object in bucket %r at %s" % (bucket, endpoint)
    elif "connect" in low or "connection" in low:
        why = unreachable
    else:
        why = "bucket %r at %s" % (bucket, endpoint)
    return cls("%s: %s (%s)" % (url, why, text))


def _gopen_s3(url, mode="rb", bufsize=8192, **kw):
    return open_url(url, mode)


def _gopen_http(url, mode="rb", bufsize=8192, **kw):
    return open_url(url, mode)


def put_file(local_path, url):
    """Copy a local file to a local path or ``s3://`` URL (multipart above UPLOAD_CHUNK bytes).

    Uploads are idempotent, so a failed one is tried again a bounded number of times.
    """
    if not is_s3(url):
        os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
        tmp = url + ".tmp"
        with open(local_path, "rb") as src, open(tmp, "wb") as dst:
            while True:
                chunk = src.read(UPLOAD_CHUNK)
                if not chunk:
                    break
                dst.write(chunk)
        os.replace(tmp, url)
        return
    for attempt in range(UPLOAD_ATTEMPTS):
        try:
            s3_filesystem().put_file(local_path, _s3_path(url), chunksize=UPLOAD_CHUNK)
            return
        except (OSError, TimeoutError) as exn:
            if attempt + 1 == UPLOAD_ATTEMPTS:
                raise OSError("upload of %s to %s failed after %d attempts: %s"
                              % (local_path, url, UPLOAD_ATTEMPTS, exn)) from exn
            time.sleep(2 ** attempt)


def exists(url):
    if is_s3(url):
        fs = s3_filesystem()
        fs.invalidate_cache()
        return fs.exists(_s3_path(url))
    return os.path.exists(url)


def size(url):
    """Size in bytes of a local file or S3 object (FileNotFoundError if missing)."""
    if is_s3(url):
        try:
            return s3_filesystem().info(_s3_path(url), refresh=True)["size"]
        except FileNotFoundError:
            raise
        except Exception as exn:
            raise s3_error(url, exn) from exn
    return os.path.getsize(url)


def list_urls(prefix):
    """Sorted URLs of the files directly under a local directory or ``s3://bucket/prefix``."""
    if is_s3(prefix):
        fs = s3_filesystem()
        fs.invalidate_cache()
        return sorted("s3://" + p for p in fs.ls(_s3_path(prefix).rstrip("/"), detail=False))
    return sorted(os.path.join(prefix, name) for name in os.listdir(prefix)
                  if os.path.isfile(os.path.join(prefix, name)))


def object_sizes(prefix):
    """{url: size in bytes} of the objects directly under ``s3://bucket/prefix``: one listing, so
    that thousands of shards are checked without a request each. A prefix with nothing under it
    gives {}; any other failure (an unreachable endpoint, after its timeouts) is an S3Error naming
    the prefix and the endpoint."""
    fs = s3_filesystem()
    fs.invalidate_cache()
    try:
        entries = fs.ls(_s3_path(prefix).rstrip("/"), detail=True)
    except FileNotFoundError:
        return {}
    except Exception as exn:
        raise s3_error(prefix, exn) from exn
    return {"s3://" + e["name"]: int(e.get("size") or 0) for e in entries if e.get("type") != "directory"}


def bucket_exists(url):
    """Whether the bucket of ``s3://bucket/...`` exists (a listing of nothing does not tell)."""
    fs = s3_filesystem()
    bucket = _s3_path(url).split("/", 1)[0]
    try:
        fs.ls(bucket)
        return True
    except FileNotFoundError:
        return False
    except Exception as exn:
        raise s3_error(url, exn) from exn


def read_bytes(url):
    with open_url(url, "rb") as f:
        return f.read()


def write_bytes(url, data):
    with open_url(url, "wb") as f:
        f.write(data)


def register_gopen():
    """Route webdataset's s3:// and http(s):// through the timed openers above."""
    gopen_schemes["s3"] = _gopen_s3
    gopen_schemes["http"] = _gopen_http
    gopen_schemes["https"] = _gopen_http


register_gopen()
