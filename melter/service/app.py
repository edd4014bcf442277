"""``melter serve``: the Janus event handler endpoint, the jobs API, metrics.

One process, stateless apart from Redis: rooms, grace deadlines and pending renders live in
Redis (:mod:`melter.service.tracker`), jobs in the farm's keys. A background thread checks grace
deadlines and submits decided renders every ``tick_seconds``; another delivers status callbacks.
Errors are JSON ``{"error": "..."}`` with a sentence a person can act on, never a traceback.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hmac
import json
import logging
import threading
import zlib
from collections.abc import AsyncIterator
from typing import Annotated, Any

import redis
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import CollectorRegistry
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from melter.errors import MelterError
from melter.farm.callbacks import Deliverer
from melter.farm.job import JobSpec, OutputSpec
from melter.farm.service import Farm
from melter.service.config import Settings, load_settings
from melter.service.metrics import FarmCollector
from melter.service.rooms import parse_events
from melter.service.tracker import Tracker

log = logging.getLogger("melter.service")


BEARER = HTTPBearer(auto_error=False, description="MELTER_API_TOKEN")


class Rerender(BaseModel):
    """Render a job's meeting again, beside the first version."""

    model_config = ConfigDict(extra="forbid")

    layout: str | dict[str, Any] | None = Field(
        None, description="another layout (built-in name, YAML file under the storage root, "
        "or a layout document); default: the job's")
    preset: str | None = Field(None, description="another preset for every output")
    outputs: list[OutputSpec] | None = Field(
        None, description="other outputs; default: the job's, as <name>.v2.<ext>, .v3…")
    callback_url: str | None = None
    priority: str = Field("manual", pattern="^(auto|manual)$")


class Background(threading.Thread):
    """Grace deadlines and pending submissions, every ``tick_seconds`` (or when woken)."""

    def __init__(self, tracker: Tracker, interval: float) -> None:
        super().__init__(name="melter-rooms", daemon=True)
        self.tracker = tracker
        self.interval = interval
        self.wake = threading.Event()
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self.tracker.tick()
                self.tracker.submit_pending()
            except redis.RedisError as exc:
                log.warning("rooms: Redis unavailable (%s)", exc)
            except Exception:
                log.exception("rooms: pass failed")
            self.wake.wait(self.interval)
            self.wake.clear()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": " ".join(message.split())}, status_code=status,
                        headers=headers)


