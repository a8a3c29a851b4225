"""FastAPI app: one static page and a JSON API over the same library calls as the CLI.

Safety: uploads are read up to ``max_upload_bytes`` (413 past it), their content is sniffed by the image
decoder (the file name is ignored) and limited to ``max_pixels``; nothing is written to disk; no
path from the client is ever opened (models are chosen among the zoo names, samples by name); at most
``running`` explanations run at once with ``waiting`` more in line, past which the answer is 503 with
Retry-After; errors are JSON ``{"error": "..."}`` with a 4xx code and never a stack trace.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Annotated

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
from ..models import DEFAULT_MODEL, Model, load_model
from ..models.labels import short_name
from ..render.colormaps import DIVERGING, SEQUENTIAL, colorize, default_colormap
from ..render.overlay import png_bytes
from ..runner import check_options
from ..samples import SAMPLES, sample_image
from .limits import AdmissionLimit, Busy

MAX_UPLOAD_BYTES = 10 * 2**20
MAX_PIXELS = 40_000_000


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
) -> FastAPI:
    """The app, with ``model`` loaded once at start and shared by every request."""
    app = FastAPI(
        title="cnnscope",
        version=__version__,
        description="Explain an image classifier: predictions, and maps of any class by any method.",
    )
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

    static = resources.files(__package__).joinpath("static")
    app.mount("/static", StaticFiles(directory=str(static)), name="static")

    def model_name_of(name: str | None) -> str:
        """Check a client's model name against the zoo (no path is ever loaded)."""
        name = name or model
        if name not in models and name not in MODELS:
            raise ModelError(
                f"unknown model {name!r}; choose one of {', '.join(sorted(set(models) | set(MODELS.names())))}"
            )
        return name

    def get_model(name: str) -> tuple[Model, threading.Lock]:
        """On the model thread only: the model, loaded on first use, and its lock."""
        if name not in models:
            models[name] = load_model(name)
            locks[name] = threading.Lock()
        return models[name], locks[name]

    async def read_image(file: UploadFile | None, sample: str | None) -> tuple[np.ndarray, str]:
        if file is not None and sample:
            raise InputError("send either an image file or a sample name, not both")
        if sample:
            if sample not in SAMPLES:
                raise InputError(f"unknown sample {sample!r}; the samples are {', '.join(SAMPLES)}")
            return sample_image(sample), sample
        if file is None:
            raise InputError("no image: send a file in the 'image' field, or a 'sample' name")
        data = await file.read(max_upload_bytes + 1)
        if len(data) > max_upload_bytes:
            raise UploadTooLarge(f"the upload is over the limit of {max_upload_bytes // 2**20} MiB")
        return load_image(data, max_pixels=max_pixels), "upload"

    @app.exception_handler(CnnscopeError)
    async def input_error(request: Request, exc: CnnscopeError) -> JSONResponse:
        return JSONResponse({"error": str(exc)}, status_code=413 if isinstance(exc, UploadTooLarge) else 400)

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

    @app.get("/api/methods", summary="The registered methods, their options and defaults")
    async def methods() -> list[dict]:
        return [
            {
                "name": name,
                "summary": cls.summary,
                "uses_layer": cls.uses_layer,
                "options": {k: _json_safe(v) for k, v in cls.options.items()},
                "file_options": list(cls.file_options),
            }
            for name, cls in METHODS.items()
        ]

    @app.get("/api/models", summary="The loaded model and the zoo models that can be chosen")
    async def list_models_route() -> dict:
        return {
            "default": model,
            "models": sorted(set(models) | set(MODELS.names())),
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
        image: UploadFile | None = None,
        sample: Annotated[str | None, Form()] = None,
        model_name: Annotated[str | None, Form(alias="model")] = None,
        top_k: Annotated[int, Form(ge=1, le=1000)] = 5,
        multilabel: Annotated[bool, Form()] = False,
    ) -> dict:
        picture, name = await read_image(image, sample)
        chosen_name = model_name_of(model_name)

        def run() -> dict:
            chosen, lock = model_for(chosen_name, multilabel)
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

        async with admission.slot():
            return await on_model_thread(run)

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
        check_options([method], parsed)
        for key in cls.file_options:
            if isinstance(parsed.get(key), str):
                raise InputError(
                    f"{key} over the web takes a JSON array of labels, not the name of a file on the server"
                )
        if colormap is not None and colormap not in SEQUENTIAL + DIVERGING:
            raise InputError(f"unknown colormap {colormap!r}; choose one of {', '.join(SEQUENTIAL + DIVERGING)}")
        picture, name = await read_image(image, sample)
        chosen_name = model_name_of(model_name)
        spec = [part.strip() for part in target.split(",") if part.strip()] or ["top1"]
        resolved = spec[0] if len(spec) == 1 and spec[0].lower().startswith(("top", "positive")) else spec
        extra = {"quiet": True} if "quiet" in cls.options else {}

        def run() -> dict:
            # everything that touches torch stays on the model thread, rendering included
            chosen, lock = model_for(chosen_name, multilabel)
            with lock:
                explanation = cls(chosen, **parsed, **extra)(picture, resolved, names=[name])
            return response_body(explanation, name, chosen.name, colormap, alpha, overlay, raw)

        async with admission.slot():
            body = await on_model_thread(run)
        # returned as is: the maps' base64 strings are already JSON, FastAPI's encoder pass would only copy them
        return JSONResponse(body)

    return app


def response_body(
    explanation, name: str, model_name: str, colormap: str | None, alpha: float, overlay: bool, raw: bool = True
) -> dict:
    """The JSON of /api/explain: per map a heatmap PNG, the raw float16 map (unless ``raw`` is false) and
    the overlay (if ``overlay``)."""
    normalized = explanation.normalized()
    cmap = colormap or default_colormap(explanation.signed)
    maps = []
    for i, k in explanation.items():
        index = int(explanation.targets[i, k])
        entry = {
            "class_index": index,
            "class_name": short_name(explanation.labels[index]),
            "probability": explanation.probability(i, k),
            "peak": list(explanation.peak(i, k)),
            "heatmap_png": base64.b64encode(
                png_bytes(colorize(normalized[i, k].numpy(), cmap, signed=explanation.signed))
            ).decode(),
        }
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
