"""Job state in Redis, under Melter's own keys (never Celery's result backend).

A job is a set of *units* of work. Every job starts with one unit, ``main``: the worker that
takes it plans the meeting and either renders everything itself or, for a long meeting, adds
the chunk units (``v<k>.<i>`` video chunks, ``a<k>.<i>`` their audio, ``j<k>`` the join,
``r<k>`` an output rendered in one piece) and returns. A unit is ``waiting`` (a join before its
parts are done), ``queued``, ``running``, ``committing``, ``done``, ``failed`` or
``cancelled``.

Each time a unit is queued it gets a new *fencing token* (a Redis counter) and a Celery message
carrying it. Taking a unit (:meth:`Store.claim`) needs the message's token to be the unit's
current one and the unit to be queued, so a message delivered twice, or a stale one, starts
nothing. The running attempt holds a *lease* (a key with a time to live) that its heartbeat
renews; the sweeper every worker runs requeues units whose lease expired (their worker died),
with a new token, so a zombie attempt can neither renew its lease nor commit its output.

Keys (``P`` is the configured prefix)::

    P:job:<id>          hash: spec, outputs, state, stage, error, worker, attempts, times...
    P:unit:<id>:<unit>  hash: state, token, attempts, tries, worker, fraction, file...
    P:hist:<id>         list: one JSON record per finished attempt
    P:jobs              sorted set: job ids by submission time (``melter jobs``)
    P:running           set: "<id>|<unit>|<token>" of running attempts
    P:lease:<id>|<unit> string: the token of the attempt holding the lease (expires)
    P:dispatch          sorted set: "<id>|<unit>|<token>" messages to (re)send, by due time
    P:idem:<key>        string: job id of an idempotency key
    P:outpath:<path>    string: job id that reserved an output path
    P:seq               counter: fencing tokens
    P:cbq:<id>          list: the job's status callbacks still to deliver (melter.farm.callbacks)
    P:outbox            sorted set: job ids whose next callback is due, by due time
    P:counts, P:tally, P:expiring   the job counters (melter.farm.counts)
    P:worker:<name>     string: a live worker's presence (expires)
    P:workers           set: the presence keys, so live workers are counted without a scan
    P:part:<key>        string: "<id>|<unit>|<token>" of the unit rendering a kept chunk
    P:parts             sorted set: parts folders (kept chunks), by when one was last kept
    P:sweeper, P:sweeper:parts   the sweeps' locks (expire)

Every state change is one Lua script, so two workers, a sweeper and a ``melter cancel`` racing
each other see one order of events. The scripts name states and unit kinds through the enums of
:mod:`melter.farm.job` (:data:`~melter.farm.job.LUA_CONSTANTS`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from melter.errors import mask_secrets
from melter.farm.counts import READ, RECOUNT, RESTART, TALLY, Counts, counted
from melter.farm.job import LUA_CONSTANTS, UnitKind
from melter.farm.note import NOTE, with_note

# Shared Lua: record a finished attempt and decide what happens to its unit next.
# Needs locals: P, id, unit, token, now, err, outcome, delay, max, worker.
_END_ATTEMPT = r"""
local job = P .. ':job:' .. id
local ukey = P .. ':unit:' .. id .. ':' .. unit
local member = id .. '|' .. unit .. '|' .. token
redis.call('SREM', P .. ':running', member)
if redis.call('GET', P .. ':lease:' .. id .. '|' .. unit) == token then
  redis.call('DEL', P .. ':lease:' .. id .. '|' .. unit)
end
local u = redis.call('HMGET', ukey, 'attempts', 'tries', 'started', 'worker')
redis.call('RPUSH', P .. ':hist:' .. id, cjson.encode({
  unit = unit, attempt = tonumber(u[1]) or 0, token = tonumber(token), worker = u[4] or worker,
  started = tonumber(u[3]), ended = tonumber(now), outcome = outcome, error = err}))
redis.call('HSET', job, 'updated', now)
local jstate = redis.call('HGET', job, 'state')
if TERMINAL[jstate] then
  redis.call('HSET', ukey, 'state', UNIT.CANCELLED, 'finished', now)
  return {'stopped', jstate}
