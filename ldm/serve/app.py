"""The serving process: settings, the queue and its worker, and the FastAPI app with every route.

    server = Server(ModelCatalog.of_pipeline(pipe), ServeSettings(max_batch=8))
    app = create_app(server)          # then uvicorn.run(app, host="127.0.0.1", port=7860)

Routes (A1111's where A1111 has one): `/` (the web page), `POST /sdapi/v1/txt2img`,
`POST /sdapi/v1/img2img`, `GET /sdapi/v1/progress`, `POST /sdapi/v1/interrupt`,
`GET /sdapi/v1/sd-models`, `GET /sdapi/v1/samplers`, `GET|POST /sdapi/v1/options`, and FastAPI's
`/docs`. Generation requests wait for their pictures; a client that disconnects while waiting
gives its place in the queue back.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool

from ..cli.common import save_images
from ..diffusion import SAMPLERS
from ..diffusion.names import A1111_AUTOMATIC, A1111_SAMPLERS, A1111_SCHEDULES
from ..pipeline import LDMPipeline
from .a1111 import BadRequest, Limits, images_response, request_job
from .capacity import images_per_call, largest_size
from .catalog import ModelCatalog
from .guard import Guard
from .queue import BatchKey, BatchQueue, Job, QueueFull
from .schemas import Img2ImgRequest, ImagesResponse, ProgressResponse, SamplerItem, SchedulerItem, SDModelItem, Txt2ImgRequest
from .worker import Worker

STATIC = Path(__file__).parent / "static"


@dataclass
class ServeSettings:
    """How a server batches, what it accepts, and who may use it."""

    max_batch: int = 8  # pictures per batch; 1 turns batching off
    max_queue: int = 64  # pictures that may wait before requests get 429
    batch_wait: float | None = None  # seconds a batch that is not full waits for company; None: a tenth of a batch
    limits: Limits = field(default_factory=Limits)
    api_key: str | None = None  # required on every request when set
    max_body_mb: int = 64
    preview_every: float = 1.0  # seconds between previews of one request (only while someone polls)
    outdir: Path | None = None  # where save_images=true writes; None refuses such requests


class Server:
    """One model catalog, one queue, one worker thread; `start` loads the current model."""

    def __init__(self, catalog: ModelCatalog, settings: ServeSettings | None = None):
        self.catalog = catalog
        self.settings = settings or ServeSettings()
        self.queue = BatchQueue(self.settings.max_batch, self.settings.max_queue, self.settings.batch_wait)
        self.images_per_call = 1
        catalog.prepare = self._prepare
        self.worker = Worker(self.queue, catalog, preview_every=self.settings.preview_every)

    def _prepare(self, pipe: LDMPipeline) -> LDMPipeline:
        """Fix the U-Net's batch shape: as many pictures as memory allows at the largest size, at
        most max_batch, two rows each (cond and uncond); see ldm.speed.FastUNet. Without a given
        largest size, it is the largest at which max_batch pictures fit."""
        limits, cap = self.settings.limits, self.settings.max_batch
        if limits.max_size is None:
            limits.max_size = largest_size(pipe, cap)
        size = limits.max_size
        self.images_per_call = images_per_call(pipe, size, size, cap)
        return pipe.optimize(dataclasses.replace(pipe.speed, fixed_batch=2 * self.images_per_call))

    def start(self) -> Server:
        self.catalog.pipeline(self.catalog.current)
        self.worker.start()
        return self

    def stop(self) -> None:
        self.worker.stop()

    async def wait(self, job: Job, request: Request) -> Any:
        """The job's result; None once the client has gone (its place is then given back)."""
        fut = asyncio.wrap_future(job.future)
        while not fut.done():
            await asyncio.wait({fut}, timeout=0.25)
            if not fut.done() and await request.is_disconnected():
                self.queue.cancel(job)
                return None
        return fut.result()


def error(status: int, message: str | list, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def create_app(server: Server) -> FastAPI:
    """The FastAPI app serving `server` (call `server.start()` before serving requests)."""
    app = FastAPI(title="ldm", description="Latent diffusion over the AUTOMATIC1111 API", version="1")
    app.add_middleware(Guard, api_key=server.settings.api_key, max_body=server.settings.max_body_mb << 20)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    queue, catalog = server.queue, server.catalog

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's 422 names the field; drop the echoed input, which can be megabytes of base64
        detail = [{k: v for k, v in e.items() if k not in ("input", "ctx", "url")} for e in exc.errors()]
        return error(422, detail)

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    async def generate(req: Txt2ImgRequest | Img2ImgRequest, request: Request) -> Any:
        try:
            job, entry = await run_in_threadpool(request_job, req, catalog, server.settings.limits)
            if req.save_images and server.settings.outdir is None:
                raise BadRequest("save_images", "this server saves no images; start it with --outdir DIR")
        except BadRequest as e:
            return error(e.status, e.detail())
        try:
            queue.submit(job)
        except QueueFull as e:
            return error(429, str(e), {"Retry-After": str(e.retry_after)})
        except ValueError as e:
            return error(422, BadRequest("force_task_id", str(e)).detail())
        try:
            result = await server.wait(job, request)
        except asyncio.CancelledError:
            queue.cancel(job)
            raise
        except ValueError as e:  # the pipeline refused the inputs
            return error(422, str(e))
        except Exception as e:
            return error(500, f"generation failed: {type(e).__name__}: {e}")
        if result is None:
            return error(499, "client disconnected")
        body = await run_in_threadpool(images_response, job, result, req, entry)
        if req.save_images:
            folder = server.settings.outdir / ("img2img" if job.key.mode != "txt2img" else "txt2img")
            await run_in_threadpool(save_images, result.images, folder, entry.title)
        return body

    @app.post("/sdapi/v1/txt2img", response_model=ImagesResponse)
    async def txt2img(req: Txt2ImgRequest, request: Request) -> Any:
        return await generate(req, request)

    @app.post("/sdapi/v1/img2img", response_model=ImagesResponse)
    async def img2img(req: Img2ImgRequest, request: Request) -> Any:
        return await generate(req, request)

    @app.get("/sdapi/v1/progress", response_model=ProgressResponse)
    async def progress(task_id: str | None = None, skip_current_image: bool = False) -> Any:
        job = queue.get(task_id) if task_id else _running_job(queue)
        if job is None:
            state = {"job": task_id or "", "job_count": 0, "queue_position": None, **queue.status()}
            text = "unknown or finished task" if task_id else "idle"
            return {"progress": 0.0, "eta_relative": 0.0, "state": state, "textinfo": text}
        job.preview_wanted = not skip_current_image
        position = queue.position(job)
        done = job.progress()
        if job.started is not None and done > 0:
            elapsed = time.monotonic() - job.started
            eta = elapsed / done - elapsed
        else:
            eta = queue.eta(job)
        state = {"skipped": False, "interrupted": job.interrupted, "job": job.id, "job_count": 1,
                 "job_no": 0, "sampling_step": job.step, "sampling_steps": job.key.sampling_steps,
                 "queue_position": position, "images": len(job.tasks), "images_done": job.finished,
                 **queue.status()}
        image = None
        if job.preview is not None and not skip_current_image:
            image = await run_in_threadpool(_png_base64, job.preview)
        if position:
            text = f"in line: {position - 1} request{'s' * (position != 2)} ahead" if position > 1 else "next in line"
        else:
            text = f"step {job.step}/{job.key.sampling_steps}"
        return {"progress": done, "eta_relative": max(0.0, eta), "state": state, "current_image": image,
                "textinfo": text}

    @app.post("/sdapi/v1/interrupt")
    async def interrupt(task_id: str | None = None) -> dict:
        job = queue.get(task_id) if task_id else None
        if task_id and job is None:
            return {}  # finished already (or never existed): nothing to stop
        queue.interrupt(job)
        return {}

    @app.get("/sdapi/v1/sd-models", response_model=list[SDModelItem])
    async def sd_models() -> list[dict]:
        return [e.item() for e in catalog.entries.values()]

    @app.get("/sdapi/v1/samplers", response_model=list[SamplerItem])
    async def samplers() -> list[dict]:
        # A1111's display names first (what its clients show), each with our name as an alias; then
        # the samplers A1111 lacks under our names
        items = [{"name": label, "aliases": [ours], "options": {"scheduler": A1111_AUTOMATIC[ours]}}
                 for label, ours in A1111_SAMPLERS.items()]
        named = set(A1111_SAMPLERS.values())
        return items + [{"name": ours, "aliases": [], "options": {}} for ours in SAMPLERS if ours not in named]

    @app.get("/sdapi/v1/schedulers", response_model=list[SchedulerItem])
    async def schedulers() -> list[dict]:
        return [{"name": label.lower().replace(" ", "_"), "label": label, "aliases": [spacing] if spacing else []}
                for label, spacing in A1111_SCHEDULES.items()]

    @app.get("/sdapi/v1/options")
    async def get_options() -> dict:
        entry = catalog.entries[catalog.current]
        d = entry.cfg.sample
        defaults = {"sampler_name": d.sampler, "steps": d.steps, "cfg_scale": d.cfg, "width": d.width,
                    "height": d.height, "negative_prompt": d.negative_prompt}
        return {"sd_model_checkpoint": entry.item()["title"], "samples_format": "png",
                "sd_checkpoint_hash": entry.sha256, "ldm_defaults": defaults,
                "ldm_images_per_call": server.images_per_call, "ldm_max_batch": server.settings.max_batch}

    @app.post("/sdapi/v1/options")
    async def set_options(options: dict[str, Any]) -> Any:
        name = options.get("sd_model_checkpoint")
        if name is None:
            return None  # nothing else is settable here; A1111 clients ignore the answer
        try:
            entry = catalog.find(str(name))
        except ValueError as e:
            return error(422, BadRequest("sd_model_checkpoint", str(e)).detail())
        load = Job(BatchKey(model=entry.title, mode="load"), [])
        try:
            queue.submit(load)
            await asyncio.wrap_future(load.future)  # loading happens in the worker, in turn
        except QueueFull as e:
            return error(429, str(e), {"Retry-After": str(e.retry_after)})
        except Exception as e:
            return error(500, f"could not load {entry.title}: {type(e).__name__}: {e}")
        catalog.current = entry.title
        return None

    return app


def _running_job(queue: BatchQueue) -> Job | None:
    batch = queue.running
    return batch.slices[0].job if batch is not None and batch.slices else None


def _png_base64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")