def create_app(settings: Settings | None = None, background: bool = True) -> FastAPI:
    """The service for ``settings`` (default: from the environment and the file)."""
    settings = settings or load_settings()
    farm = Farm(settings.farm)
    tracker = Tracker(settings, farm)
    threads: list[Any] = []

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if background:
            threads.extend([Background(tracker, settings.service.tick_seconds), Deliverer(farm)])
            for thread in threads:
                thread.start()
        yield
        for thread in threads:
            thread.stop()

    app = FastAPI(title="Melter", version="1", lifespan=lifespan,
                  description="Automatic and requested renders of Janus VideoRoom meetings.")
    app.state.settings = settings
    app.state.farm = farm
    app.state.tracker = tracker
    registry = CollectorRegistry(auto_describe=False)
    registry.register(FarmCollector(farm, tracker))

    # -- errors ------------------------------------------------------------------------------
    @app.exception_handler(HTTPException)
    async def _http(_: Request, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'][1:] if p != 'body') or 'body'}: {e['msg']}"
            for e in exc.errors())
        return _error(422, f"invalid request: {problems}")

    @app.exception_handler(redis.RedisError)
    async def _redis(_: Request, exc: redis.RedisError) -> JSONResponse:
        return _error(503, f"Redis unavailable ({exc}); check MELTER_BROKER_URL and that "
                      "Redis runs")

    @app.exception_handler(MelterError)
    async def _melter(_: Request, exc: MelterError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(Exception)
    async def _other(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error(500, f"internal error ({type(exc).__name__}); the service log has "
                      "the details")

    # -- auth --------------------------------------------------------------------------------
    def token(credentials: Annotated[HTTPAuthorizationCredentials | None,
                                     Depends(BEARER)]) -> None:
        expected = settings.service.api_token
        if not expected:
            raise HTTPException(503, "the jobs API is off: set MELTER_API_TOKEN (or api_token "
                                "in [service]) and restart the service")
        challenge = {"WWW-Authenticate": "Bearer"}
        if credentials is None:
            raise HTTPException(401, "missing token: send 'Authorization: Bearer "
                                "<MELTER_API_TOKEN>'", challenge)
        if not hmac.compare_digest(credentials.credentials.encode(), expected.encode()):
            raise HTTPException(401, "invalid token: use the service's MELTER_API_TOKEN",
                                challenge)

    def janus_auth(request: Request) -> None:
        user, password = settings.service.janus_user, settings.service.janus_password
        if not user:
            return
        challenge = {"WWW-Authenticate": 'Basic realm="melter"'}
        header = request.headers.get("authorization", "")
        given_user = given_password = ""
        try:
            scheme, _, value = header.partition(" ")
            given_user, _, given_password = base64.b64decode(value).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            scheme = ""
        if scheme.lower() != "basic" or not (
                hmac.compare_digest(given_user.encode(), user.encode())
                and hmac.compare_digest(given_password.encode(), (password or "").encode())):
            raise HTTPException(401, "Janus events need basic auth: set backend_user and "
                                "backend_pwd in janus.eventhandler.sampleevh.jcfg to "
                                "MELTER_JANUS_USER and MELTER_JANUS_PASSWORD", challenge)

    Auth = Depends(token)

    # -- service -----------------------------------------------------------------------------
    @app.get("/healthz", tags=["service"])
    def healthz() -> dict[str, Any]:
        """Alive, and Redis answers."""
        try:
            ok = bool(farm.store.r.ping())
        except redis.RedisError as exc:
            raise HTTPException(503, f"Redis unavailable ({exc})") from None
        return {"ok": ok}

    @app.get("/metrics", tags=["service"], response_class=Response)
    def metrics() -> Response:
        """Prometheus metrics: jobs by state, render seconds, queue depth, workers."""
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/janus/events", tags=["janus"], dependencies=[Depends(janus_auth)])
    async def janus_events(request: Request) -> dict[str, Any]:
        """Janus's sample event handler posts here: one event or a JSON array of them.
        VideoRoom events move the rooms; everything else is ignored."""
        body = await request.body()
        try:
            payload = json.loads(body) if body.strip() else []
        except ValueError:
            payload = None
        if payload is None:
            with contextlib.suppress(zlib.error, ValueError):  # sampleevh's "compress = true"
                payload = json.loads(zlib.decompress(body, wbits=47))
        if payload is None:
            raise HTTPException(400, "not JSON: expected one Janus event or an array of "
                                "them") from None
        events = parse_events(payload)
        ended = await run_in_threadpool(tracker.handle, events) if events else []
        if ended:
            for thread in threads:
                if isinstance(thread, Background):
                    thread.wake.set()
        return {"received": len(payload) if isinstance(payload, list) else 1,
                "videoroom": len(events), "ended": ended}

    # -- jobs --------------------------------------------------------------------------------
    def status_or_404(job_id: str) -> dict[str, Any]:
        try:
            return farm.status(job_id)
        except MelterError:
            raise HTTPException(404, f"no job {job_id} (unknown, or expired after "
                                "MELTER_JOB_TTL_DAYS); GET /jobs lists the jobs") from None

    @app.post("/jobs", tags=["jobs"], status_code=201, dependencies=[Auth])
    def submit(spec: JobSpec) -> dict[str, Any]:
        """Queue a render. Paths are under MELTER_STORAGE_ROOT (relative ones from it)."""
        job_id = farm.submit(spec)
        return farm.status(job_id)

    @app.get("/jobs", tags=["jobs"], dependencies=[Auth])
    def jobs(room: Annotated[str | None, Query(description="Janus room")] = None,
             state: Annotated[str | None, Query()] = None,
             limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> list[dict[str, Any]]:
        """The newest jobs first; ``room`` keeps the renders of one Janus room."""
        found = farm.jobs(limit=limit * 20 if room else limit, state=state)
        if room is not None:
            found = [j for j in found if str(j["spec"].get("room")) == room
                     or str(j["metadata"].get("room")) == room][:limit]
        return found

    @app.get("/jobs/{job_id}", tags=["jobs"], dependencies=[Auth])
    def job(job_id: str) -> dict[str, Any]:
        """A job's state, progress, outputs and history."""
        return status_or_404(job_id)

    @app.delete("/jobs/{job_id}", tags=["jobs"], dependencies=[Auth])
    def cancel(job_id: str) -> dict[str, Any]:
        """Cancel a job (a running render stops within a second)."""
        status_or_404(job_id)
        result = farm.cancel(job_id)
        return {"id": job_id, "result": result, "state": farm.status(job_id)["state"]}

    @app.post("/jobs/{job_id}/rerender", tags=["jobs"], status_code=201, dependencies=[Auth])
    def rerender(job_id: str, request: Rerender | None = None) -> dict[str, Any]:
        """Render the same meeting again (another layout or preset): a new job, writing new
        versions beside the first outputs (``name.v2.mp4``)."""
        ask = request or Rerender()
        first = status_or_404(job_id)
        spec = JobSpec.model_validate(first["spec"])
        outputs = ask.outputs or [OutputSpec(path=o.path, preset=ask.preset or o.preset)
                                  for o in spec.outputs]
        again = spec.model_copy(update={
            "layout": ask.layout if ask.layout is not None else spec.layout,
            "outputs": outputs,
            "idempotency_key": None,
            "priority": ask.priority,
            "callback_url": ask.callback_url or spec.callback_url,
            "metadata": {**spec.metadata, "rerender_of": job_id},
        })
        # The same layout keeps the rule layouts read when the first job was submitted (its
        # file's relative names may not resolve from here).
        rules = (json.loads(farm.store.job(job_id).get("rule_layouts") or "{}")
                 if ask.layout is None else None)
        new_id = farm.submit(JobSpec.model_validate(again.model_dump()), rules)
        return {**farm.status(new_id), "rerender_of": job_id}

    @app.get("/layouts", tags=["jobs"], dependencies=[Auth])
    def layouts() -> dict[str, Any]:
        """Built-in layouts, and which layout each configured room renders with."""
        from melter.layout.model import builtin_names, load_layout

        return {
            "builtin": [{"name": n, "description": load_layout(n).description}
                        for n in builtin_names()],
            "rooms": {room: rule.model_dump(mode="json")
                      for room, rule in settings.service.rooms.items()},
            "default": settings.service.default.model_dump(mode="json"),
        }

    return app