end
local tries = tonumber(u[2]) or 0
if delay < 0 or tries >= max then
  redis.call('HSET', ukey, 'state', UNIT.FAILED, 'finished', now, 'error', err)
  local summary = err
  if delay >= 0 then
    summary = err .. ' (after ' .. tries .. ' attempt' .. (tries == 1 and '' or 's') .. ')'
  end
  redis.call('HSET', job, 'state', JOB.FAILED, 'finished', now, 'error', summary,
             'stage', JOB.FAILED)
  local units = cjson.decode(redis.call('HGET', job, 'units') or '[]')
  for _, other in ipairs(units) do
    local okey = P .. ':unit:' .. id .. ':' .. other
    local o = redis.call('HMGET', okey, 'state', 'token')
    if o[1] == UNIT.QUEUED or o[1] == UNIT.WAITING then
      redis.call('HSET', okey, 'state', UNIT.CANCELLED)
      redis.call('ZREM', P .. ':dispatch', id .. '|' .. other .. '|' .. (o[2] or ''))
    end
  end
  return {'failed', summary}
end
local newtoken = tostring(redis.call('INCR', P .. ':seq'))
redis.call('HSET', ukey, 'state', UNIT.QUEUED, 'token', newtoken, 'fraction', 0, 'error', err,
           'stage', UNIT.QUEUED)
redis.call('ZADD', P .. ':dispatch', now + delay, id .. '|' .. unit .. '|' .. newtoken)
return {'retry', newtoken, tostring(now + delay)}
"""

_CLAIM = r"""
local P, id, unit, token, worker = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local now, lease = tonumber(ARGV[6]), tonumber(ARGV[7])
local job = P .. ':job:' .. id
local ukey = P .. ':unit:' .. id .. ':' .. unit
local state = redis.call('HGET', job, 'state')
if not state then return {'gone'} end
if TERMINAL[state] then return {'job ' .. state} end
local u = redis.call('HMGET', ukey, 'state', 'token')
if u[2] ~= token then return {'stale'} end
if u[1] ~= UNIT.QUEUED then return {'unit ' .. tostring(u[1])} end
local attempts = redis.call('HINCRBY', ukey, 'attempts', 1)
redis.call('HINCRBY', ukey, 'tries', 1)
redis.call('HSET', ukey, 'state', UNIT.RUNNING, 'worker', worker, 'started', now, 'fraction', 0,
           'stage', 'starting', 'updated', now)
redis.call('SET', P .. ':lease:' .. id .. '|' .. unit, token, 'PX', lease)
redis.call('SADD', P .. ':running', id .. '|' .. unit .. '|' .. token)
redis.call('ZREM', P .. ':dispatch', id .. '|' .. unit .. '|' .. token)
local most = tonumber(redis.call('HGET', job, 'attempts') or '0') or 0
if attempts > most then redis.call('HSET', job, 'attempts', attempts) end
redis.call('HSET', job, 'worker', worker, 'updated', now)
if not redis.call('HGET', job, 'started') then redis.call('HSET', job, 'started', now) end
if kind_of(unit) == KIND.JOIN then
  redis.call('HSET', job, 'state', JOB.JOINING, 'stage', JOB.JOINING)
elseif state == JOB.QUEUED then
  redis.call('HSET', job, 'state', JOB.RUNNING)
end
return {'ok', tostring(attempts)}
"""

_HEARTBEAT = r"""
local P, id, unit, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local lease, now, fraction, stage = tonumber(ARGV[5]), ARGV[6], ARGV[7], ARGV[8]
local ukey = P .. ':unit:' .. id .. ':' .. unit
local u = redis.call('HMGET', ukey, 'state', 'token')
if u[2] ~= token or (u[1] ~= UNIT.RUNNING and u[1] ~= UNIT.COMMITTING) then return 'lost' end
local lkey = P .. ':lease:' .. id .. '|' .. unit
local holder = redis.call('GET', lkey)
if holder and holder ~= token then return 'lost' end
-- An expired lease not yet swept is taken back: the unit is still this attempt's.
redis.call('SET', lkey, token, 'PX', lease)
redis.call('HSET', ukey, 'fraction', fraction, 'stage', stage, 'updated', now)
local job = P .. ':job:' .. id
local state = redis.call('HGET', job, 'state')
if state == JOB.CANCELLED or state == JOB.FAILED or not state then return 'cancelled' end
if redis.call('HGET', job, 'state') ~= JOB.JOINING then redis.call('HSET', job, 'stage', stage) end
return 'ok'
"""

_BEGIN_COMMIT = r"""
local P, id, unit, token = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local lease, now = tonumber(ARGV[5]), ARGV[6]
local ukey = P .. ':unit:' .. id .. ':' .. unit
local u = redis.call('HMGET', ukey, 'state', 'token')
if u[2] ~= token or (u[1] ~= UNIT.RUNNING and u[1] ~= UNIT.COMMITTING) then return 'lost' end
local lkey = P .. ':lease:' .. id .. '|' .. unit
if redis.call('GET', lkey) ~= token then return 'lost' end
local state = redis.call('HGET', P .. ':job:' .. id, 'state')
if state == JOB.CANCELLED or state == JOB.FAILED or not state then return 'cancelled' end
redis.call('SET', lkey, token, 'PX', lease)
redis.call('HSET', ukey, 'state', UNIT.COMMITTING, 'stage', UNIT.COMMITTING, 'updated', now)
return 'ok'
"""

_COMPLETE = r"""
local P, id, unit, token, now, file = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local grace, ttl, fields = tonumber(ARGV[7]), tonumber(ARGV[8]), cjson.decode(ARGV[9])
local job = P .. ':job:' .. id
local ukey = P .. ':unit:' .. id .. ':' .. unit
local u = redis.call('HMGET', ukey, 'state', 'token', 'attempts', 'started', 'worker')
if u[2] ~= token or u[1] ~= UNIT.COMMITTING then return {'lost'} end
redis.call('HSET', ukey, 'state', UNIT.DONE, 'finished', now, 'fraction', 1, 'file', file,
           'stage', UNIT.DONE)
