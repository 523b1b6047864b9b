"""What the serving tests share: a tiny model taught fixed replies, a local server in a
thread, and the images and request bodies they send. Every request is local and bounded by a
timeout."""

from __future__ import annotations

import base64
import contextlib
import io
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from vlm.prompts import REPORT_PROMPT, VQA_PROMPT
from vlm.studies import MODALITY_QUESTION, REGION_QUESTION

ANSWER = "The lungs are clear."
REPORT = "Findings: No pleural effusion.\nImpression: No acute disease."
# What the taught model says an image is, when report drafting asks (vlm/studies.py).
STUDY_ANSWERS = {MODALITY_QUESTION: "X-ray.", REGION_QUESTION: "The chest."}
TIMEOUT = 60


def build_taught_checkpoint(tiny_config, folder: Path) -> Path:
    """A tiny model taught fixed replies (the untrained one only babbles whitespace), saved
    as a checkpoint with its own LLM folder. Built once per session: later calls reuse it."""
    from vlm.model import MedVLM

    checkpoint = folder / "checkpoint"
    if (checkpoint / "config.json").is_file():
        return checkpoint
    torch.manual_seed(0)
    model = MedVLM.build(tiny_config)
    rng = np.random.default_rng(0)
    conversations = [
        [{"role": "user", "content": "<image>\nWhat is this?"}, {"role": "assistant", "content": ANSWER}],
        [{"role": "user", "content": "<image>\nIs the heart enlarged?"}, {"role": "assistant", "content": ANSWER},
         {"role": "user", "content": "And the pleura?"}, {"role": "assistant", "content": ANSWER}],
        [{"role": "user", "content": REPORT_PROMPT}, {"role": "assistant", "content": REPORT}],
        *([{"role": "user", "content": VQA_PROMPT.format(question=q)}, {"role": "assistant", "content": a}]
          for q, a in STUDY_ANSWERS.items()),
    ]
    encoded = [model.processor.encode(c) for c in conversations]
    model.llm.requires_grad_(True)
    optimizer = torch.optim.Adam(model.llm.parameters(), lr=3e-3)
    model.train()
    for _ in range(60):
        for e in encoded:
            image = Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8))
            model(torch.tensor([e.input_ids]), pixel_values=model.preprocess([image]),
                  labels=torch.tensor([e.labels])).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    llm_dir = folder / "llm"
    model.llm.save_pretrained(llm_dir)
    model.tokenizer.save_pretrained(llm_dir)
    model.config = model.config.replace(language={"source": str(llm_dir)})
    return model.save_pretrained(checkpoint)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_server(app):
    """A uvicorn server for `app` on 127.0.0.1 and a free port (its address in `.url`)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    server.url = f"http://127.0.0.1:{port}"
    return server


@contextlib.contextmanager
def running(server):
    """Run a uvicorn server in a daemon thread for the duration of the block."""
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started or not thread.is_alive(), TIMEOUT)
        assert server.started, "the server did not start"
        yield server
    finally:
        server.should_exit = True
        thread.join(TIMEOUT)


@contextlib.contextmanager
def serving(engine, make_app):
    """`make_app(engine)` served on 127.0.0.1 for the block (the engine as `.engine`); the engine
    is closed afterwards."""
    try:
        with running(local_server(make_app(engine))) as server:
            server.engine = engine
            yield server
    finally:
        engine.close()


def wait_until(condition, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True



def png_bytes(seed: int, size: int = 48) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def bomb_png(width: int = 30000, height: int = 30000) -> bytes:
    """A PNG header claiming a huge image (no pixel data to speak of)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def ct_small() -> Path:
    from pydicom.data import get_testdata_file

    return Path(get_testdata_file("CT_small.dcm", download=False))


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def image_message(text: str, url: str) -> dict:
    parts = [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url}}]
    return {"role": "user", "content": parts}
