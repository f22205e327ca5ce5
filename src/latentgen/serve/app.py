"""The Gradio page of ``latentgen serve``, built from what the pipeline's conditioners declare.

One control per conditioner, chosen by ``Conditioner.raw_input().kind``: a dropdown of class
names ("class"), a paint canvas with the class palette plus an upload ("label_map"), an upload
("image"), a JSON upload or text ("keypoints"), a JSON text box ("value", what a plugin that
declares nothing gets). Generation runs in a worker thread so that the page shows the codes
drawn so far and Cancel can stop it; every error is the library's own message, shown in the
page, and the server keeps serving.
"""

from __future__ import annotations

import html
import os
import queue
import threading
import uuid
from typing import Any

from latentgen.conditioners.base import RawInput
from latentgen.errors import InputError, LatentgenError
from latentgen.serve.inputs import class_choices, keypoint_picture, palette_hex
from latentgen.serve.session import Cancelled, ConditionValue, GenerateRequest, Studio

__all__ = ["build_app", "launch"]

_MISSING_GRADIO = (
    "latentgen serve needs Gradio, an optional extra: pip install 'latentgen[ui]' (or pip "
    "install gradio)."
)

_CSS = """
#lg-status p { font-family: monospace; }
.lg-swatch { display: inline-block; width: 1em; height: 1em; margin: 0 .3em 0 .8em;
             border: 1px solid #888; vertical-align: middle; }
"""


def _gradio() -> Any:
    try:
        import gradio as gr
    except ImportError:
        raise InputError(_MISSING_GRADIO) from None
    return gr


def _legend(spec: RawInput) -> str:
    """HTML swatches: class id, name and colour of the canvas palette."""
    count = spec.count or 0
    items = []
    for i, colour in enumerate(palette_hex(count)):
        name = spec.names[i] if i < len(spec.names) else ""
        label = html.escape(f"{i} {name}".strip())
        items.append(f'<span class="lg-swatch" style="background:{colour}"></span>{label}')
    return "<div>Palette: " + " ".join(items) + "</div>"


def _error_text(e: BaseException | str) -> str:
    return f"**Error:** {html.escape(str(e))}"


class _Controls:
    """The page components of one conditioner and how to read a ``ConditionValue`` from them."""

    def __init__(self, gr: Any, name: str, spec: RawInput, canvas: int, card: dict[str, Any]):
        self.name, self.spec = name, spec
        self.components: list[Any] = []
        kind = spec.kind
        with gr.Group():
            if kind == "class":
                choices = class_choices(spec, card.get("class_names"))
                self.components.append(
                    gr.Dropdown(
                        choices=choices,
                        value=choices[0][1] if choices else None,
                        label=f"{name}: class",
                        elem_id=f"lg-cond-{name}",
                    )
                )
            elif kind == "label_map":
                colours = palette_hex(spec.count or 2)
                self.components.append(
                    gr.ImageEditor(
                        label=f"{name}: paint a map (unpainted = class 0)",
                        image_mode="RGBA",
                        type="numpy",
                        sources=(),
                        canvas_size=(canvas, canvas),
                        fixed_canvas=True,
                        brush=gr.Brush(
                            colors=colours,
                            default_color=colours[1 if len(colours) > 1 else 0],
                            color_mode="fixed",
                            default_size=max(4, canvas // 16),
                        ),
                        layers=False,
                        elem_id=f"lg-cond-{name}-canvas",
                    )
                )
                gr.HTML(_legend(spec))
                self.components.append(
                    gr.File(
                        label=f"{name}: or upload a map (class-id PNG or .npy, or a palette-"
                        "coloured PNG); an upload is used instead of the painting",
                        elem_id=f"lg-cond-{name}-file",
                    )
                )
            elif kind == "image":
                what = {1: "a greyscale map", 3: "a colour image"}.get(spec.channels or 0, "")
                self.components.append(
                    gr.File(
                        label=f"{name}: upload {what or 'an image'} (PNG/JPEG, or .npy)",
                        elem_id=f"lg-cond-{name}-file",
                    )
                )
            elif kind == "keypoints":
                self.components.append(
                    gr.File(label=f"{name}: keypoints JSON file", elem_id=f"lg-cond-{name}-file")
                )
                text = gr.Textbox(
                    label=f"{name}: or type the keypoints [[x, y, visibility], ...], x and y "
                    f"in [0, 1] ({spec.count or 'K'} of them), or click them below",
                    lines=2,
                    elem_id=f"lg-cond-{name}-text",
                )
                self.components.append(text)
                if spec.count:
                    from latentgen.serve.clicks import keypoint_clicker

                    side = 256
                    board = gr.Image(
                        keypoint_picture([], side, spec.count),
                        label=f"{name}: click keypoints 0..{spec.count - 1} in order (the next "
                        "click after the last starts again)",
                        interactive=False,
                        format="png",
                        elem_id=f"lg-cond-{name}-board",
                    )
                    board.select(keypoint_clicker(spec.count, side), text, [text, board])
            else:
                self.components.append(
                    gr.Textbox(
                        label=f"{name}: value (JSON, as `-c {name}=VALUE`)",
                        elem_id=f"lg-cond-{name}-text",
                    )
                )

    def value(self, values: list[Any]) -> ConditionValue:
        """The page values of ``self.components`` (same order) -> a ``ConditionValue``."""
        kind = self.spec.kind
        if kind == "class":
            return ConditionValue(choice=None if values[0] is None else int(values[0]))
        if kind == "label_map":
            editor, upload = values
            painting = _strokes(editor)
            return ConditionValue(file=_path_of(upload), painting=painting)
        if kind == "image":
            return ConditionValue(file=_path_of(values[0]))
        if kind == "keypoints":
            return ConditionValue(file=_path_of(values[0]), text=values[1] or None)
        return ConditionValue(text=values[0] or None)


def _strokes(editor: Any) -> Any:
    """The painted layers of the canvas (RGBA, transparent where unpainted), without the
    editor's white background; None for an untouched canvas."""
    import numpy as np

    if not isinstance(editor, dict):
        return editor
    layers = [np.asarray(x) for x in editor.get("layers") or [] if x is not None]
    if not layers:
        return None
    out = np.zeros_like(layers[0])
    for layer in layers:  # later layers are painted over earlier ones
        if layer.shape != out.shape or layer.shape[-1] != 4:
            return editor.get("composite")
        out = np.where(layer[..., 3:] >= 128, layer, out)
    return out


def _num(value: Any, digits: int) -> str:
    return value if isinstance(value, str) else f"{value:.{digits}f}"


def _path_of(upload: Any) -> str | None:
    if upload is None:
        return None
    return str(getattr(upload, "name", upload))


def build_app(studio: Studio) -> Any:
    """The page (a ``gradio.Blocks``) for ``studio``'s pipeline."""
    gr = _gradio()
    pipe = studio.pipe
    h0, w0 = studio.default_size()
    f = pipe.tokenizer.downsample
    window = studio.trained_grid()
    cancels: dict[str, threading.Event] = {}
    controls: list[_Controls] = []

    with gr.Blocks(title="latentgen serve", analytics_enabled=False) as page:
        where = studio.pipeline_dir or "a pipeline built in Python"
        gr.Markdown(f"**latentgen serve** · `{where}` · `{pipe!r}`")
        with gr.Tab("Generate"), gr.Row():
            with gr.Column(scale=1):
                for name, spec in studio.inputs().items():
                    controls.append(_Controls(gr, name, spec, max(256, h0), pipe.card))
                trained = f"Trained window {window[0] * f}x{window[1] * f} px" if window else ""
                with gr.Row():
                    height = gr.Number(
                        h0, label="height (px)", precision=0, step=f, elem_id="lg-height"
                    )
                    width = gr.Number(
                        w0, label="width (px)", precision=0, step=f, elem_id="lg-width"
                    )
                gr.Markdown(
                    f"Multiples of {f}. {trained}; larger sizes are drawn with the sliding window."
                )
                with gr.Row():
                    num = gr.Number(4, label="images", precision=0, minimum=1, elem_id="lg-num")
                    seed = gr.Number(0, label="seed", precision=0, minimum=0, elem_id="lg-seed")
                s = pipe.sampler
                with gr.Accordion("sampler", open=True):
                    with gr.Row():
                        temperature = gr.Slider(
                            0.05, 2.0, s.temperature, step=0.05, label="temperature"
                        )
                        guidance = gr.Slider(
                            0.0, 10.0, s.guidance_scale, step=0.1, label="guidance (1: off)"
                        )
                    with gr.Row():
                        top_k = gr.Number(
                            s.top_k or 0, label="top-k (0: off)", precision=0, minimum=0
                        )
                        top_p = gr.Slider(
                            0.05, 1.0, s.top_p or 1.0, step=0.01, label="top-p (1: off)"
                        )
                    window_mode = gr.Radio(
                        ["cached", "exact"],
                        value=s.window,
                        label="sliding window mode (sizes beyond the trained grid)",
                    )
                with gr.Row():
                    go = gr.Button("Generate", variant="primary", elem_id="lg-generate")
                    stop = gr.Button("Cancel", elem_id="lg-cancel")
                # Cancel answers here, not in the status the running draw keeps writing to.
                stop_note = gr.Markdown("", elem_id="lg-cancel-note")
            with gr.Column(scale=1):
                status = gr.Markdown("Ready.", elem_id="lg-status")
                gallery = gr.Gallery(
                    label="samples",
                    columns=4,
                    height=340,
                    object_fit="contain",
                    elem_id="lg-gallery",
                    format="png",
                )
                command = gr.Textbox(
                    label="the same draw from the command line",
                    elem_id="lg-command",
                    buttons=["copy"],
                )
                files = gr.File(
                    label="downloads: PNGs and codes (.npy)",
                    file_count="multiple",
                    height=180,
                    elem_id="lg-files",
                )

        with gr.Tab("Tokenizer"), gr.Row():
            with gr.Column():
                tok_in = gr.File(label="upload an image", elem_id="lg-tok-file")
                tok_go = gr.Button("Encode and decode", variant="primary", elem_id="lg-tok-run")
                tok_status = gr.Markdown("", elem_id="lg-tok-status")
            with gr.Column():
                tok_recon = gr.Image(label="reconstruction", elem_id="lg-tok-recon", format="png")
                tok_codes = gr.Image(
                    label="code grid (colour = code index)", elem_id="lg-tok-codes", format="png"
                )
                tok_files = gr.File(label="downloads", file_count="multiple")

        inputs = [c for ctl in controls for c in ctl.components]
        # A token per page load, so that Cancel stops this page's draw and no other.
        session = gr.State(lambda: uuid.uuid4().hex)
        settings = [height, width, num, seed, temperature, top_k, top_p, guidance, window_mode]

        def run(key: str, *values: Any) -> Any:
            """Generate in a worker thread; yield the codes drawn so far, then the gallery."""
            try:
                req = _request(controls, list(values))
            except LatentgenError as e:
                yield _error_text(e), None, None, ""
                return
            event = cancels[key] = threading.Event()
            updates: queue.Queue[tuple[int, int]] = queue.Queue()
            box: dict[str, Any] = {}

            def work() -> None:
                try:
                    box["result"] = studio.generate(
                        req, on_code=lambda d, t: updates.put((d, t)), cancel=event
                    )
                except BaseException as e:  # handed to the page thread below
                    box["error"] = e

            worker = threading.Thread(target=work, daemon=True)
            worker.start()
            yield "Starting...", gr.skip(), gr.skip(), gr.skip()
            last = None
            while worker.is_alive():
                worker.join(0.25)
                while not updates.empty():
                    last = updates.get()
                if last is not None:
                    yield f"Drawing codes: {last[0]} / {last[1]}", gr.skip(), gr.skip(), gr.skip()
            if cancels.get(key) is event:
                del cancels[key]  # nothing left to cancel
            error = box.get("error")
            if isinstance(error, Cancelled):
                yield f"Cancelled: {html.escape(str(error))}", gr.skip(), gr.skip(), gr.skip()
                return
            if isinstance(error, LatentgenError | ValueError):
                yield _error_text(error), gr.skip(), gr.skip(), gr.skip()
                return
            if error is not None:
                yield (
                    _error_text(f"{type(error).__name__}: {error}"),
                    gr.skip(),
                    gr.skip(),
                    gr.skip(),
                )
                return
            res = box["result"]
            done = (
                f"Done: {len(res.images)} image(s) of {res.size[0]}x{res.size[1]} in "
                f"`{res.folder}`."
            )
            downloads = [str(p) for p in (*res.images, res.grid, res.codes)]
            yield done, [str(p) for p in res.images], downloads, res.command

        def cancel(key: str) -> str:
            event = cancels.get(key)
            if event is None or event.is_set():
                return "Nothing to cancel."
            event.set()
            return "Cancelling..."

        def inspect(upload: Any) -> Any:
            path = _path_of(upload)
            if path is None:
                return _error_text("upload an image first."), None, None, None
            try:
                res = studio.inspect(path)
            except (LatentgenError, ValueError) as e:
                return _error_text(e), None, None, None
            m = res.metrics
            lpips = _num(m["lpips"], 4)
            text = (
                f"PSNR {_num(m['psnr_db'], 2)} dB · LPIPS {lpips} · {m['distinct_codes']} distinct "
                f"codes of {m['codebook_size']} (usage {100 * m['codebook_usage']:.2f}%, "
                f"perplexity {m['code_perplexity']:.1f}) · image {m['size'][0]}x{m['size'][1]}"
                f", codes {m['code_grid'][0]}x{m['code_grid'][1]}"
            )
            files_out = [str(p) for p in (res.reconstruction, res.code_grid, res.codes)]
            return text, str(res.reconstruction), str(res.code_grid), files_out

        go.click(run, [session, *inputs, *settings], [status, gallery, files, command])
        stop.click(cancel, session, stop_note, queue=False)
        tok_go.click(inspect, tok_in, [tok_status, tok_recon, tok_codes, tok_files])
    return page


def _request(controls: list[_Controls], values: list[Any]) -> GenerateRequest:
    """Page values (conditioner components, then the settings) -> a ``GenerateRequest``."""
    conds = {}
    for ctl in controls:
        n = len(ctl.components)
        conds[ctl.name] = ctl.value(values[:n])
        values = values[n:]
    height, width, num, seed, temperature, top_k, top_p, guidance, window = values
    if height is None or width is None:
        raise InputError("give the image size: height and width in pixels.")
    return GenerateRequest(
        conditions=conds,
        size=(height, width),
        num_images=num,
        seed=seed,
        temperature=temperature,
        top_k=int(top_k) if top_k else None,
        top_p=top_p,
        guidance=guidance,
        window=window,
    )


def launch(
    studio: Studio,
    host: str = "127.0.0.1",
    port: int = 7860,
    block: bool = True,
) -> Any:
    """Serve ``studio``'s page; Gradio's own files (uploads, its cache) go to
    ``<out>/.gradio`` so that nothing is written outside the output folder."""
    _gradio()  # the missing extra is named before anything is written
    cache = studio.out_dir / ".gradio"
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["GRADIO_TEMP_DIR"] = str(cache)  # read when the page and its routes are made
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    page = build_app(studio)
    page.queue(default_concurrency_limit=1)
    page.launch(
        server_name=host,
        server_port=port,
        prevent_thread_lock=not block,
        allowed_paths=[str(studio.out_dir)],
        show_error=True,
        quiet=not block,
        css=_CSS,
    )
    return page