redis.call('SREM', P .. ':running', id .. '|' .. unit .. '|' .. token)
redis.call('DEL', P .. ':lease:' .. id .. '|' .. unit)
redis.call('RPUSH', P .. ':hist:' .. id, cjson.encode({
  unit = unit, attempt = tonumber(u[3]) or 0, token = tonumber(token), worker = u[5],
  started = tonumber(u[4]), ended = tonumber(now), outcome = 'done'}))
for k, v in pairs(fields) do redis.call('HSET', job, k, v) end
redis.call('HSET', job, 'updated', now)
local jstate = redis.call('HGET', job, 'state')
if jstate == JOB.CANCELLED or jstate == JOB.FAILED then return {'stopped'} end
local units = cjson.decode(redis.call('HGET', job, 'units') or '[]')
local ready = {}
local all = true
for _, other in ipairs(units) do
  local okey = P .. ':unit:' .. id .. ':' .. other
  local o = redis.call('HMGET', okey, 'state', 'deps')
  if o[1] == UNIT.WAITING then
    local met = true
    for dep in string.gmatch(o[2] or '', '[^,]+') do
      if redis.call('HGET', P .. ':unit:' .. id .. ':' .. dep, 'state') ~= UNIT.DONE then
        met = false
      end
    end
    if met then
      local newtoken = tostring(redis.call('INCR', P .. ':seq'))
      redis.call('HSET', okey, 'state', UNIT.QUEUED, 'token', newtoken, 'stage', UNIT.QUEUED)
      redis.call('ZADD', P .. ':dispatch', now + grace, id .. '|' .. other .. '|' .. newtoken)
      table.insert(ready, other .. '|' .. newtoken)
    end
  end
  if o[1] ~= UNIT.DONE then all = false end
end
if all then
  redis.call('HSET', job, 'state', JOB.DONE, 'finished', now, 'stage', JOB.DONE)
  for _, other in ipairs(units) do
    redis.call('EXPIRE', P .. ':unit:' .. id .. ':' .. other, ttl)
  end
  redis.call('EXPIRE', job, ttl)
  redis.call('EXPIRE', P .. ':hist:' .. id, ttl)
  return {'done', unpack(ready)}
end
return {'ok', unpack(ready)}
"""

_EXPAND = r"""
local P, id, token, now, grace = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local spec, fields = cjson.decode(ARGV[6]), cjson.decode(ARGV[7])
local job = P .. ':job:' .. id
local ukey = P .. ':unit:' .. id .. ':' .. KIND.MAIN
local u = redis.call('HMGET', ukey, 'state', 'token', 'attempts', 'started', 'worker')
if u[2] ~= token or u[1] ~= UNIT.COMMITTING then return {'lost'} end
local names = {KIND.MAIN}
local out = {}
for _, item in ipairs(spec) do
  local key = P .. ':unit:' .. id .. ':' .. item.name
  table.insert(names, item.name)
  redis.call('DEL', key)
  redis.call('HSET', key, 'attempts', 0, 'tries', 0, 'fraction', 0, 'weight', item.weight,
             'deps', item.deps or '', 'first', item.first or '', 'last', item.last or '',
             'output', item.output)
  if item.deps and item.deps ~= '' then
    redis.call('HSET', key, 'state', UNIT.WAITING, 'token', '', 'stage', UNIT.WAITING)
  else
    local newtoken = tostring(redis.call('INCR', P .. ':seq'))
    redis.call('HSET', key, 'state', UNIT.QUEUED, 'token', newtoken, 'stage', UNIT.QUEUED)
    redis.call('ZADD', P .. ':dispatch', now + grace, id .. '|' .. item.name .. '|' .. newtoken)
    table.insert(out, item.name .. '|' .. newtoken)
  end
