"""Status callbacks: every change of a job's state, POSTed to its ``callback_url``, signed,
delivered at least once, in order, and retried with back-off without holding up any render.

Every Lua script that can change a job's state ends with :data:`~melter.farm.note.NOTE` (see
:mod:`melter.farm.store`): when the job asked for callbacks and its state differs from the last
one noted, the change is appended to the job's outbox list ``P:cbq:<job>``. The head of each
job's list is in the sorted set ``P:outbox``, scored by when it is due. Deliverers (a thread in
every worker, and one in ``melter serve``) take due heads under a short claim (the score is
pushed into the future), POST them, and on success pop the head and make the next one due; on
failure the head is due again after ``callback_backoff_seconds * 2**(tries-1)`` (at most 10
minutes), and dropped after ``callback_attempts`` tries. One job's callbacks therefore arrive in
order; ``sequence`` numbers them, so a receiver can drop a repeat.

Each delivery has one overall deadline (``callback_timeout``, 10 s): connecting, sending and
reading the answer's status line together, enforced on the socket before every read and by a
watchdog that shuts the socket at the deadline, so a receiver trickling one byte every few
seconds cannot stretch it. Redirects are never followed (a 3xx is a failure: following one
would turn the POST into a request to wherever the receiver points). Deliveries run on a small
pool of threads (``callback_workers``), so one slow receiver holds up one slot, not every
other job's callbacks. ``callback_allow`` (``MELTER_CALLBACK_ALLOW``) limits the hosts: a
``callback_url`` elsewhere is refused at submit, and at delivery the connection goes only to
an address that was checked (a name resolved again to an internal address is refused).

What a caller of the API sees (the status's ``callback``) is ``delivered: HTTP <code>`` or
``failed: <short reason>``; every transport failure (refused, reset, unreachable, too slow, not
HTTP) reads the same, so the field does not tell which ports of an internal host answer. The
worker's log has the precise cause.

Signature: ``X-Melter-Signature: sha256=<hex>``, the HMAC-SHA256 under ``callback_secret`` of
``<X-Melter-Timestamp>.<raw body>``. The timestamp (Unix seconds) is signed with the body, so a
receiver that refuses old timestamps (:func:`verify`, five minutes) refuses replays.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

import redis

from melter.farm.allow import Allow, parse_allow, resolve
from melter.farm.config import FarmConfig
from melter.farm.job import iso
from melter.farm.note import NOTE
from melter.farm.store import Store

log = logging.getLogger("melter.farm.callbacks")

SIGNATURE_HEADER = "X-Melter-Signature"
TIMESTAMP_HEADER = "X-Melter-Timestamp"
DELIVERY_HEADER = "X-Melter-Delivery"
MAX_BACKOFF = 600.0

_NOTE_ONLY = NOTE + "melter_note(ARGV[1], ARGV[2])\nreturn 1\n"

_CLAIM = r"""
local P, now, hold, limit = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local due = redis.call('ZRANGEBYSCORE', P .. ':outbox', '-inf', now, 'LIMIT', 0, limit)
local out = {}
for _, id in ipairs(due) do
  local head = redis.call('LINDEX', P .. ':cbq:' .. id, 0)
  if head then
    redis.call('ZADD', P .. ':outbox', now + hold, id)
    table.insert(out, id)
    table.insert(out, head)
  else
    redis.call('ZREM', P .. ':outbox', id)
  end
end
return out
"""

# Settle the head with sequence ARGV[3]: 'done' pops it (the next one becomes due now),
# 'retry' stores the new head and makes it due at ARGV[5].
_SETTLE = r"""
local P, id, seq, outcome, due, entry = ARGV[1], ARGV[2], tonumber(ARGV[3]), ARGV[4],
  tonumber(ARGV[5]), ARGV[6]
