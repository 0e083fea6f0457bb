-- ARGV: prefix, max lost attempts, dispatch grace seconds, batch size, stranded-after seconds,
-- lease grace seconds.
-- Leases that expired belong to dead processes or dead nodes: give the subtask a new attempt,
-- once the lease grace has passed too (its box fences itself off before that: workers/lease_fence.py).
local max_lost, grace, batch = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local lease_grace = tonumber(ARGV[6]) or 0
local expired = redis.call('ZRANGEBYSCORE', K.running(), '-inf', NOW - lease_grace, 'LIMIT', 0, batch)
local requeued = 0
for _, m in ipairs(expired) do
  redis.call('ZREM', K.running(), m)
  local sep = string.find(m, '|', 1, true)
  local jid = string.sub(m, 1, sep - 1)
  local sid = string.sub(m, sep + 1)
  local sk = K.subtask(jid, sid)
  if redis.call('HGET', sk, 'state') == 'running' then
    local msg = 'lease expired on node ' .. redis.call('HGET', sk, 'owner_node') .. ' (worker lost)'
    if count_lost(jid, sid, max_lost, msg) == 'lost' then
      requeue_lost(jid, sid, msg)
      requeued = requeued + 1
    end
  end
end
-- A releaser that died between popping the backlog and sending to the broker.
local stuck = redis.call('ZRANGEBYSCORE', K.dispatching(), '-inf', NOW - grace, 'LIMIT', 0, batch)
for _, m in ipairs(stuck) do
  redis.call('ZREM', K.dispatching(), m)
  local a = string.find(m, '|', 1, true)
  local b = string.find(m, '|', a + 1, true)
  local jid = string.sub(m, 1, a - 1)
  local sid = string.sub(m, a + 1, b - 1)
  local sk = K.subtask(jid, sid)
  local f = redis.call('HMGET', sk, 'state', 'attempt', 'resource_class')
  if f[1] == 'queued' and f[2] == string.sub(m, b + 1) then
    redis.call('ZREM', K.queued(f[3]), member(jid, sid))
    make_ready(jid, sid)
    requeued = requeued + 1
  end
end
-- A message a worker had prefetched when its broker connection broke is stranded in kombu's
-- unacked set until the visibility timeout. Subtasks queued that long while their queue is
-- empty are released again; if the first message does turn up, its claim is refused.
local stranded_after = tonumber(ARGV[5])
for _, cls in ipairs({'cpu', 'gpu', 'io'}) do
  local old = redis.call('ZRANGEBYSCORE', K.queued(cls), '-inf', NOW - stranded_after, 'LIMIT', 0, batch)
  for _, m in ipairs(old) do
    local sep = string.find(m, '|', 1, true)
    local jid = string.sub(m, 1, sep - 1)
    local sid = string.sub(m, sep + 1)
    local sk = K.subtask(jid, sid)
    local queue = redis.call('HGET', sk, 'queue')
    local waiting = redis.call('LLEN', queue)
    for pri = 1, 9 do waiting = waiting + redis.call('LLEN', queue .. ':' .. pri) end
    if waiting == 0 and redis.call('HGET', sk, 'state') == 'queued' then
      redis.call('ZREM', K.queued(cls), m)
      event(jid, 'subtask', sid, 'requeued', {error = 'message stranded in the broker; sent again'})
      make_ready(jid, sid)
      requeued = requeued + 1
    elseif waiting > 0 then
      break
    end
  end
end
return requeued