end
redis.call('HSET', ukey, 'state', UNIT.DONE, 'finished', now, 'fraction', 1, 'weight', 0,
           'stage', 'planned')
redis.call('SREM', P .. ':running', id .. '|' .. KIND.MAIN .. '|' .. token)
redis.call('DEL', P .. ':lease:' .. id .. '|' .. KIND.MAIN)
redis.call('RPUSH', P .. ':hist:' .. id, cjson.encode({
  unit = KIND.MAIN, attempt = tonumber(u[3]) or 0, token = tonumber(token), worker = u[5],
  started = tonumber(u[4]), ended = tonumber(now), outcome = 'planned'}))
redis.call('HSET', job, 'units', cjson.encode(names), 'stage', 'rendering chunks', 'updated', now)
for k, v in pairs(fields) do redis.call('HSET', job, k, v) end
return out
"""

_FAIL = r"""
local P, id, unit, token, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local err, outcome, delay, max, worker = ARGV[6], ARGV[7], tonumber(ARGV[8]), tonumber(ARGV[9]),
  ARGV[10]
local u = redis.call('HMGET', P .. ':unit:' .. id .. ':' .. unit, 'state', 'token')
if u[2] ~= token or (u[1] ~= UNIT.RUNNING and u[1] ~= UNIT.COMMITTING) then
  redis.call('SREM', P .. ':running', id .. '|' .. unit .. '|' .. token)
  return {'lost'}
end
""" + _END_ATTEMPT

_EXPIRE = r"""
local P, id, unit, token, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5])
local max = tonumber(ARGV[6])
local delay = 0
local outcome = 'lost'
local member = id .. '|' .. unit .. '|' .. token
if redis.call('EXISTS', P .. ':lease:' .. id .. '|' .. unit) == 1 then return {'alive'} end
local u = redis.call('HMGET', P .. ':unit:' .. id .. ':' .. unit, 'state', 'token', 'worker')
if u[2] ~= token or (u[1] ~= UNIT.RUNNING and u[1] ~= UNIT.COMMITTING) then
  redis.call('SREM', P .. ':running', member)
  return {'stale'}
end
local worker = u[3] or '?'
local err = 'worker ' .. worker .. ' lost (its lease expired)'
""" + _END_ATTEMPT

_CANCEL = r"""
local P, id, now = ARGV[1], ARGV[2], ARGV[3]
local job = P .. ':job:' .. id
local state = redis.call('HGET', job, 'state')
if not state then return {'gone'} end
if TERMINAL[state] then return {'ended', state} end
local units = cjson.decode(redis.call('HGET', job, 'units') or '[]')
for _, unit in ipairs(units) do
  if COMMITS[kind_of(unit)] and
      redis.call('HGET', P .. ':unit:' .. id .. ':' .. unit, 'state') == UNIT.COMMITTING then
    return {'committing'}
  end
end
redis.call('HSET', job, 'state', JOB.CANCELLED, 'cancel', 1, 'finished', now, 'updated', now,
           'error', JOB.CANCELLED, 'stage', JOB.CANCELLED)
local running = {}
for _, unit in ipairs(units) do
  local ukey = P .. ':unit:' .. id .. ':' .. unit
  local u = redis.call('HMGET', ukey, 'state', 'token')
  if u[1] == UNIT.QUEUED or u[1] == UNIT.WAITING then
    redis.call('HSET', ukey, 'state', UNIT.CANCELLED, 'finished', now)
    redis.call('ZREM', P .. ':dispatch', id .. '|' .. unit .. '|' .. (u[2] or ''))
  elseif u[1] == UNIT.RUNNING or u[1] == UNIT.COMMITTING then
    table.insert(running, unit)
  end
end
return {'cancelled', unpack(running)}
"""

_FINISH_CANCELLED = r"""
local P, id, unit, token, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local ukey = P .. ':unit:' .. id .. ':' .. unit
local u = redis.call('HMGET', ukey, 'state', 'token', 'attempts', 'started', 'worker')
redis.call('SREM', P .. ':running', id .. '|' .. unit .. '|' .. token)
if u[2] ~= token then return 'lost' end
if redis.call('GET', P .. ':lease:' .. id .. '|' .. unit) == token then
  redis.call('DEL', P .. ':lease:' .. id .. '|' .. unit)
end
redis.call('HSET', ukey, 'state', UNIT.CANCELLED, 'finished', now, 'stage', UNIT.CANCELLED)
redis.call('RPUSH', P .. ':hist:' .. id, cjson.encode({
  unit = unit, attempt = tonumber(u[3]) or 0, token = tonumber(token), worker = u[5],
  started = tonumber(u[4]), ended = tonumber(now), outcome = 'cancelled'}))
