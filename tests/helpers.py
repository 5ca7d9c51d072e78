"""Small helpers shared by tests: synthetic dataset files and a loopback HTTP server."""
import contextlib
import functools
import gzip
import http.server
import pickle
import struct
import threading
from pathlib import Path

import numpy as np


def idx_bytes(array: np.ndarray) -> bytes:
    array = np.ascontiguousarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.tobytes()


def write_idx_gz(path: Path, array: np.ndarray) -> None:
    path.write_bytes(gzip.compress(idx_bytes(array), mtime=0))


def cifar_batch_bytes(images: np.ndarray, labels, protocol: int = 2) -> bytes:
    return pickle.dumps({b"batch_label": b"synthetic", b"labels": list(map(int, labels)),
                         b"data": np.ascontiguousarray(images.reshape(len(labels), -1), dtype=np.uint8),
                         b"filenames": [b"x.png"] * len(labels)}, protocol=protocol)


@contextlib.contextmanager
def serve_directory(folder: Path):
    """An HTTP server on 127.0.0.1 (an ephemeral port) serving ``folder``; yields its base URL."""
    handler = functools.partial(_QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass
