"""FastAPI app: one static page and a JSON API over the same library calls as the CLI.

Safety: the Host header must name this server (loopback names, the address it was reached at, or
``allowed_hosts``; 400 otherwise: DNS rebinding) and a POST from a browser must come from the page's own
origin or ``allowed_origins`` (403 otherwise: CSRF). A request body over the upload limit plus about 1 MiB
is refused from its Content-Length before a byte is read (413), and one without it stops being read
at the limit (413); forms are parsed in memory, nothing is written to disk. Uploads are decoded only
once admitted, on the model thread (the event loop never decodes), their content sniffed by the image
decoder (the file name is ignored) and limited to ``max_pixels``. No path from the client is ever
opened (models are chosen among the zoo names, samples by name). At most ``running`` requests run at
once with ``waiting`` more in line, past which the answer is 503 with Retry-After; a request whose
client disconnects is cancelled at the method's next pass boundary, and its place freed once the work
has stopped. Errors are JSON ``{"error": "..."}`` with a 4xx code and never a stack trace.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import re
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Annotated, TypeVar

import numpy as np
from fastapi import FastAPI, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from .._registry import METHODS, MODELS
from ..errors import CnnscopeError, InputError, ModelError
from ..io import load_image
from ..methods import method_listing
from ..models import DEFAULT_MODEL, Model, load_model
from ..models.zoo import load_offered, offered_models
from ..progress import Cancelled, cancellable, check_cancelled
from ..render.colormaps import DIVERGING, SEQUENTIAL, colorize, default_colormap
from ..render.overlay import png_bytes
from ..samples import SAMPLES, sample_image
from ..targets import parse_target_text
from .limits import AdmissionLimit, Busy, FormLimits, RequestGuard, in_memory_form_route

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_PIXELS = 40_000_000
#: Forward-pass equivalents one request may cost: the default methods fit (RISE's 4,000 masks, LIME's 1,000
#: samples, Score-CAM's 1,280 channels, IG's 50 steps x 5 targets); 10,000,000 RISE masks do not.
MAX_WORK = 20_000
MAX_TARGETS = 50


def _target_count(target: object) -> int:
    """How many classes a parsed target names per image (topK: K; a list: its length; positive: 1 here,
    the threshold decides later)."""
    if isinstance(target, str):
        match = re.match(r"^top\s*(\d+)$", target.strip(), re.IGNORECASE)
        return int(match.group(1)) if match else 1
    return sum(part.count(",") + 1 for part in target) if isinstance(target, list) else 1


#: The status of the answer nobody reads: the client closed the connection (nginx's convention).
CLIENT_CLOSED_REQUEST = 499

T = TypeVar("T")


def _json_safe(value: object) -> object:
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    return str(value)


def create_app(
    model: str = DEFAULT_MODEL,
    *,
    max_upload_bytes: int = MAX_UPLOAD_BYTES,
    max_pixels: int = MAX_PIXELS,
    running: int = 1,
    waiting: int = 4,
    allowed_hosts: Iterable[str] = (),
    allowed_origins: Iterable[str] = (),
    max_work: int = MAX_WORK,
    max_targets: int = MAX_TARGETS,
) -> FastAPI:
    """The app, with ``model`` loaded once at start and shared by every request.

    ``allowed_hosts``: Host header values answered besides the loopback names and the address a request
    came in on (``name`` for any port, ``name:port``, ``*`` for any). ``allowed_origins``: page origins
    (``scheme://host[:port]``, ``*`` for any) whose POSTs are accepted besides the server's own.
    ``max_work``: forward-pass equivalents one explanation may cost (``Method.estimated_work``: masks,
    samples, steps times targets...), refused with 400 past it before anything runs; ``max_targets``:
    classes explained in one request."""
    app = FastAPI(
        title="cnnscope",
        version=__version__,
        description="Explain an image classifier: predictions, and maps of any class by any method.",
    )
    form_limits = FormLimits(max_upload_bytes=max_upload_bytes)
    # form fields and uploads are read in memory within these limits, never spooled to a temporary file
    app.router.route_class = in_memory_form_route(form_limits)
    guard = {
        "allowed_hosts": tuple(allowed_hosts),
        "allowed_origins": tuple(allowed_origins),
        "max_body_bytes": form_limits.max_body_bytes,
    }
    RequestGuard(app, **guard)  # a malformed host or origin raises ValueError now, not at the first request
    app.add_middleware(RequestGuard, **guard)
    admission = AdmissionLimit(running, waiting)
    # Every torch call of the server runs on `running` long-lived threads (one by default), the model's
    # loading included: each thread that calls torch gets its own OpenMP team, and an idle team's spinning
    # threads slow the busy one. Measured: a Grad-CAM of 19-26 ms took 60 ms on Starlette's per-request
    # threads and 40 ms with one worker thread while the event loop thread also touched torch.
    workers = ThreadPoolExecutor(max_workers=running, thread_name_prefix="cnnscope-model")
    models: dict[str, Model] = {model: workers.submit(load_model, model).result()}
    locks: dict[str, threading.Lock] = {model: threading.Lock()}

    async def on_model_thread(function):
        return await asyncio.get_running_loop().run_in_executor(workers, function)

    async def admitted(request: Request, work: Callable[[], T]) -> T:
        """``work`` on the model thread once admitted (503 when the line is full). If the client
        disconnects, the work is cancelled at its next pass boundary (``Progress.should_stop`` or
        ``check_cancelled`` raise ``Cancelled``); the slot is held until the work has actually stopped."""
        gone = threading.Event()

        def job() -> T:
            with cancellable(gone):
                check_cancelled()  # the client left while this waited in line
                return work()

        watcher = asyncio.create_task(_set_on_disconnect(request, gone))
        try:
            async with admission.slot():
                future = asyncio.get_running_loop().run_in_executor(workers, job)
                try:
                    return await asyncio.shield(future)
                except asyncio.CancelledError:  # the request itself was cancelled (server shutdown)
                    gone.set()
                    with contextlib.suppress(Exception):
                        await future  # keep the slot until the model thread is free
                    raise
        finally:
            watcher.cancel()

    static = resources.files(__package__).joinpath("static")
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    def model_name_of(name: str | None) -> str:
        """Check a client's model name against the zoo (no path is ever loaded)."""
        name = name or model
        if name not in models and name not in MODELS and name not in offered_models():
            raise ModelError(
                f"unknown model {name!r}; choose one of "
                f"{', '.join(sorted(set(models) | set(MODELS.names())) + offered_models())}"
            )
        return name

    def get_model(name: str) -> tuple[Model, threading.Lock]:
        """On the model thread only: the model, loaded on first use, and its lock."""
        if name not in models:
            # torchvision/timm names: pretrained weights, or random ones (with a warning) when offline
            models[name] = load_offered(name) if name in offered_models() else load_model(name)
            locks[name] = threading.Lock()
        return models[name], locks[name]

    async def image_source(file: UploadFile | None, sample: str | None) -> tuple[bytes | None, str]:
        """The upload's bytes (None for a sample) and the image's name; nothing is decoded here."""
        if file is not None and sample:
            raise InputError("send either an image file or a sample name, not both")
        if sample:
            if sample not in SAMPLES:
                raise InputError(f"unknown sample {sample!r}; the samples are {', '.join(SAMPLES)}")
            return None, sample
        if file is None:
            raise InputError("no image: send a file in the 'image' field, or a 'sample' name")
        volume_or_clip(file.filename or "")
        if isinstance(file.file, io.BytesIO):  # read_form keeps uploads in memory
            data = file.file.getvalue()
        else:
            data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise UploadTooLarge(f"the upload is over the limit of {max_upload_bytes // 2**20} MiB")
        return data, "upload"

    def pictures_only(chosen: Model) -> None:
        """The page shows pictures: a model of volumes or clips (3-D input) gets one line pointing at the CLI."""
        if chosen.preprocess.spatial_dims != 2:
            raise InputError(
                f"{chosen.name} takes 3-D inputs (volumes or clips: {'x'.join(map(str, chosen.preprocess.size))}); "
                "the web page explains pictures only: use cnnscope explain or compare SCAN_OR_CLIP --model ... "
                "from the command line"
            )

    def volume_or_clip(filename: str) -> None:
        """A NIfTI, DICOM or video file sent as the picture: one line pointing at the CLI (an animated GIF is a
        picture here, its first frame; TIFF and .npy are read as pictures)."""
        from ..io_volumes import CLIP_SUFFIXES

        lowered = filename.lower()
        if lowered.endswith((".nii", ".nii.gz", ".dcm", *CLIP_SUFFIXES)) and not lowered.endswith(".gif"):
            raise InputError(
                f"'{filename}' is a volume or video file; the web page explains pictures only: use cnnscope "
                "explain or compare on it from the command line"
            )

    def decode(data: bytes | None, name: str) -> np.ndarray:
        """On the model thread, once admitted: the upload decoded (pixel-limited), or the sample."""
        return sample_image(name) if data is None else load_image(data, max_pixels=max_pixels)

    @app.exception_handler(CnnscopeError)
    async def input_error(request: Request, exc: CnnscopeError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=413 if isinstance(exc, UploadTooLarge) else 400)

    @app.exception_handler(Cancelled)
    async def cancelled(request: Request, exc: Cancelled) -> JSONResponse:
        return JSONResponse(
            {"error": "the client closed the connection; the work was stopped"}, status_code=CLIENT_CLOSED_REQUEST
        )

    @app.exception_handler(Busy)
    async def busy(request: Request, exc: Busy) -> JSONResponse:
        return JSONResponse(
            {"error": "the server is busy explaining other images; retry shortly"},
            status_code=503,
            headers={"Retry-After": "2"},
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors())
        return JSONResponse({"error": f"malformed request: {problems}"}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "bad request"
        return JSONResponse(
            {"error": detail[:1].lower() + detail[1:].rstrip(".")},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(Exception)
    async def internal(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(
            {"error": f"internal error ({type(exc).__name__}); the server log has the details"}, status_code=500
        )

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page() -> HTMLResponse:
        return HTMLResponse(static.joinpath("index.html").read_text(encoding="utf-8"))

    @app.get("/api/methods", summary="The registered methods and their typed options (type, default, range, help)")
    async def methods() -> list[dict]:
        return method_listing()

    @app.get("/api/models", summary="The loaded model and the zoo models that can be chosen")
    async def list_models_route() -> dict:
        return {
            "default": model,
            "models": sorted(set(models) | set(MODELS.names())) + [n for n in offered_models() if n not in models],
            "colormaps": list(SEQUENTIAL + DIVERGING),
            "samples": list(SAMPLES),
        }

    def model_for(name: str, multilabel: bool) -> tuple[Model, threading.Lock]:
        """On the model thread: the shared model, or its multi-label (sigmoid) twin, cached."""
        chosen, lock = get_model(name)
        if not multilabel:
            return chosen, lock
        key = f"{name} (multi-label)"
        if key not in models:
            models[key] = load_model(chosen, multilabel=True)
        return models[key], lock

    @app.get("/api/labels", summary="A model's class labels, in index order")
    async def labels(model_name: Annotated[str | None, Query(alias="model")] = None) -> dict:
        name = model_name_of(model_name)
        chosen, _ = await on_model_thread(lambda: get_model(name))
        return {"model": chosen.name, "labels": await on_model_thread(lambda: chosen.labels)}

    @app.get(
        "/api/samples/{name}", summary="A bundled sample photo as PNG", responses={200: {"content": {"image/png": {}}}}
    )
    async def sample(name: str) -> Response:
        if name not in SAMPLES:
            raise InputError(f"unknown sample {name!r}; the samples are {', '.join(SAMPLES)}")
        return Response(png_bytes(sample_image(name)), media_type="image/png")

    @app.post("/api/predict", summary="Top-k predictions of an uploaded image or a sample")
    async def predict(
        request: Request,
        image: UploadFile | None = None,
        sample: Annotated[str | None, Form()] = None,
        model_name: Annotated[str | None, Form(alias="model")] = None,
        top_k: Annotated[int, Form(ge=1, le=1000)] = 5,
        multilabel: Annotated[bool, Form()] = False,
    ) -> dict:
        data, name = await image_source(image, sample)
        chosen_name = model_name_of(model_name)

        def run() -> dict:
            picture = decode(data, name)
            chosen, lock = model_for(chosen_name, multilabel)
            pictures_only(chosen)
            with lock:
                predictions = chosen.predict(picture, top_k)[0]
            return {
                "image": name,
                "model": chosen.name,
                "size": [int(picture.shape[1]), int(picture.shape[0])],
                "predictions": [
                    {"class_index": p.index, "class_name": p.name, "label": p.label, "probability": p.probability}
                    for p in predictions
                ],
            }

        return await admitted(request, run)

    @app.post(
        "/api/explain",
        summary="Maps of chosen classes by a chosen method",
        description=(
            "Targets: 'top1', 'top5', class indices or names, comma-separated. Options: a JSON object of "
            "the method's options (GET /api/methods). Each map comes as a heatmap PNG at the model input's "
            "resolution (colour only: stretch it over the image with any opacity), the raw map (base64 of "
            "little-endian float16 values, row-major, shape raw_shape = [height, width] at the model input's "
            "resolution, with the sign and scale the method computed) and, with overlay=true, the heatmap "
            "blended over the original image as a PNG at the image's size; raw=false leaves the raw maps out."
        ),
    )
    async def explain(
        request: Request,
        image: UploadFile | None = None,
        sample: Annotated[str | None, Form()] = None,
        model_name: Annotated[str | None, Form(alias="model")] = None,
        method: Annotated[str, Form()] = "gradcam",
        target: Annotated[str, Form()] = "top1",
        options: Annotated[str, Form()] = "{}",
        colormap: Annotated[str | None, Form()] = None,
        alpha: Annotated[float, Form(ge=0.0, le=1.0)] = 0.5,
        multilabel: Annotated[bool, Form()] = False,
        overlay: Annotated[bool, Form()] = False,
        raw: Annotated[bool, Form()] = True,
    ) -> JSONResponse:
        cls = METHODS.get(method)
        try:
            parsed = json.loads(options or "{}")
        except json.JSONDecodeError as exc:
            raise InputError(f"options must be a JSON object: {exc.msg}") from None
        if not isinstance(parsed, dict):
            raise InputError('options must be a JSON object such as {"steps": 16}')
        parsed.pop("quiet", None)
        for key in cls.file_options():
            if isinstance(parsed.get(key), str):
                raise InputError(
                    f"{key} over the web takes a JSON array of labels, not the name of a file on the server"
                )
        cls.options.resolve(parsed, cls.name)  # every name and value checked before anything is read
        if colormap is not None and colormap not in SEQUENTIAL + DIVERGING:
            raise InputError(f"unknown colormap {colormap!r}; choose one of {', '.join(SEQUENTIAL + DIVERGING)}")
        data, name = await image_source(image, sample)
        chosen_name = model_name_of(model_name)
        resolved = parse_target_text(target)
        targets = _target_count(resolved)
        if targets > max_targets:
            raise InputError(f"{targets} targets in one request; the limit is {max_targets} (explain fewer at a time)")
        extra = {"quiet": True} if "quiet" in cls.options else {}

        def run() -> dict:
            # everything that touches torch stays on the model thread, decoding and rendering included
            picture = decode(data, name)
            chosen, lock = model_for(chosen_name, multilabel)
            pictures_only(chosen)
            with lock:
                explainer = cls(chosen, **parsed, **extra)
                work = explainer.estimated_work(max(1, targets))
                if work > max_work:
                    raise InputError(
                        f"this request needs about {work:,} forward passes; the server's limit is {max_work:,} "
                        "(--max-work): lower the method's counts (samples, masks, steps) or the targets"
                    )
                explanation = explainer(picture, resolved, names=[name])
            return response_body(explanation, name, chosen.name, colormap, alpha, overlay, raw)

        body = await admitted(request, run)
        # returned as is: the maps' base64 strings are already JSON, FastAPI's encoder pass would only copy them
        return JSONResponse(body)

    return app


async def _set_on_disconnect(request: Request, event: threading.Event) -> None:
    """Set ``event`` when the client disconnects (its body has been read: the next ASGI message is the
    disconnect; the server then reports it as soon as the socket closes)."""
    with contextlib.suppress(Exception):  # a server that cannot tell: the work just runs to its end
        while True:
            message = await request.receive()
            if message["type"] == "http.disconnect":
                event.set()
                return


def response_body(
    explanation, name: str, model_name: str, colormap: str | None, alpha: float, overlay: bool, raw: bool = True
) -> dict:
    """The JSON of /api/explain: per map a heatmap PNG, the raw float16 map (unless ``raw`` is false) and
    the overlay (if ``overlay``)."""
    normalized = explanation.normalized()
    cmap = colormap or default_colormap(explanation.signed)
    maps = []
    for i, k, entry in explanation.records():
        entry["heatmap_png"] = base64.b64encode(
            png_bytes(colorize(normalized[i, k].numpy(), cmap, signed=explanation.signed))
        ).decode()
        if raw:
            values = explanation.maps[i, k].numpy().astype("<f2")
            entry["raw_float16"] = base64.b64encode(values.tobytes()).decode()
            entry["raw_shape"] = list(values.shape)
        if overlay:
            entry["overlay_png"] = base64.b64encode(
                png_bytes(explanation.overlay(i, k, alpha=alpha, colormap=cmap))
            ).decode()
        maps.append(entry)
    return {
        "image": name,
        "model": model_name,
        "method": explanation.method,
        "layer": explanation.layer,
        "signed": explanation.signed,
        "notes": list(explanation.notes),
        "stats": {k: v if isinstance(v, (list, dict)) else _json_safe(v) for k, v in explanation.stats.items()},
        "top5": [
            {"class_index": p.index, "class_name": p.name, "probability": p.probability} for p in explanation.top[0]
        ],
        "maps": maps,
    }


class UploadTooLarge(InputError):
    """An upload past the size limit (answered with 413)."""