local q = P .. ':cbq:' .. id
local head = redis.call('LINDEX', q, 0)
if not head or cjson.decode(head).sequence ~= seq then return 0 end
if outcome == 'retry' then
  redis.call('LSET', q, 0, entry)
  redis.call('ZADD', P .. ':outbox', due, id)
  return 1
end
redis.call('LPOP', q)
if redis.call('LLEN', q) > 0 then
  redis.call('ZADD', P .. ':outbox', due, id)
else
  redis.call('ZREM', P .. ':outbox', id)
end
return 1
"""


def sign(secret: str, timestamp: str, body: bytes) -> str:
    """The ``X-Melter-Signature`` value for ``body`` sent at ``timestamp``."""
    mac = hmac.new(secret.encode(), timestamp.encode() + b"." + body, hashlib.sha256)
    return "sha256=" + mac.hexdigest()


def verify(secret: str, timestamp: str | None, body: bytes, signature: str | None,
           tolerance: float = 300.0, now: float | None = None) -> bool:
    """What a receiver checks: the signature, and a timestamp within ``tolerance`` seconds."""
    if not timestamp or not signature:
        return False
    try:
        sent = float(timestamp)
    except ValueError:
        return False
    if abs((time.time() if now is None else now) - sent) > tolerance:
        return False
    return hmac.compare_digest(sign(secret, timestamp, body), signature)


@dataclass
class Outcome:
    ok: bool
    detail: str
    permanent: bool = False


class _Refused(Exception):
    """The receiver's address is not on the allow-list (at delivery time)."""


class _Late(Exception):
    """The delivery's deadline passed."""


_STATUS = re.compile(rb"HTTP/\d(?:\.\d)? (\d{3})[ \r\n]")
#: Transport failures all read the same to API callers (see the module docstring).
NO_ANSWER = "no HTTP answer"


def _addresses(host: str, port: int, allow: Allow | None) -> list[tuple[Any, ...]]:
    infos = resolve(host, port)
    if allow is None or host in allow.names:
        return infos
    allowed = [info for info in infos if allow.address_allowed(str(info[4][0]))]
    if not allowed:
        raise _Refused(host)
    return allowed


