"""The Gradio UI (a view: every decision about images and generation is the engine's), and
`build_app`, which puts the UI and the HTTP API on one FastAPI app around one engine.

Each browser session is one conversation (keyed by Gradio's session hash): its image is decoded
once on upload and its KV cache makes follow-up questions cheap. Uploads, previews and report
drafts live in private folders (serve/session_files.py) and are deleted when the session ends
(the tab is closed) or, after a crash, when the next server starts. Errors a user can cause are
shown as their readable message; anything else as a short "internal error" (details go to the
server log only), hence `show_error=False`.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections import defaultdict
from pathlib import Path

import gradio as gr
from gradio.processing_utils import save_bytes_to_cache, save_pil_to_cache

from serve.api import create_api
from serve.engine import Engine
from serve.file_guard import COOKIE, FileGuard, FileOwners
from serve.logs import quiet_gradio_tracebacks
from serve.session_files import delete_files, private_folder
from vlm.errors import MedVLMError
from vlm.generation import GenerationConfig
from vlm.imaging import describe_metadata

log = logging.getLogger(__name__)

NOTICE = "**Research use only — not a medical device; a clinician must review every output.**"
AUTO_WINDOW = "auto/file"
WINDOWS = [AUTO_WINDOW, "lung", "mediastinum", "bone", "brain"]
INTERNAL = "Internal error; the details are in the server log."
EXAMPLE_FILES = ("CT_small.dcm", "MR_small.dcm")


def build_app(engine: Engine, auth: tuple[str, str] | None = None, max_body_bytes: int | None = None,
              allowed_hosts: list[str] | None = None):
    """One FastAPI app: the API under /v1 and /health, the UI at /. `allowed_hosts`: the Host
    header values answered (serve/web_guard.py; default: the loopback names on any port)."""
    app = create_api(engine, auth=auth, max_body_bytes=max_body_bytes, allowed_hosts=allowed_hosts)
    quiet_gradio_tracebacks()
    # Gradio keeps uploads in GRADIO_TEMP_DIR, read when the Blocks and its routes are made.
    uploads = private_folder("uploads")
    os.environ["GRADIO_TEMP_DIR"] = str(uploads)
    app.state.ui = Handlers(engine, uploads)
    app.add_middleware(FileGuard, owners=app.state.ui.owners)
    blocks = build_ui(engine, app.state.ui)
    # The UI's heavy events share the engine's concurrency; Gradio's queue shows waiting users
    # their position, and past `queue_size` it refuses with its own "queue is full" message.
    blocks.queue(max_size=engine.queue_size, default_concurrency_limit=4)
    # No run history: Gradio would keep every upload and answer in the browser (or a hub bucket).
    return gr.mount_gradio_app(app, blocks, path="/", auth=auth, show_error=False, run_history=False,
                               footer_links=["api", "settings"], mcp_server=False,
                               max_file_size=engine.max_image_bytes, theme=gr.themes.Soft())


@contextlib.contextmanager
def _user_errors(name: str):
    """Show a MedVLMError's message; hide anything else behind INTERNAL (details go to the log)."""
    try:
        yield
    except gr.Error:
        raise
    except MedVLMError as e:
        raise gr.Error(str(e), print_exception=False) from None
    except Exception:
        log.exception("UI handler %s failed", name)
        raise gr.Error(INTERNAL, print_exception=False) from None