return 'ok'
"""

_RESET = r"""
local P, id, now, grace, ttl = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), tonumber(ARGV[5])
local job = P .. ':job:' .. id
local state = redis.call('HGET', job, 'state')
if not state then return {'gone'} end
if state ~= JOB.FAILED and state ~= JOB.CANCELLED then return {'state', state} end
local units = cjson.decode(redis.call('HGET', job, 'units') or '[]')
for _, unit in ipairs(units) do
  local s = redis.call('HGET', P .. ':unit:' .. id .. ':' .. unit, 'state')
  if s == UNIT.RUNNING or s == UNIT.COMMITTING then return {'busy', unit} end
end
for _, unit in ipairs(units) do redis.call('DEL', P .. ':unit:' .. id .. ':' .. unit) end
local token = tostring(redis.call('INCR', P .. ':seq'))
local ukey = P .. ':unit:' .. id .. ':' .. KIND.MAIN
redis.call('HSET', ukey, 'state', UNIT.QUEUED, 'token', token, 'attempts', 0, 'tries', 0,
           'fraction', 0, 'weight', 1, 'stage', UNIT.QUEUED, 'output', -1)
redis.call('HSET', job, 'state', JOB.QUEUED, 'stage', JOB.QUEUED, 'units',
           cjson.encode({KIND.MAIN}), 'updated', now, 'attempts', 0)
redis.call('HDEL', job, 'cancel', 'finished', 'error', 'started', 'worker', 'callback')
redis.call('PERSIST', job)
redis.call('PERSIST', P .. ':hist:' .. id)
redis.call('RPUSH', P .. ':hist:' .. id, cjson.encode({unit = 'job', outcome = 'retried',
  ended = tonumber(now), previous = state}))
redis.call('ZADD', P .. ':dispatch', now + grace, id .. '|' .. KIND.MAIN .. '|' .. token)
return {'ok', token}
"""

# ARGV: P, created (Unix seconds), due (of the first dispatch), then per job its id and its
# fields as a JSON array [name, value, ...].
_CREATE = r"""
local P, now, due = ARGV[1], ARGV[2], ARGV[3]
local tokens = {}
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  local job = P .. ':job:' .. id
  local token = tostring(redis.call('INCR', P .. ':seq'))
  local fields = cjson.decode(ARGV[i + 1])
  for _, item in ipairs({'state', JOB.QUEUED, 'stage', JOB.QUEUED, 'created', now,
                         'updated', now, 'units', cjson.encode({KIND.MAIN}), 'attempts', '0'}) do
    table.insert(fields, item)
  end
  redis.call('HSET', job, unpack(fields))
  redis.call('HSET', P .. ':unit:' .. id .. ':' .. KIND.MAIN, 'state', UNIT.QUEUED,
             'token', token, 'attempts', '0', 'tries', '0', 'fraction', '0', 'weight', '1',
             'stage', UNIT.QUEUED, 'output', '-1')
  redis.call('ZADD', P .. ':jobs', now, id)
  redis.call('ZADD', P .. ':dispatch', due, id .. '|' .. KIND.MAIN .. '|' .. token)
  melter_recount(P, id)
  melter_note(P, id)
  table.insert(tokens, token)
end
return tokens
"""

_EXPIRE_FINISHED = r"""
local P, id, ttl = ARGV[1], ARGV[2], ARGV[3]
local job = P .. ':job:' .. id
for _, unit in ipairs(cjson.decode(redis.call('HGET', job, 'units') or '[]')) do
  redis.call('EXPIRE', P .. ':unit:' .. id .. ':' .. unit, ttl)
end
redis.call('EXPIRE', job, ttl)
redis.call('EXPIRE', P .. ':hist:' .. id, ttl)
return 1
"""

# Live workers: those whose presence key (in the set P:workers) has not expired.
_WORKERS = r"""
local P = ARGV[1]
local live = 0
for _, key in ipairs(redis.call('SMEMBERS', P .. ':workers')) do
  if redis.call('EXISTS', key) == 1 then
    live = live + 1
  else
    redis.call('SREM', P .. ':workers', key)
  end
