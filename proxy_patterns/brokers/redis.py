"""A broker in the Redis store's server: many nodes.

A topic is a handful of keys (``proxy-patterns:stream:<topic>:…``) beside the objects, and
every step that touches more than one of them is a Lua script, so it is atomic::

    meta                   hash: mode, producers expected, ended
    producers              hash: producer -> its lease key
    closed, lost           sets: producers that closed, and that a consumer found dead
    groups                 hash: group -> the lease key its items live by
    q:<group>              list: queued messages (pushed left, taken right); END once ended
    p:<group>:<consumer>   list: taken, not yet acked (BLMOVE from the queue: reliable queue)
    consumers:<group>      hash: consumer -> its lease key
    inflight               hash: <group> -> unacked messages, <group>:b -> their bytes

A message is ``<name>|<nbytes>|<payload>``. The work group's items live by the ``meta`` key
(the topic itself); a broadcast group's by its consumer's process lease.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from proxy_patterns.brokers import (
    Discard,
    Membership,
    Mode,
    check_mode,
    producer_lost,
    stream_ended,
)
from proxy_patterns.records import RefTable

if TYPE_CHECKING:
    import redis

END = b"~end"
END_POLL = 0.1
"""Seconds between checks, at the end of a stream, for another consumer's items to settle."""

