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

Each request is handed to the emulator on its own connection (_forward),
which also makes up for what the emulator lacks: TF's uploads are de-chunked,
an empty media upload is sent as multipart, `storageLayout` is answered as
for a flat bucket. The resumable upload address the emulator gives is plain
http://www.googleapis.com/..., which libcurl sends through http_proxy: the
same proxy.
"""

import contextlib
import json
import os
import re
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import urllib.parse

import requests
import trustme

# The hosts TF's GCS filesystem calls (tsl/platform/cloud/gcs_file_system.cc).
GCS_HOSTS = ("www.googleapis.com", "storage.googleapis.com")
BUCKET = "depth2d-test"  # the bucket the tests' emulator holds


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def emulator(bucket: str):
  """gcp-storage-emulator on 127.0.0.1 (in memory, `bucket` created); yields its
  http://host:port."""
  port = _free_port()
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


def _read_head(connection: socket.socket, data: bytes = b"") -> tuple:
  """(head up to the blank line, the bytes read after it); head b"" at EOF."""
  while b"\r\n\r\n" not in data:
    chunk = connection.recv(65536)
    if not chunk:
      return b"", b""
    data += chunk
  head, rest = data.split(b"\r\n\r\n", 1)
  return head + b"\r\n\r\n", rest


def _read_body(connection: socket.socket, headers: dict, data: bytes) -> bytes:
  """The request body after the head: chunked, by Content-Length, or none."""
  def more():
    chunk = connection.recv(65536)
    if not chunk:
      raise ConnectionError("client closed mid-body")
    return chunk

  if headers.get("transfer-encoding", "").lower() == "chunked":
    body = b""
    while True:
      while b"\r\n" not in data:
        data += more()
      size_line, data = data.split(b"\r\n", 1)
      size = int(size_line.split(b";")[0], 16)
      while len(data) < size + 2:
        data += more()
      body, data = body + data[:size], data[size + 2:]
      if not size:
        return body
  length = int(headers.get("content-length", 0))
  while len(data) < length:
    data += more()
  return data[:length]


def _as_multipart(url: str, headers: dict) -> tuple:
  """A zero-byte media upload (TF's folder markers, "d/") as the equivalent
  multipart upload: the emulator fails on an empty media body (it takes the
  length of None) and answers nothing."""
  path, query = url.split("?", 1)
  params = urllib.parse.parse_qs(query)
  name = params.pop("name")[0]
  params["uploadType"] = ["multipart"]
  boundary = "gcs_server_boundary"
  content_type = headers.pop("content-type", "application/octet-stream")
  headers["content-type"] = f"multipart/related; boundary={boundary}"
  body = (f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
          f"{json.dumps({'name': name})}\r\n--{boundary}\r\nContent-Type: {content_type}"
          f"\r\n\r\n\r\n--{boundary}--\r\n")
  return f"{path}?{urllib.parse.urlencode(params, doseq=True)}", body.encode()


class _TunnelHandler(socketserver.BaseRequestHandler):
  """One client connection: CONNECT host:443 then TLS, or plain http:// requests
  (the upload session address the emulator hands out); either way each
  request is re-framed and sent to the emulator (_forward)."""

  def handle(self):
    head, rest = _read_head(self.request)
    if not head:
      return
    method, target = head.split(b" ", 2)[:2]
    # CONNECT host:443, or an absolute http://host/... address.
    target = target.decode()
    host = (target.rsplit(":", 1)[0] if method == b"CONNECT"
            else urllib.parse.urlsplit(target).hostname)
    if host not in GCS_HOSTS:
      self.request.sendall(b"HTTP/1.1 501 Not Implemented\r\nContent-Length: 0\r\n\r\n")
      return
    self.server.tunnels.append(host)
    client = self.request
    if method == b"CONNECT":
      client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
      client = self.server.tls.wrap_socket(client, server_side=True)
      head, rest = _read_head(client)
    # The requests of a kept-alive connection, one at a time; closed when the
    # emulator gave no answer (curl then fails at once instead of waiting).
    while head and self._forward(client, head, rest):
      head, rest = _read_head(client)

  def _forward(self, client: socket.socket, head: bytes, rest: bytes) -> bool:
    # TF's uploads send "Transfer-Encoding: chunked" beside a Content-Length,
    # and "Expect: 100-continue"; the emulator reads Content-Length bytes (it
    # would store the chunk framing) and answers no Expect. So answer the
    # Expect here, de-chunk, and send the emulator one plain request per
    # connection (path only, exact Content-Length, Connection: close).
    lines = head.decode("latin-1").split("\r\n")
    method, url, version = lines[0].split(" ")
    headers = {}
    for line in lines[1:]:
      if line:
        name, value = line.split(":", 1)
        headers[name.strip().lower()] = value.strip()
    if headers.get("expect", "").lower() == "100-continue":
      client.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    body = _read_body(client, headers, rest)
    if "//" in url:  # an absolute http:// address (through http_proxy)
      parts = urllib.parse.urlsplit(url)
      url = f"{parts.path}?{parts.query}" if parts.query else parts.path
    if not body and "uploadType=media" in url:
      url, body = _as_multipart(url, headers)
    layout = re.match(r"/storage/v1/b/([^/?]+)/storageLayout", url)
    if method == "GET" and layout:
      # TF asks before renaming a folder (hierarchical-namespace buckets
      # rename folders natively); the emulator has no such call (404, and the
      # rename fails). Answer as Cloud Storage does for a flat bucket: no
      # hierarchicalNamespace, so TF copies and deletes object by object.
      answer = json.dumps({"kind": "storage#storageLayout", "bucket": layout.group(1),
                           "location": "US", "locationType": "multi-region"}).encode()
      client.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(answer), answer))
      return True
    dropped = ("transfer-encoding", "expect", "proxy-connection", "content-length", "connection")
    out = [f"{method} {url} {version}"]
    out += [f"{name}: {value}" for name, value in headers.items() if name not in dropped]
    out += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    answered = False
    with socket.create_connection(self.server.upstream) as upstream:
      upstream.sendall("\r\n".join(out).encode("latin-1") + body)
      while True:  # the response, until the emulator closes
        data = upstream.recv(65536)
        if not data:
          break
        client.sendall(data)
        answered = True
    return answered


class TlsProxy(socketserver.ThreadingTCPServer):
  """An https_proxy for TF's GCS client that ends at the emulator `upstream`
  ("http://127.0.0.1:PORT"). `tunnels` lists the host of every CONNECT served,
  so a test can tell the bytes really went through TF's client."""
  daemon_threads = True
  allow_reuse_address = True

  def __init__(self, upstream: str, folder: str):
    super().__init__(("127.0.0.1", 0), _TunnelHandler)
    address = urllib.parse.urlsplit(upstream)
    self.upstream = (address.hostname, address.port)
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
    return {"https_proxy": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy,
            "HTTP_PROXY": proxy, "no_proxy": local, "NO_PROXY": local,
            "CURL_CA_BUNDLE": self.ca_path, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "emulator-token"}