end
return live
"""


class LeaseLost(Exception):
    """This attempt no longer holds its unit (its lease expired and the unit was requeued)."""


class JobCancelled(Exception):
    """The job was cancelled (or failed elsewhere) while this attempt ran."""


@dataclass(frozen=True)
class Dispatch:
    job: str
    unit: str
    token: str


class Store:
    """Melter's keys in one Redis database."""

    def __init__(self, client: redis.Redis, prefix: str) -> None:
        # decode_responses=True: every reply is str (redis-py's types cannot say so).
        self.r: Any = client
        self.p = prefix
        # Scripts that can change a job's state also queue its status callback (one order of
        # events: the callback outbox sees each state the job had, see melter.farm.callbacks)
        # and move the job counters by the change (melter.farm.counts).
        self._scripts = {
            name: client.register_script(
                with_note(LUA_CONSTANTS + counted(source)) if noted else LUA_CONSTANTS + source)
            for name, source, noted in (
                ("claim", _CLAIM, True), ("heartbeat", _HEARTBEAT, False),
                ("begin_commit", _BEGIN_COMMIT, False), ("complete", _COMPLETE, True),
                ("expand", _EXPAND, True), ("fail", _FAIL, True), ("expire", _EXPIRE, True),
                ("cancel", _CANCEL, True), ("finish_cancelled", _FINISH_CANCELLED, True),
                ("reset", _RESET, True),
            )
        }
        self._create = client.register_script(NOTE + LUA_CONSTANTS + TALLY + _CREATE)
        self._expire_finished = client.register_script(
            LUA_CONSTANTS + counted(_EXPIRE_FINISHED))
        self._recount = client.register_script(LUA_CONSTANTS + RECOUNT)
        self._read_counts = client.register_script(LUA_CONSTANTS + READ)
        self._restart_counts = client.register_script(RESTART)
        self._workers = client.register_script(_WORKERS)

    @classmethod
    def from_url(cls, url: str, prefix: str) -> Store:
        client = redis.Redis.from_url(url, decode_responses=True, socket_timeout=10,
                                      socket_connect_timeout=5, health_check_interval=15)
        return cls(client, prefix)

    # -- keys --------------------------------------------------------------------------------
    def job_key(self, job: str) -> str:
        return f"{self.p}:job:{job}"

    def unit_key(self, job: str, unit: str) -> str:
        return f"{self.p}:unit:{job}:{unit}"

    def _run(self, name: str, *args: object) -> Any:
        return self._scripts[name](args=[self.p, *[str(a) for a in args]])

    # -- submission --------------------------------------------------------------------------
    def idempotent(self, key: str, job: str, ttl: int) -> str | None:
        """Bind ``key`` to ``job``; the job it was already bound to, if any."""
        name = f"{self.p}:idem:{key}"
        if self.r.set(name, job, nx=True, ex=ttl):
            return None
        return self.r.get(name) or None

    def release_idempotency(self, key: str, job: str) -> None:
        name = f"{self.p}:idem:{key}"
        if self.r.get(name) == job:
            self.r.delete(name)

    def reserve_output(self, path: str, job: str, ttl: int) -> bool:
        return bool(self.r.set(f"{self.p}:outpath:{path}", job, nx=True, ex=ttl))

    def output_owner(self, path: str) -> str | None:
        """The job that reserved output path ``path``, if any."""
        owner: str | None = self.r.get(f"{self.p}:outpath:{path}")
        return owner

    def create(self, job: str, fields: dict[str, str], now: float, grace: float) -> Dispatch:
        return self.create_many([(job, fields)], now, grace)[0]

    def create_many(self, jobs: Iterable[tuple[str, dict[str, str]]], now: float, grace: float,
                    batch: int = 500) -> list[Dispatch]:
        """Store new queued jobs (``(id, fields)``), ``batch`` to a script: one job's keys,
        its first dispatch, its count and its callback are written together."""
        out: list[Dispatch] = []
        args: list[str] = []

        def flush() -> None:
            tokens = self._create(args=[self.p, repr(now), repr(now + grace), *args])
            ids = args[::2]
            out.extend(Dispatch(job, UnitKind.MAIN.value, token)
                       for job, token in zip(ids, tokens, strict=True))
            args.clear()

        for job, fields in jobs:
            flat: list[str] = []
            for name, value in fields.items():
                flat += [name, value if isinstance(value, str) else repr(value)]
            args += [job, json.dumps(flat)]
            if len(args) >= 2 * batch:
                flush()
        if args:
            flush()
        return out

    # -- attempts ----------------------------------------------------------------------------
    def claim(self, job: str, unit: str, token: str, worker: str, lease_s: float) -> tuple[
            bool, str]:
        result = self._run("claim", job, unit, token, worker, time.time(), int(lease_s * 1000))
        return result[0] == "ok", (result[1] if result[0] == "ok" else result[0])

    def heartbeat(self, job: str, unit: str, token: str, lease_s: float, fraction: float,
                  stage: str) -> str:
        return str(self._run("heartbeat", job, unit, token, int(lease_s * 1000), time.time(),
                             f"{fraction:.5f}", stage))

    def begin_commit(self, job: str, unit: str, token: str, lease_s: float) -> None:
        result = self._run("begin_commit", job, unit, token, int(lease_s * 1000), time.time())
        if result == "lost":
            raise LeaseLost(f"{job} {unit}: lease lost before commit")
        if result == "cancelled":
            raise JobCancelled(job)

    def complete(self, job: str, unit: str, token: str, file: str, grace: float, ttl: int,
                 fields: dict[str, str] | None = None) -> tuple[str, list[Dispatch]]:
        result = self._run("complete", job, unit, token, time.time(), file, grace, ttl,
                           json.dumps(fields or {}))
        if result[0] == "lost":
            raise LeaseLost(f"{job} {unit}: lease lost at commit")
        return result[0], self._dispatches(job, result[1:])

    def expand(self, job: str, token: str, units: list[dict[str, Any]], grace: float,
               fields: dict[str, str]) -> list[Dispatch]:
        result = self._run("expand", job, token, time.time(), grace, json.dumps(units),
                           json.dumps(fields))
        if result and result[0] == "lost":
            raise LeaseLost(f"{job} main: lease lost at planning")
        return self._dispatches(job, result)

    def fail(self, job: str, unit: str, token: str, error: str, delay: float, max_attempts: int,
             worker: str, outcome: str = "failed") -> list[str]:
        """Record a failed attempt: ``['retry', token, due]``, ``['failed', error]``, …"""
        return list(self._run("fail", job, unit, token, time.time(), mask_secrets(error),
                              outcome, delay, max_attempts, worker))

    def expire(self, job: str, unit: str, token: str, max_attempts: int) -> list[str]:
        return list(self._run("expire", job, unit, token, time.time(), max_attempts))

    def cancel(self, job: str) -> tuple[str, list[str]]:
        result = self._run("cancel", job, time.time())
        return result[0], list(result[1:])

    def finish_cancelled(self, job: str, unit: str, token: str) -> None:
        self._run("finish_cancelled", job, unit, token, time.time())

    def reset(self, job: str, grace: float, ttl: int) -> tuple[str, str]:
        result = self._run("reset", job, time.time(), grace, ttl)
        return result[0], (result[1] if len(result) > 1 else "")

    @staticmethod
    def _dispatches(job: str, items: Iterable[str]) -> list[Dispatch]:
        out = []
        for item in items:
            unit, token = item.split("|")
            out.append(Dispatch(job, unit, token))
        return out

    # -- dispatch and sweeping ---------------------------------------------------------------
    def dispatched(self, item: Dispatch) -> None:
        self.r.zrem(f"{self.p}:dispatch", f"{item.job}|{item.unit}|{item.token}")

    def due(self, now: float, limit: int = 500) -> list[Dispatch]:
        members = self.r.zrangebyscore(f"{self.p}:dispatch", "-inf", now, start=0, num=limit)
        out = []
        for member in members:
            job, unit, token = member.split("|")
            out.append(Dispatch(job, unit, token))
        return out

    def running(self) -> list[Dispatch]:
        out = []
        for member in self.r.smembers(f"{self.p}:running"):
            job, unit, token = member.split("|")
            out.append(Dispatch(job, unit, token))
        return out

    def lease_alive(self, job: str, unit: str) -> bool:
        return bool(self.r.exists(f"{self.p}:lease:{job}|{unit}"))

    def sweep_lock(self, owner: str, seconds: float, what: str = "sweeper") -> bool:
        """Whether ``owner`` is the one worker to make sweep ``what`` for ``seconds``."""
        return bool(self.r.set(f"{self.p}:{what}", owner, nx=True,
                               px=max(100, int(seconds * 1000))))

    def expire_finished(self, job: str, ttl: int) -> None:
        self._expire_finished(args=[self.p, job, ttl])

    # -- counters (melter.farm.counts) ---------------------------------------------------------
    def counts(self, limit: int = 5000) -> Counts:
        """The job counters, after taking out the jobs whose records expired; rebuilt first
        when nothing has counted them yet (once per farm, or after they were lost)."""
        fields = self._reaped_counts(limit)
        if "since" not in fields:
            self.rebuild_counts()
            fields = self._reaped_counts(limit)
        return Counts.parse(fields)

    def _reaped_counts(self, limit: int) -> dict[str, str]:
        for _ in range(100):
            due, _, flat = self._read_counts(args=[self.p, limit])
            if due < limit:
                break
        return dict(zip(flat[::2], flat[1::2], strict=True))

    def rebuild_counts(self, batch: int = 500) -> bool:
        """Count every job in ``P:jobs`` from nothing; False when another process is at it
        (or had just finished)."""
        lock = f"{self.p}:counts:rebuild"
        if not self.r.set(lock, "1", nx=True, ex=600):
            return False
        try:
            if not self._restart_counts(args=[self.p]):
                return False
            cursor = 0
            while True:
                cursor, found = self.r.zscan(f"{self.p}:jobs", cursor, count=batch)
                if found:
                    self._recount(args=[self.p, *(job for job, _ in found)])
                if not cursor:
                    break
            self.r.hset(f"{self.p}:counts", "since", repr(time.time()))
            return True
        finally:
            self.r.delete(lock)

    def reap(self, limit: int = 5000) -> int:
        """Take the jobs whose records expired out of the counters; how many were gone."""
        _, gone, _ = self._read_counts(args=[self.p, limit])
        return int(gone)

    # -- workers' presence ---------------------------------------------------------------------
    def present(self, key: str, seconds: int) -> None:
        """Set a worker's presence key (``P:worker:<name>``) for ``seconds``."""
        pipe = self.r.pipeline(transaction=False)
        pipe.set(key, str(time.time()), ex=seconds)
        pipe.sadd(f"{self.p}:workers", key)
        pipe.execute()

    def absent(self, key: str | None) -> None:
        if key:
            pipe = self.r.pipeline(transaction=False)
            pipe.delete(key)
            pipe.srem(f"{self.p}:workers", key)
            pipe.execute()

    def live_workers(self) -> int:
        return int(self._workers(args=[self.p]))

    # -- kept chunks -------------------------------------------------------------------------
    def note_parts(self, folder: str, now: float) -> None:
        """Folder ``folder`` (under the outputs root) has had a chunk kept in it at ``now``."""
        self.r.zadd(f"{self.p}:parts", {folder: now})

    def stale_parts(self, before: float, limit: int = 100) -> list[tuple[str, float]]:
        """Parts folders no chunk was kept in since ``before``, oldest first."""
        return [(folder, float(at)) for folder, at in self.r.zrangebyscore(
            f"{self.p}:parts", "-inf", before, start=0, num=limit, withscores=True)]

    def forget_parts(self, folder: str, seen: float) -> None:
        """Stop tracking a swept folder, unless a chunk was kept in it since it was read."""
        key = f"{self.p}:parts"
        with self.r.pipeline() as pipe:
            try:
                pipe.watch(key)
                at = pipe.zscore(key, folder)
                if at is not None and float(at) <= seen:
                    pipe.multi()
                    pipe.zrem(key, folder)
                    pipe.execute()
            except redis.WatchError:
                pass

    # -- reading -----------------------------------------------------------------------------
    def job(self, job: str) -> dict[str, str]:
        return self.r.hgetall(self.job_key(job))

    def units(self, job: str) -> list[str]:
        return json.loads(self.r.hget(self.job_key(job), "units") or "[]")

    def unit(self, job: str, unit: str) -> dict[str, str]:
        return self.r.hgetall(self.unit_key(job, unit))

    def all_units(self, job: str) -> dict[str, dict[str, str]]:
        names = self.units(job)
        pipe = self.r.pipeline()
        for name in names:
            pipe.hgetall(self.unit_key(job, name))
        return dict(zip(names, pipe.execute(), strict=True))

    def history(self, job: str) -> list[dict[str, Any]]:
        return [json.loads(item) for item in self.r.lrange(f"{self.p}:hist:{job}", 0, -1)]

    def job_ids(self, limit: int, newest_first: bool = True) -> list[str]:
        key = f"{self.p}:jobs"
        if newest_first:
            return list(self.r.zrevrange(key, 0, max(0, limit - 1)))
        return list(self.r.zrange(key, 0, max(0, limit - 1)))

    def forget(self, jobs: Iterable[str]) -> None:
        """Drop gone jobs from ``P:jobs`` (and from the counters, should they be there)."""
        names = list(jobs)
        if names:
            self._recount(args=[self.p, *names])
            self.r.zrem(f"{self.p}:jobs", *names)

    def set_fields(self, job: str, fields: dict[str, str]) -> None:
        self.r.hset(self.job_key(job), mapping=fields)

    def set_unit_fields(self, job: str, unit: str, fields: dict[str, str]) -> None:
        self.r.hset(self.unit_key(job, unit), mapping=fields)

    def mark_once(self, job: str, what: str, ttl: int) -> bool:
        """True the first time ``what`` is marked for ``job`` (callbacks, cleanup)."""
        return bool(self.r.set(f"{self.p}:once:{job}:{what}", 1, nx=True, ex=ttl))