# ARGV[1] is the topic's key prefix in every script. ``finish`` removes the topic once it
# ended (or nobody ever produced to it), is drained and nobody consumes it; ``ended`` says
# whether every producer closed. Messages of groups removed are collected in ``out``, which
# the scripts that may remove one return, for the caller to discard.
_COMMON = """
local P = ARGV[1]
local out = {}
local function ended()
  local expected = math.max(tonumber(redis.call('hget', P .. 'meta', 'producers')) or 1, 1)
  local done = redis.call('scard', P .. 'closed') + redis.call('scard', P .. 'lost')
  return redis.call('hlen', P .. 'producers') == 0 and done >= expected
end
local function discard_group(g)
  for _, key in ipairs({P .. 'q:' .. g, P .. 'p:' .. g .. ':' .. g}) do
    for _, m in ipairs(redis.call('lrange', key, 0, -1)) do
      if m ~= '~end' then table.insert(out, m) end
    end
    redis.call('del', key)
  end
  redis.call('hdel', P .. 'groups', g)
  redis.call('del', P .. 'consumers:' .. g)
  redis.call('hdel', P .. 'inflight', g, g .. ':b')
end
local function queued(g)
  local q = P .. 'q:' .. g
  local n = redis.call('llen', q)
  if redis.call('lpos', q, '~end') then n = n - 1 end
  return n
end
local function finish()
  local never = redis.call('hlen', P .. 'producers') + redis.call('scard', P .. 'closed')
    + redis.call('scard', P .. 'lost') == 0
  if not (never or ended()) then return end
  for _, g in ipairs(redis.call('hkeys', P .. 'groups')) do
    if g ~= 'work' then
      if redis.call('exists', redis.call('hget', P .. 'groups', g)) == 1 then return end
      discard_group(g)  -- its consumer died
    elseif queued(g) > 0 or redis.call('hlen', P .. 'consumers:' .. g) > 0 then
      return
    end
  end
  redis.call('del', P .. 'meta', P .. 'producers', P .. 'closed', P .. 'lost', P .. 'groups',
    P .. 'inflight', P .. 'q:work', P .. 'consumers:work')
end
local function end_if_ended()
  if not ended() then return end
  for _, g in ipairs(redis.call('hkeys', P .. 'groups')) do
    redis.call('lpush', P .. 'q:' .. g, '~end')
  end
  finish()
end
local function open(mode, producers)
  if redis.call('exists', P .. 'meta') == 0 then
    redis.call('hset', P .. 'meta', 'mode', mode, 'producers', producers)
    if mode == 'work' then redis.call('hset', P .. 'groups', 'work', P .. 'meta') end
  end
  return redis.call('hget', P .. 'meta', 'mode')
end
"""
# ARGV: prefix, mode, producers, producer, lease
_ADD_PRODUCER = (
    _COMMON
    + """
local mode = open(ARGV[2], ARGV[3])
if mode ~= ARGV[2] then return {'mode', mode} end
if ended() then return {'ended'} end
local expected = tonumber(redis.call('hget', P .. 'meta', 'producers')) or 0
if tonumber(ARGV[3]) > expected then redis.call('hset', P .. 'meta', 'producers', ARGV[3]) end
redis.call('hset', P .. 'producers', ARGV[4], ARGV[5])
return {'ok'}
"""
)
# ARGV: prefix, producer
_REMOVE_PRODUCER = (
    _COMMON
    + """
redis.call('hdel', P .. 'producers', ARGV[2])
redis.call('sadd', P .. 'closed', ARGV[2])
end_if_ended()
return out
"""
)
# ARGV: prefix, name, nbytes, group1, payload1, ...: returns the payloads whose group is gone
_PUBLISH = """
local P = ARGV[1]
local gone = {}
for i = 4, #ARGV, 2 do
  local g = ARGV[i]
  if redis.call('hexists', P .. 'groups', g) == 1 then
    redis.call('lpush', P .. 'q:' .. g, ARGV[i + 1])
    redis.call('hincrby', P .. 'inflight', g, 1)
    redis.call('hincrby', P .. 'inflight', g .. ':b', ARGV[3])
  else
    table.insert(gone, ARGV[i + 1])
  end
end
return gone
"""
# ARGV: prefix: removes broadcast groups whose consumer died; returns their messages
_REMOVE_DEAD_GROUPS = (
    _COMMON
    + """
local flat = redis.call('hgetall', P .. 'groups')
for i = 1, #flat, 2 do
  if flat[i] ~= 'work' and redis.call('exists', flat[i + 1]) == 0 then
    discard_group(flat[i])
  end
end
return out
"""
)
# ARGV: prefix, mode, consumer, lease
_JOIN = (
    _COMMON
    + """
local mode = open(ARGV[2], 0)
if mode ~= ARGV[2] then return {'mode', mode} end
local g = 'work'
if mode == 'broadcast' then
  g = ARGV[3]
  redis.call('hset', P .. 'groups', g, ARGV[4])
  if ended() then redis.call('lpush', P .. 'q:' .. g, '~end') end
end
redis.call('hset', P .. 'consumers:' .. g, ARGV[3], ARGV[4])
return {'ok', g}
"""
)
# ARGV: prefix, group, consumer, message, nbytes
_ACK = """
local P = ARGV[1]
if redis.call('lrem', P .. 'p:' .. ARGV[2] .. ':' .. ARGV[3], 1, ARGV[4]) == 0 then return 0 end
redis.call('hincrby', P .. 'inflight', ARGV[2], -1)
redis.call('hincrby', P .. 'inflight', ARGV[2] .. ':b', -tonumber(ARGV[5]))
return 1
"""
# ARGV: prefix, group: gives dead consumers' messages back to the queue, and counts dead
# producers as lost (so the stream ends, with an error, once every producer closed or died)
_RECOVER = (
    _COMMON
    + """
local g = ARGV[2]
local flat = redis.call('hgetall', P .. 'consumers:' .. g)
for i = 1, #flat, 2 do
  if redis.call('exists', flat[i + 1]) == 0 then
    local pending = P .. 'p:' .. g .. ':' .. flat[i]
    while redis.call('lmove', pending, P .. 'q:' .. g, 'LEFT', 'RIGHT') do end
    redis.call('hdel', P .. 'consumers:' .. g, flat[i])
  end
end
flat = redis.call('hgetall', P .. 'producers')
local lost = false
for i = 1, #flat, 2 do
  if redis.call('exists', flat[i + 1]) == 0 then
    redis.call('hdel', P .. 'producers', flat[i])
    redis.call('sadd', P .. 'lost', flat[i])
    lost = true
  end
end
if lost then end_if_ended() end
return out
"""
)
# ARGV: prefix, group, consumer; returns a broadcast group's messages to discard
_LEAVE = (
    _COMMON
    + """
local g, c = ARGV[2], ARGV[3]
if redis.call('exists', P .. 'meta') == 0 then return out end
if g == 'work' then
  local pending = P .. 'p:' .. g .. ':' .. c
  while redis.call('lmove', pending, P .. 'q:' .. g, 'LEFT', 'RIGHT') do end
  redis.call('hdel', P .. 'consumers:' .. g, c)
else
  discard_group(g)
end
finish()
return out
"""
)
# ARGV: prefix: removes the topic; returns every message it held
_DELETE = (
    _COMMON
    + """
for _, g in ipairs(redis.call('hkeys', P .. 'groups')) do
  for _, c in ipairs(redis.call('hkeys', P .. 'consumers:' .. g)) do
    local pending = P .. 'p:' .. g .. ':' .. c
    while redis.call('lmove', pending, P .. 'q:' .. g, 'LEFT', 'RIGHT') do end
  end
  discard_group(g)
end
redis.call('del', P .. 'meta', P .. 'producers', P .. 'closed', P .. 'lost', P .. 'groups',
  P .. 'inflight')
return out
"""
)


def _payload(message: bytes) -> bytes:
    return message.split(b"|", 2)[2]