def _exchange(url: str, headers: dict[str, str], body: bytes, deadline: float,
              allow: Allow | None) -> int:
    """POST ``body`` and return the answer's status code, all before ``deadline``
    (``time.monotonic``); only the status line is read."""
    parts = urlsplit(url)
    host = (parts.hostname or "").lower().rstrip(".")
    tls = parts.scheme == "https"
    port = parts.port or (443 if tls else 80)
    infos = _addresses(host, port, allow)
    sock: socket.socket | None = None
    error: OSError | None = None
    for family, kind, proto, _, address in infos:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _Late()
        candidate = socket.socket(family, kind, proto)
        try:
            candidate.settimeout(remaining)
            candidate.connect(address)
        except OSError as exc:
            candidate.close()
            error = exc
            continue
        sock = candidate
        break
    if sock is None:
        if isinstance(error, TimeoutError) or time.monotonic() >= deadline:
            raise _Late()
        raise error or OSError("no address")
    watchdog = threading.Timer(max(0.0, deadline - time.monotonic()), _shut, [sock])
    watchdog.daemon = True
    watchdog.start()
    try:
        if tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=host)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        netloc = parts.netloc.rpartition("@")[2]
        head = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = (f"POST {target} HTTP/1.1\r\nHost: {netloc}\r\n{head}"
                   f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        sock.sendall(request + body)
        answer = b""
        while b"\n" not in answer and len(answer) < 4096:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Late()
            sock.settimeout(remaining)
            chunk = sock.recv(1024)
            if not chunk:
                break
            answer += chunk
        if time.monotonic() >= deadline:
            raise _Late()
        match = _STATUS.match(answer)
        if match is None:
            raise OSError("the answer is not HTTP")
        return int(match.group(1))
    except TimeoutError:
        raise _Late() from None
    finally:
        watchdog.cancel()
        sock.close()


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class FarmState(Protocol):
    """What the outbox reads of a farm (:class:`melter.farm.jobs.Farm`)."""

    config: FarmConfig
    store: Store

    def status(self, job_id: str) -> dict[str, Any]: ...


class Outbox:
    """The callback outbox of one farm (its store and configuration)."""

    def __init__(self, farm: FarmState) -> None:
        self.farm = farm
        self.store = farm.store
        self.config = farm.config
        r = self.store.r
        self._note = r.register_script(_NOTE_ONLY)
        self._claim = r.register_script(_CLAIM)
        self._settle = r.register_script(_SETTLE)

    def note(self, job: str) -> None:
        """Queue a callback if the job's state changed since the last one (job creation)."""
        self._note(args=[self.store.p, job])

    def pending(self, job: str) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.store.r.lrange(f"{self.store.p}:cbq:{job}", 0, -1)]

    def depth(self) -> int:
        return int(self.store.r.zcard(f"{self.store.p}:outbox"))

    def claim(self, limit: int) -> list[tuple[str, dict[str, Any]]]:
        """Take up to ``limit`` due callbacks (their jobs held for twice the deadline, so no
        other deliverer sends the same one meanwhile)."""
        hold = self.config.callback_timeout * 2 + 5
        items = self._claim(args=[self.store.p, time.time(), hold, limit])
        return [(items[k], json.loads(items[k + 1])) for k in range(0, len(items), 2)]

    def deliver(self, job: str, entry: dict[str, Any]) -> int:
        """Deliver one claimed callback; 1 when the receiver took it."""
        try:
            return self._deliver(job, entry)
        except redis.RedisError:
            raise
        except Exception:  # one bad entry must not stop the others
            log.exception("job %s: callback %s failed", job, entry.get("sequence"))
            return 0

    def deliver_due(self, limit: int = 20) -> int:
        """Deliver the due callbacks once, one after the other; how many were taken."""
        return sum(self.deliver(job, entry) for job, entry in self.claim(limit))

    def _body(self, job: str, entry: dict[str, Any]) -> str:

        try:
            status: dict[str, Any] | None = self.farm.status(job)
        except Exception:
            status = None
        return json.dumps({
            "event": "job.state",
            "id": job,
            "state": entry["state"],
            "previous": entry.get("previous") or None,
            "sequence": entry["sequence"],
            "changed_at": iso(entry.get("at")),
            "job": status,
        })

    def _deliver(self, job: str, entry: dict[str, Any]) -> int:
        fields = self.store.job(job)
        spec = json.loads(fields.get("spec") or "{}")
        url = spec.get("callback_url")
        seq = entry["sequence"]
        if not url:  # the job's state expired: nothing to call
            self._settle(args=[self.store.p, job, seq, "done", time.time(), ""])
            return 0
        if "body" not in entry:  # the same bytes on every try
            entry["body"] = self._body(job, entry)
        outcome = self.post(url, entry["body"].encode(), f"{job}-{seq}")
        entry["tries"] = int(entry.get("tries", 0)) + 1
        label = f"{entry['state']} #{seq}"
        if outcome.ok:
            self._settle(args=[self.store.p, job, seq, "done", time.time(), ""])
            self.store.set_fields(job, {"callback": f"delivered: {outcome.detail}",
                                        "callback_detail": f"{label}: {outcome.detail}"})
            return 1
        if outcome.permanent or entry["tries"] >= self.config.callback_attempts:
            log.warning("job %s: callback %s given up after %d tries: %s", job, label,
                        entry["tries"], outcome.detail)
            self._settle(args=[self.store.p, job, seq, "done", time.time(), ""])
            self.store.set_fields(job, {
                "callback": f"failed: {outcome.detail}",
                "callback_detail": f"{label}: given up after {entry['tries']} tries: "
                                   f"{outcome.detail}"})
            return 0
        delay = min(MAX_BACKOFF,
                    self.config.callback_backoff_seconds * 2 ** (entry["tries"] - 1))
        log.info("job %s: callback %s failed (%s); retry in %.1f s", job, label,
                 outcome.detail, delay)
        self._settle(args=[self.store.p, job, seq, "retry", time.time() + delay,
                           json.dumps(entry)])
        self.store.set_fields(job, {"callback_detail": f"{label}: try {entry['tries']} "
                                                       f"failed: {outcome.detail}"})
        return 0

    def post(self, url: str, body: bytes, delivery: str) -> Outcome:
        """One delivery, within ``callback_timeout`` in all, never following a redirect."""
        timeout = self.config.callback_timeout
        deadline = time.monotonic() + timeout
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "User-Agent": "melter-callbacks",
                   TIMESTAMP_HEADER: timestamp, DELIVERY_HEADER: delivery}
        if self.config.callback_secret:
            headers[SIGNATURE_HEADER] = sign(self.config.callback_secret, timestamp, body)
        allow = parse_allow(self.config.callback_allow) if self.config.callback_allow else None
        try:
            code = _exchange(url, headers, body, deadline, allow)
        except _Refused:
            return Outcome(False, "host not allowed (MELTER_CALLBACK_ALLOW)", permanent=True)
        except _Late:
            log.info("callback %s to %s: no answer within %g s", delivery, url, timeout)
            return Outcome(False, f"{NO_ANSWER} within {timeout:g} s")
        except (OSError, ValueError, ssl.SSLError) as exc:
            log.info("callback %s to %s: %s", delivery, url, exc)
            return Outcome(False, f"{NO_ANSWER} within {timeout:g} s")
        if 200 <= code < 300:
            return Outcome(True, f"HTTP {code}")
        if 300 <= code < 400:
            return Outcome(False, f"HTTP {code}, redirects are not followed", permanent=True)
        # 4xx other than 408/425/429 will not change by sending again
        permanent = 400 <= code < 500 and code not in (408, 425, 429)
        return Outcome(False, f"HTTP {code}", permanent)


