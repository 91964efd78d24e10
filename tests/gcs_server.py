"""A local Cloud Storage for the tests: gcp-storage-emulator, and a TLS proxy
through which TensorFlow's own GCS filesystem reaches it.

google-cloud-storage honours STORAGE_EMULATOR_HOST. TensorFlow's gs://
filesystem (tf.io.gfile, so etils.epath and TFDS) has no such setting: it
always calls https://www.googleapis.com (listing, metadata) and
https://storage.googleapis.com (object reads). But it sends them through
libcurl, which honours https_proxy; it verifies TLS against CURL_CA_BUNDLE;
and it takes GOOGLE_AUTH_TOKEN_FOR_TESTING as its access token. So TlsProxy
answers CONNECT, terminates TLS with a certificate for those hosts signed by a
throwaway trustme CA, and relays the decrypted requests to the emulator over
plain HTTP. Nothing leaves 127.0.0.1.

Reads only: TF uploads through a resumable session whose URL the emulator
gives as plain http://www.googleapis.com/..., which libcurl then tries to
reach directly and cannot resolve (the write fails with that error; nothing
is silently lost).
"""

import contextlib
import os
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time

import requests
import trustme

# The hosts TF's GCS filesystem calls (tsl/platform/cloud/gcs_file_system.cc).
GCS_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
BUCKET = "depth2d-test"  # the bucket the tests' emulator holds


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def emulator(bucket: str):
  """gcp-storage-emulator on 127.0.0.1 (in memory, `bucket` created); yields its
  http://host:port."""
  port = free_port()
  server = subprocess.Popen(
      [sys.executable, "-m", "gcp_storage_emulator", "start", "--host=127.0.0.1",
       f"--port={port}", "--in-memory", f"--default-bucket={bucket}"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  host = f"http://127.0.0.1:{port}"
  try:
    deadline = time.monotonic() + 30
    while True:
      try:
        requests.get(f"{host}/storage/v1/b/{bucket}", timeout=1)
        break
      except requests.ConnectionError:
        if time.monotonic() > deadline or server.poll() is not None:
          raise RuntimeError("gcp-storage-emulator did not start")
        time.sleep(0.1)
    yield host
  finally:
    server.terminate()
    server.wait(timeout=10)


def _relay(source: socket.socket, sink: socket.socket) -> None:
  try:
    while True:
      data = source.recv(65536)
      if not data:
        break
      sink.sendall(data)
  except OSError:
    pass
  finally:
    for s in (source, sink):
      with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)


class _TunnelHandler(socketserver.BaseRequestHandler):
  """One client connection: CONNECT host:443, then TLS, relayed to the emulator."""

  def handle(self):
    head = b""
    while b"\r\n\r\n" not in head:
      chunk = self.request.recv(4096)
      if not chunk:
        return
      head += chunk
    method, target = head.split(b" ", 2)[:2]
    host = target.decode().rsplit(":", 1)[0]
    if method != b"CONNECT" or host not in GCS_HOSTS:
      self.request.sendall(b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\n\r\n")
      return
    self.server.tunnels.append(host)
    self.request.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
    tls = self.server.tls.wrap_socket(self.request, server_side=True)
    with socket.create_connection(self.server.upstream) as upstream:
      back = threading.Thread(target=_relay, args=(upstream, tls), daemon=True)
      back.start()
      _relay(tls, upstream)
      back.join(timeout=10)


class TlsProxy(socketserver.ThreadingTCPServer):
  """An https_proxy for TF's GCS client that ends at the emulator `upstream`
  ("http://127.0.0.1:PORT"). `tunnels` lists the host of every CONNECT served,
  so a test can tell the bytes really went through TF's client."""
  daemon_threads = True
  allow_reuse_address = True

  def __init__(self, upstream: str, folder: str):
    super().__init__(("127.0.0.1", 0), _TunnelHandler)
    address = upstream.split("//", 1)[1]
    self.upstream = (address.rsplit(":", 1)[0], int(address.rsplit(":", 1)[1]))
    authority = trustme.CA()
    self.ca_path = os.path.join(folder, "gcs_test_ca.pem")
    authority.cert_pem.write_to_path(self.ca_path)
    self.tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert(*GCS_HOSTS).configure_cert(self.tls)
    self.tunnels = []
    threading.Thread(target=self.serve_forever, daemon=True).start()

  def tf_environment(self) -> dict:
    """What a process needs for its tf.io.gfile gs:// calls to reach the emulator.
    no_proxy keeps local connections direct: gRPC honours https_proxy too, and
    Beam's worker processes reach their runner over gRPC on 127.0.0.1."""
    proxy = "http://%s:%d" % self.server_address
    local = "127.0.0.1,localhost"
    return {"https_proxy": proxy, "HTTPS_PROXY": proxy, "no_proxy": local, "NO_PROXY": local,
            "CURL_CA_BUNDLE": self.ca_path, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator-token"}