class RedisBroker:
    """A topic's queues as lists in the Redis store's server (see the module docstring)."""

    def __init__(self, client: redis.Redis, table: RefTable, topic: str, discard: Discard) -> None:
        self.client = client
        self.table = table
        self.topic = topic
        self._discard = discard
        self.prefix = f"proxy-patterns:stream:{topic}:"
        self._scripts = {
            name: client.register_script(source)
            for name, source in {
                "add_producer": _ADD_PRODUCER,
                "remove_producer": _REMOVE_PRODUCER,
                "publish": _PUBLISH,
                "remove_dead_groups": _REMOVE_DEAD_GROUPS,
                "join": _JOIN,
                "ack": _ACK,
                "recover": _RECOVER,
                "leave": _LEAVE,
                "delete": _DELETE,
            }.items()
        }

    def _run(self, script: str, *args: str | bytes | int) -> Any:
        return self._scripts[script](args=[self.prefix, *args])

    def _discard_all(self, messages: list[bytes]) -> None:
        for message in messages:
            self._discard(_payload(message))

    def _opened(self, answer: list[bytes], mode: str) -> list[bytes]:
        if answer[0] == b"mode":
            check_mode(self.topic, mode, answer[1].decode())
        return answer

    def add_producer(self, mode: Mode, producers: int | None) -> str:
        check_mode(self.topic, mode, mode)
        name = secrets.token_hex(6)
        answer = self._run("add_producer", mode, producers or 0, name, self.table.lease())
        if self._opened(answer, mode)[0] == b"ended":
            raise stream_ended(self.topic)
        return name

    def remove_producer(self, producer: str) -> None:
        self._discard_all(self._run("remove_producer", producer))

    def publish(
        self, name: str, nbytes: int, payloads_for: Callable[[dict[str, str]], dict[str, bytes]]
    ) -> None:
        self._discard_all(self._run("remove_dead_groups"))
        groups: dict[bytes, bytes] = self.client.hgetall(f"{self.prefix}groups")  # type: ignore[assignment]
        leases = {group.decode(): lease.decode() for group, lease in groups.items()}
        head = f"{name}|{nbytes}|".encode()
        args: list[str | bytes | int] = [name, nbytes]
        for group, payload in payloads_for(leases).items():
            args += [group, head + payload]
        self._discard_all(self._run("publish", *args))  # their groups left meanwhile

    def unconsumed(self) -> tuple[int, int]:
        counts: dict[bytes, bytes] = self.client.hgetall(f"{self.prefix}inflight")  # type: ignore[assignment]
        items = [int(v) for k, v in counts.items() if not k.endswith(b":b")]
        nbytes = [int(v) for k, v in counts.items() if k.endswith(b":b")]
        return max(items, default=0), max(nbytes, default=0)

    def join(self, mode: Mode) -> Membership:
        check_mode(self.topic, mode, mode)
        consumer = secrets.token_hex(6)
        answer = self._opened(self._run("join", mode, consumer, self.table.lease()), mode)
        return Membership(answer[1].decode(), consumer)

    def take(self, member: Membership, timeout: float) -> tuple[bytes, bytes] | None:
        queue = f"{self.prefix}q:{member.group}"
        pending = f"{self.prefix}p:{member.group}:{member.consumer}"
        # Redis takes decimal seconds (redis-py's hint says int); 0 would block for ever.
        message: bytes | None = self.client.blmove(queue, pending, timeout, "RIGHT", "LEFT")  # type: ignore[arg-type,assignment]
        if message is None:
            return None
        if message == END:  # put back for the group's other consumers, then stop
            self.client.lmove(pending, queue, "LEFT", "RIGHT")
            if self._others_pending(member):
                # Another consumer's items may yet come back (if it died, see recover): the
                # group's stream ends once all of them are acked.
                time.sleep(min(timeout, END_POLL))
                return None
            lost: list[bytes] = self.client.smembers(f"{self.prefix}lost")  # type: ignore[assignment]
            if lost:
                raise producer_lost(self.topic, min(lost).decode())
            raise StopIteration
        return message, _payload(message)

    def _others_pending(self, member: Membership) -> bool:
        """Whether another consumer of ``member``'s group holds items it has not acked."""
        consumers: list[bytes] = self.client.hkeys(f"{self.prefix}consumers:{member.group}")  # type: ignore[assignment]
        return any(
            self.client.llen(f"{self.prefix}p:{member.group}:{c.decode()}")
            for c in consumers
            if c.decode() != member.consumer
        )

    def ack(self, member: Membership, handle: bytes) -> bool:
        nbytes = handle.split(b"|", 2)[1]
        return bool(self._run("ack", member.group, member.consumer, handle, nbytes))

    def recover(self, member: Membership) -> None:
        self._discard_all(self._run("recover", member.group))

    def leave(self, member: Membership) -> None:
        self._discard_all(self._run("leave", member.group, member.consumer))

    def delete(self) -> None:
        self._discard_all(self._run("delete"))
