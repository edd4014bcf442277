"""Status callbacks: every change of a job's state, POSTed to its ``callback_url``, signed,
delivered at least once, in order, and retried with back-off without holding up any render.

Every Lua script that can change a job's state ends with :data:`NOTE` (see
:mod:`melter.farm.store`): when the job asked for callbacks and its state differs from the last
one noted, the change is appended to the job's outbox list ``P:cbq:<job>``. The head of each
job's list is in the sorted set ``P:outbox``, scored by when it is due. Deliverers (a thread in
every worker, and one in ``melter serve``) take due heads under a short claim (the score is
pushed into the future), POST them, and on success pop the head and make the next one due; on
failure the head is due again after ``callback_backoff_seconds * 2**(tries-1)`` (at most 10
minutes), and dropped after ``callback_attempts`` tries. One job's callbacks therefore arrive in
order; ``sequence`` numbers them, so a receiver can drop a repeat.

Signature: ``X-Melter-Signature: sha256=<hex>``, the HMAC-SHA256 under ``callback_secret`` of
``<X-Melter-Timestamp>.<raw body>``. The timestamp (Unix seconds) is signed with the body, so a
receiver that refuses old timestamps (:func:`verify`, five minutes) refuses replays.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import redis

log = logging.getLogger("melter.farm.callbacks")

SIGNATURE_HEADER = "X-Melter-Signature"
TIMESTAMP_HEADER = "X-Melter-Timestamp"
DELIVERY_HEADER = "X-Melter-Delivery"
MAX_BACKOFF = 600.0

#: Lua, run at the end of each state-changing script: queue a callback for a changed state.
NOTE = r"""
local function melter_note(P, id)
  local jkey = P .. ':job:' .. id
  local f = redis.call('HMGET', jkey, 'notify', 'state', 'notified')
  if f[1] ~= '1' or not f[2] or f[2] == f[3] then return end
  redis.call('HSET', jkey, 'notified', f[2])
  local seq = redis.call('HINCRBY', jkey, 'notify_seq', 1)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
  local q = P .. ':cbq:' .. id
  local n = redis.call('RPUSH', q, cjson.encode({sequence = seq, state = f[2],
    previous = f[3] or '', at = now, tries = 0}))
  redis.call('EXPIRE', q, 86400 * 30)
  if n == 1 then redis.call('ZADD', P .. ':outbox', now, id) end
end
"""


def with_note(source: str) -> str:
    """A store script that also notes a state change of the job ``ARGV[2]``."""
    return (NOTE + "local function melter_body()\n" + source + "\nend\n"
            "local melter_result = melter_body()\nmelter_note(ARGV[1], ARGV[2])\n"
            "return melter_result\n")


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


class Outbox:
    """The callback outbox of one farm (its store and configuration)."""

    def __init__(self, farm: Any) -> None:
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

    def deliver_due(self, limit: int = 20) -> int:
        """Deliver the due callbacks once; how many were sent successfully."""
        hold = self.config.callback_timeout * 2 + 5
        items = self._claim(args=[self.store.p, time.time(), hold, limit])
        sent = 0
        for k in range(0, len(items), 2):
            job, entry = items[k], json.loads(items[k + 1])
            try:
                sent += self._deliver(job, entry)
            except redis.RedisError:
                raise
            except Exception:  # one bad entry must not stop the others
                log.exception("job %s: callback %s failed", job, entry.get("sequence"))
        return sent

    def _body(self, job: str, entry: dict[str, Any]) -> str:
        from melter.farm.service import iso

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
            self.store.set_fields(job, {"callback": outcome.detail,
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
        timestamp = str(int(time.time()))
        headers = {"Content-Type": "application/json", "User-Agent": "melter-callbacks",
                   TIMESTAMP_HEADER: timestamp, DELIVERY_HEADER: delivery}
        if self.config.callback_secret:
            headers[SIGNATURE_HEADER] = sign(self.config.callback_secret, timestamp, body)
        request = urllib.request.Request(url, data=body, method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.config.callback_timeout) as reply:
                return Outcome(True, str(reply.status))
        except urllib.error.HTTPError as exc:
            # 4xx other than 408/429 will not change by sending again
            permanent = 400 <= exc.code < 500 and exc.code not in (408, 425, 429)
            return Outcome(False, f"HTTP {exc.code}", permanent)
        except (OSError, ValueError) as exc:
            return Outcome(False, f"error: {exc}")


class Deliverer(threading.Thread):
    """Delivers a farm's callbacks in the background (workers and the service run one)."""

    def __init__(self, farm: Any, interval: float = 0.5, on_pass: Any = None) -> None:
        super().__init__(name="melter-callbacks", daemon=True)
        self.outbox = Outbox(farm)
        self.interval = interval
        self.on_pass = on_pass
        self.presence: str | None = None  # the worker's presence key, deleted at shutdown
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            try:
                if self.on_pass is not None:
                    self.on_pass()
                while self.outbox.deliver_due():
                    pass
            except redis.RedisError as exc:
                log.warning("callbacks: Redis unavailable (%s)", exc)
            except Exception:
                log.exception("callback pass failed")

    def stop(self) -> None:
        self.stopping.set()