class Deliverer(threading.Thread):
    """Delivers a farm's callbacks in the background (workers and the service run one): this
    thread claims due callbacks, as many as there are free delivery threads, and hands them to
    that pool, so a receiver that answers slowly delays only its own job's next callback."""

    def __init__(self, farm: FarmState, interval: float = 0.5,
                 on_pass: Callable[[], None] | None = None,
                 workers: int | None = None) -> None:
        super().__init__(name="melter-callbacks", daemon=True)
        self.outbox = Outbox(farm)
        self.interval = interval
        self.on_pass = on_pass
        self.presence: str | None = None  # the worker's presence key, deleted at shutdown
        self.stopping = threading.Event()
        self.workers = workers or farm.config.callback_workers
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="melter-callback")
        self.busy = 0
        self._lock = threading.Lock()
        self._wake = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            self._wake.wait(self.interval)
            self._wake.clear()
            if self.stopping.is_set():
                break
            try:
                if self.on_pass is not None:
                    self.on_pass()
                with self._lock:
                    free = self.workers - self.busy
                if free <= 0:
                    continue
                for job, entry in self.outbox.claim(free):
                    with self._lock:
                        self.busy += 1
                    self.pool.submit(self._one, job, entry)
            except redis.RedisError as exc:
                log.warning("callbacks: Redis unavailable (%s)", exc)
            except Exception:
                log.exception("callback pass failed")

    def _one(self, job: str, entry: dict[str, Any]) -> None:
        try:
            self.outbox.deliver(job, entry)
        except redis.RedisError as exc:
            log.warning("callbacks: Redis unavailable (%s)", exc)
        finally:
            with self._lock:
                self.busy -= 1
            self._wake.set()  # the job's next callback may be due now

    def stop(self) -> None:
        self.stopping.set()
        self._wake.set()
        self.pool.shutdown(wait=False, cancel_futures=True)
