"""``melter serve``: the Janus event handler endpoint, the jobs API, metrics.

One process, stateless apart from Redis: rooms, grace deadlines and pending renders live in
Redis (:mod:`melter.serve.tracker`), jobs in the farm's keys. A background thread checks grace
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
import math
import re
import threading
import time
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
from melter.farm.job import JobSpec, OutputSpec, Priority
from melter.farm.jobs import Farm
from melter.serve.config import Settings, load_settings
from melter.serve.metrics import FarmCollector
from melter.serve.rooms import parse_events
from melter.serve.tracker import Tracker

log = logging.getLogger("melter.serve")


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
    priority: Priority = Priority.MANUAL


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
                self.tracker.prerender_live()
                self.tracker.expire_rooms()
            except redis.RedisError as exc:
                log.warning("rooms: Redis unavailable (%s)", exc)
            except Exception:
                log.exception("rooms: pass failed")
            self.wake.wait(self.interval)
            self.wake.clear()

    def stop(self) -> None:
        self.stopping.set()
        self.wake.set()


class RateLimiter:
    """A token bucket per client address: ``rate`` requests a second, ``burst`` at once.

    Per process: each replica of the service limits what reaches it. The buckets of clients
    that went quiet are dropped, so many addresses cannot grow the table without bound."""

    def __init__(self, rate: float, burst: int, clients: int = 10_000) -> None:
        self.rate = rate
        self.burst = float(burst)
        self.clients = clients
        self.buckets: dict[str, tuple[float, float]] = {}  # client -> (tokens, at)
        self.lock = threading.Lock()
        self.refused = 0

    def take(self, client: str) -> float:
        """0 if the request may go on, else the seconds until it could."""
        if self.rate <= 0:
            return 0.0
        now = time.monotonic()
        with self.lock:
            tokens, at = self.buckets.get(client, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            if tokens < 1:
                self.buckets[client] = (tokens, now)
                return (1 - tokens) / self.rate
            self.buckets[client] = (tokens - 1, now)
            if len(self.buckets) > self.clients:
                full = self.burst / self.rate
                self.buckets = {c: v for c, v in self.buckets.items() if now - v[1] < full}
            return 0.0


async def read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused (413) as soon as it passes ``limit`` bytes: never held
    whole when too large, whatever Content-Length says."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body of {int(declared)} bytes; at most {limit} "
                            "(MELTER_JANUS_MAX_BODY_BYTES)")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"body over {limit} bytes "
                                "(MELTER_JANUS_MAX_BODY_BYTES)")
        chunks.append(chunk)
    return b"".join(chunks)


def inflate(body: bytes, limit: int) -> bytes:
    """A zlib or gzip body inflated, stopping at ``limit`` bytes (413): a small body can
    inflate a thousandfold, so its size says nothing about what it unpacks to."""
    inflater = zlib.decompressobj(wbits=47)
    try:
        out = inflater.decompress(body, limit + 1)
        if len(out) <= limit and not inflater.unconsumed_tail:
            out += inflater.flush()
    except zlib.error as exc:
        raise HTTPException(400, f"compressed body is damaged ({exc})") from None
    if len(out) > limit or inflater.unconsumed_tail:
        raise HTTPException(413, f"body inflates past {limit} bytes "
                            "(MELTER_JANUS_MAX_INFLATED_BYTES)")
    if not inflater.eof:
        raise HTTPException(400, "compressed body is cut short")
    return out


_STRINGS = re.compile(rb'"(?:[^"\\]|\\.)*"', re.S)
_BRACKETS = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def parse_json(body: bytes, max_depth: int, max_events: int) -> Any:
    """The body's JSON, after checking (without building anything) that its nesting is at
    most ``max_depth`` deep (400) and that it holds at most 32 arrays and objects per
    allowed event (413): the parser recurses, and each container costs memory."""
    if not body.strip():
        return []
    brackets = _STRINGS.sub(b"", body).translate(_BRACKETS, _NOT_BRACKETS)
    # Each pass removes every empty pair, so after k passes only what nests deeper than k
    # levels is left; bytes.replace runs at memory speed, a bracket-by-bracket count does not.
    rest = brackets
    for _ in range(max_depth):
        shorter = rest.replace(b"[]", b"")
        if len(shorter) == len(rest):
            break
        rest = shorter
    if b"[]" in rest:
        raise HTTPException(400, f"JSON nested deeper than {max_depth} levels "
                            "(MELTER_JANUS_MAX_JSON_DEPTH); Janus's events are 5 deep")
    opened = brackets.count(b"[")
    if opened > 32 * max_events:
        raise HTTPException(413, f"{opened} arrays and objects in one POST; at most "
                            f"{32 * max_events} (32 per event, MELTER_JANUS_MAX_EVENTS)")
    try:
        return json.loads(body)
    except (ValueError, RecursionError):
        raise HTTPException(400, "not JSON: expected one Janus event or an array of "
                            "them") from None


def unpack(body: bytes, limits: Any) -> Any:
    """The JSON of a POST from Janus, inflated first when compressed (sampleevh's
    ``compress = true``): in a worker thread, as inflating and parsing megabytes would hold up
    every other request."""
    if body[:1] in (b"\x78", b"\x1f"):  # a zlib or gzip header; JSON starts otherwise
        body = inflate(body, limits.max_inflated_bytes)
    return parse_json(body, limits.max_json_depth, limits.max_events)


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

    limiter = RateLimiter(settings.service.rate_limit, settings.service.rate_burst)
    registry.register(FarmCollector(farm, tracker, limiter))

    async def janus_gate(request: Request) -> None:
        """Rate limit first (so guessing passwords is limited too), then credentials."""
        client = request.client.host if request.client else "?"
        wait = limiter.take(client)
        if wait > 0:
            limiter.refused += 1
            raise HTTPException(429, f"too many requests from {client}: at most "
                                f"{settings.service.rate_limit:g} per second "
                                "(MELTER_JANUS_RATE_LIMIT, MELTER_JANUS_RATE_BURST)",
                                {"Retry-After": str(max(1, math.ceil(wait)))})
        service = settings.service
        if not service.janus_auth:
            return
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic" and service.janus_user:
            try:
                given_user, _, given_password = base64.b64decode(
                    value, validate=True).decode().partition(":")
            except (binascii.Error, UnicodeDecodeError):
                given_user = given_password = ""
            ok_user = hmac.compare_digest(given_user.encode(), service.janus_user.encode())
            ok_password = hmac.compare_digest(given_password.encode(),
                                              (service.janus_password or "").encode())
            if ok_user and ok_password:
                return
        if scheme.lower() == "bearer" and service.janus_token and hmac.compare_digest(
                value.strip().encode(), service.janus_token.encode()):
            return
        raise HTTPException(401, "Janus events need credentials: set backend_user and "
                            "backend_pwd in janus.eventhandler.sampleevh.jcfg to "
                            "MELTER_JANUS_USER and MELTER_JANUS_PASSWORD (or send "
                            "'Authorization: Bearer <MELTER_JANUS_TOKEN>')",
                            {"WWW-Authenticate": 'Basic realm="melter"'})

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

    @app.post("/janus/events", tags=["janus"], dependencies=[Depends(janus_gate)])
    async def janus_events(request: Request) -> dict[str, Any]:
        """Janus's sample event handler posts here: one event or a JSON array of them.
        VideoRoom events move the rooms; everything else is ignored. Bodies, their inflated
        size, their nesting and their number of events are bounded (413, 400), and each event
        is checked before it reaches a room."""
        limits = settings.service
        body = await read_body(request, limits.max_body_bytes)
        payload = await run_in_threadpool(unpack, body, limits)
        received = len(payload) if isinstance(payload, list) else 1
        if received > limits.max_events:
            raise HTTPException(413, f"{received} events in one POST; at most "
                                f"{limits.max_events} (MELTER_JANUS_MAX_EVENTS)")
        dropped: dict[str, int] = {}
        events = parse_events(payload, now=time.time(), skew=limits.clock_skew_seconds,
                              dropped=dropped)
        client = request.client.host if request.client else "?"
        ended = await run_in_threadpool(record, events, dropped, client)
        if ended:
            for thread in threads:
                if isinstance(thread, Background):
                    thread.wake.set()
        return {"received": received, "videoroom": len(events), "ended": ended,
                "dropped": dropped}

    def record(events: list[Any], dropped: dict[str, int], client: str) -> list[str]:
        if dropped:
            pipe = farm.store.r.pipeline(transaction=False)
            for reason, n in dropped.items():
                pipe.hincrby(f"{tracker.p}:stats", f"dropped_{reason}", n)
            pipe.execute()
            log.warning("janus events: dropped %s", dropped)
        return tracker.handle(events, client=client) if events else []

    @app.get("/rooms", tags=["rooms"], dependencies=[Depends(token)])
    def rooms() -> dict[str, Any]:
        """Rooms followed from Janus events, and the ones a pass failed on (with the error)."""
        return {"rooms": tracker.rooms(), "failed": tracker.failures(),
                "dropped_events": {k.removeprefix("dropped_"): v
                                   for k, v in tracker.stats().items()
                                   if k.startswith("dropped_")}}

    @app.get("/rooms/{room}", tags=["rooms"], dependencies=[Depends(token)])
    def room(room: str) -> dict[str, Any]:
        """One room's meetings and renders as the tracker holds them, and its last failure."""
        failure = tracker.failures().get(room)
        try:
            state = tracker.room(room)
        except (ValueError, TypeError, KeyError) as exc:
            return {"room": room, "meetings": None, "failed": failure,
                    "unreadable": f"{type(exc).__name__}: {exc}"}
        if state is None and failure is None:
            raise HTTPException(404, f"no room {room} (never seen, or expired after "
                                "MELTER_ROOM_TTL_SECONDS); GET /rooms lists the rooms")
        return {"room": room, "failed": failure,
                "meetings": None if state is None else json.loads(state.to_json())["meetings"]}

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
             limit: Annotated[int, Query(ge=1, le=1000)] = 50,
             prerender: Annotated[bool, Query(description="also the prerenders of meetings "
                                                        "going on")] = False,
             ) -> list[dict[str, Any]]:
        """The newest jobs first; ``room`` keeps the renders of one Janus room."""
        wide = room is not None or not prerender
        found = farm.jobs(limit=limit * 20 if wide else limit, state=state)
        if not prerender:
            found = [j for j in found if not j["spec"].get("prerender")]
        if room is not None:
            found = [j for j in found if str(j["spec"].get("room")) == room
                     or str(j["metadata"].get("room")) == room]
        return found[:limit]

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