def _readable(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with _user_errors(fn.__name__):
            return fn(*args, **kwargs)
    return wrapper


def _readable_stream(fn):
    """_readable for async generators (closing one, e.g. on Stop, still closes the inner one)."""
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        with _user_errors(fn.__name__):
            async for item in fn(*args, **kwargs):
                yield item
    return wrapper


def example_files() -> list[str]:
    """pydicom's bundled test images, when present (never downloaded)."""
    try:
        from pydicom.data import get_testdata_file
    except ImportError:
        return []
    found = []
    for name in EXAMPLE_FILES:
        try:
            path = get_testdata_file(name, download=False)
        except Exception:  # pydicom raises when a data plugin is missing or misconfigured
            path = None
        if path:
            found.append(str(path))
    return found


def _text(content) -> str:
    """Gradio 6 message content (a string or a list of parts) -> its text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


class Handlers:
    """The UI's event handlers: translate widgets to engine calls and back."""

    def __init__(self, engine: Engine, uploads: Path):
        self.engine = engine
        self.uploads = uploads
        self.owners = FileOwners()
        self.metadata: dict[str, dict] = {}
        """Per conversation: the de-identified metadata of the image it is about."""
        self.files: defaultdict[str, set[str]] = defaultdict(set)
        """Per conversation: the uploads, previews and drafts it made (deleted when its session ends)."""

    @staticmethod
    def conversation(request: gr.Request | None) -> str:
        session = getattr(request, "session_hash", None)
        if not session:
            raise gr.Error("This request has no session; reload the page.")
        return f"ui-{session}"

    def _show(self, path, window, frame, request):
        """Decode the file with this window/frame, make it the conversation's image, describe it."""
        image = self.engine.load_image(path, window=None if window in (None, AUTO_WINDOW) else window,
                                       frame=None if frame is None else int(frame))
        pil = image.to_pil()
        cid = self.conversation(request)
        self.engine.set_images(cid, [pil])
        preview = save_pil_to_cache(pil, str(self.uploads), name="preview", format="png")
        self._keep(request, cid, str(path), preview)
        self.metadata[cid] = image.metadata  # the DICOM header names the study for report drafting
        return image, preview, describe_metadata(image.metadata)

    def _keep(self, request, cid: str, *paths: str) -> None:
        """Record files of this session: only its browser may fetch them, and they go when it ends."""
        token = (getattr(request, "cookies", None) or {}).get(COOKIE)
        for path in paths:
            self.files[cid].add(path)
            self.owners.add(token, path)

    @_readable
    def upload(self, path, window, request: gr.Request):
        """A new file: a new conversation about it (the chat and the report start over)."""
        cid = self.conversation(request)
        self.engine.forget(cid)
        self._delete(self.files.pop(cid, set()) - {str(path)})  # the last upload's files, not this one
        self.metadata.pop(cid, None)
        if not path:
            return None, "", gr.update(visible=False, value=0), [], "", "", ""
        image, pil, info = self._show(path, window, None, request)
        frames = gr.update(visible=image.num_frames > 1, minimum=0, maximum=max(image.num_frames - 1, 1),
                           value=image.frame, step=1)
        return pil, info, frames, [], "", "", ""

    @_readable
    def render(self, path, window, frame, request: gr.Request):
        """Another window or frame of the same file (the chat goes on, about the new view)."""
        if not path:
            return None, ""
        _, pil, info = self._show(path, window, frame, request)
        return pil, info

    @_readable_stream
    async def chat(self, message, history, path, window, frame, max_tokens, temperature, request: gr.Request):
        # A typed image marker would count as a second image: the image comes from the upload only.
        message = self.engine.assistant.strip_markers(message or "").strip()
        history = [{"role": m["role"], "content": _text(m.get("content"))} for m in history or []]
        if not message:
            gr.Warning("Type a question first.")
            yield history, ""
            return
        cid = self.conversation(request)
        if path and not self.engine.images(cid):  # e.g. dropped from the engine's LRU: decode again
            self._show(path, window, frame, request)
        if not path:
            gr.Warning("No image is loaded: the answer uses the text only.")
        history += [{"role": "user", "content": message}, {"role": "assistant", "content": ""}]
        yield history, ""
        gen = GenerationConfig(max_new_tokens=int(max_tokens), temperature=float(temperature)).guarded()
        reply = self.engine.chat(cid, history[:-1], None, gen)
        async for delta in reply.astream():
            history[-1]["content"] += delta
            yield history, ""
        if not history[-1]["content"].strip():
            history[-1]["content"] = "(no answer)"
            yield history, ""

    def stop(self, request: gr.Request):
        self.engine.cancel(self.conversation(request))

    def clear(self):
        return [], ""

    @_readable
    def draft(self, path, window, frame, max_tokens, request: gr.Request):
        """The study's name, and findings/impression drafted only where the model may report it."""
        cid = self.conversation(request)
        if not path:
            raise gr.Error("Upload an image first, then draft the report.")
        if not self.engine.images(cid) or cid not in self.metadata:  # e.g. dropped from the engine's LRU
            self._show(path, window, frame, request)
        gen = GenerationConfig(max_new_tokens=int(max_tokens))
        report = self.engine.draft_report(self.engine.images(cid)[0], gen, metadata=self.metadata[cid])
        return report["study"], report["findings"], report["impression"]

    def end_session(self, request: gr.Request):
        """The tab was closed: forget the conversation and delete its uploads, previews and drafts."""
        cid = self.conversation(request)
        self.engine.forget(cid)
        self.metadata.pop(cid, None)
        log.info("session ended: %d file(s) deleted", self._delete(self.files.pop(cid, set())))

    def _delete(self, paths: set[str]) -> int:
        self.owners.remove(paths)
        return delete_files(paths, self.uploads)

    def export(self, findings, impression, request: gr.Request):
        """The editable draft as Markdown, for the download button."""
        if not (findings or impression):
            return gr.update(value=None, interactive=False)
        text = (f"# Radiology report (draft)\n\n> {NOTICE}\n\n## Findings\n\n{(findings or '').strip()}\n\n"
                f"## Impression\n\n{(impression or '').strip()}\n")
        path = save_bytes_to_cache(text.encode(), "report-draft.md", str(self.uploads))
        self._keep(request, self.conversation(request), path)
        return gr.update(value=str(path), interactive=True)


def build_ui(engine: Engine, handlers: Handlers | None = None) -> gr.Blocks:
    h = handlers or Handlers(engine, private_folder("uploads"))
    # Uploaded files can be patient images: Gradio's cache of them is purged hourly.
    # No analytics: a clinical tool does not report its use to third parties.
    with gr.Blocks(title="medvlm", delete_cache=(3600, 3600), analytics_enabled=False) as blocks:
        gr.Markdown(f"## medvlm: medical image assistant\n{NOTICE}", elem_id="notice")
        with gr.Row():
            with gr.Column(scale=2):
                file = gr.File(label="Image: PNG, JPEG or DICOM (drop a file here)", type="filepath",
                               elem_id="upload")
                # No "share" button: it would post the (patient) image to a Hugging Face discussion.
                preview = gr.Image(label="Preview", type="pil", format="png", interactive=False, height=320,
                                   buttons=["download", "fullscreen"],
                                   elem_id="preview")
                with gr.Row():
                    window = gr.Dropdown(WINDOWS, value=AUTO_WINDOW, label="CT window", elem_id="window")
                    frame = gr.Slider(0, 1, value=0, step=1, label="Frame", visible=False, elem_id="frame")
                info = gr.Textbox(label="Image information (de-identified)", interactive=False, elem_id="info")
                examples = example_files()
                if examples:
                    gr.Examples([[p] for p in examples], inputs=[file], label="Example DICOM images")
            with gr.Column(scale=3):
                chatbot = gr.Chatbot(label="Conversation", height=380, elem_id="chatbot", buttons=["copy"])
                message = gr.Textbox(placeholder="Ask about the image, e.g. 'Is there a pleural effusion?'",
                                     show_label=False, elem_id="message")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="send")
                    stop = gr.Button("Stop", variant="stop", elem_id="stop")
                    clear = gr.Button("Clear chat")
                with gr.Accordion("Generation settings", open=False):
                    max_tokens = gr.Slider(1, 1024, value=256, step=1, label="Max new tokens")
                    temperature = gr.Slider(0, 2, value=0, step=0.05, label="Temperature (0 = greedy)")
        with gr.Group():
            draft = gr.Button("Draft report", elem_id="draft")
            study = gr.Textbox(label="Study (what the image is, and where that comes from)", interactive=False,
                               elem_id="study")
            findings = gr.Textbox(label="Findings (editable)", lines=6, buttons=["copy"], elem_id="findings")
            impression = gr.Textbox(label="Impression (editable)", lines=3, buttons=["copy"], elem_id="impression")
            download = gr.DownloadButton("Download report (.md)", interactive=False, elem_id="download")

        view = [file, window, frame]
        file.change(h.upload, [file, window], [preview, info, frame, chatbot, study, findings, impression],
                    api_name="upload")
        gr.on([window.input, frame.release], h.render, view, [preview, info], api_name="render")
        chatting = gr.on([message.submit, send.click], h.chat,
                         [message, chatbot, *view, max_tokens, temperature], [chatbot, message],
                         api_name="chat", concurrency_limit=engine.concurrency, concurrency_id="model")
        stop.click(h.stop, None, None, cancels=[chatting], api_name="stop")
        clear.click(h.clear, None, [chatbot, message], api_name="clear")
        draft.click(h.draft, [*view, max_tokens], [study, findings, impression], api_name="draft_report",
                    concurrency_limit=engine.concurrency, concurrency_id="model")
        gr.on([findings.change, impression.change], h.export, [findings, impression], download,
              trigger_mode="always_last", api_name="export_report")
        blocks.unload(h.end_session)
    return blocks
