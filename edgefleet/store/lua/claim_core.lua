-- claim_attempt(jid, sid, attempt, node, pid, lease ttl, dead pid ('' unless taking over),
-- max lost attempts, claim token, lease grace seconds, takes for): the claim of one delivered attempt,
-- shared by claim.lua (a Celery delivery) and take.lua (a slot that takes its next subtask itself).
-- `takes for` > 0: the claiming slot chains, and will take its class's next subtask itself when this
-- one ends if that is within so many seconds: it is counted among the class's takers until then
-- (release_core.lua leaves it out of the queue; the attempt's completion takes it out again).
-- The claim token is one per delivery, so that a claim retried after its reply was lost in a Redis
-- blip is recognised as the same claim.
-- A running attempt is taken over (same attempt, counted as lost) when its owner process on
-- this node is dead or its lease has expired; never when its job has ended or it was lost
-- too often (then it is cancelled or failed instead).
-- An expired lease is honoured `lease_grace` seconds more, so that its box has stopped its copy.
local function claim_attempt(jid, sid, attempt, node, pid, ttl, dead, max_lost, token, lease_grace, takes_for)
  local sk = K.subtask(jid, sid)
  local f = redis.call('HMGET', sk, 'state', 'attempt', 'owner_node', 'owner_pid', 'resource_class', 'args', 'needs',
    'claim_token')
  if not f[1] then return {'drop', 'unknown subtask'} end
  -- The tenant goes back with 'run': a worker reuses a sandbox executor only within one tenant.
  local job_state, tenant = unpack(redis.call('HMGET', K.job(jid), 'state', 'tenant'))
  if f[2] ~= attempt then return {'drop', 'stale attempt ' .. attempt .. ', current is ' .. f[2]} end
  local m = member(jid, sid)
  local retried = false
  if f[1] == 'running' then
    local lease = tonumber(redis.call('ZSCORE', K.running(), m))
    local why
    if token ~= '' and f[8] == token and f[3] == node and f[4] == pid then
      retried = true
    elseif dead ~= '' and f[3] == node and f[4] == dead then
      why = 'process ' .. dead .. ' on node ' .. node .. ' died'
    elseif lease and lease < NOW - lease_grace and not (f[3] == node and f[4] == pid) then
      -- (an expired lease of this very process is left to the reaper: one pid, one owner)
      why = 'lease of pid ' .. f[4] .. ' on node ' .. f[3] .. ' expired'
    elseif f[3] == node then
      return {'owned', f[4]}
    else
      return {'drop', 'running on node ' .. f[3]}
    end
    if not retried then
      local verdict = count_lost(jid, sid, max_lost, why)
      if verdict ~= 'lost' then return {'drop', 'subtask ' .. verdict .. ' after ' .. why} end
      event(jid, 'subtask', sid, 'running', {attempt = tonumber(attempt), node = node, takeover = f[4], from_node = f[3]})
    end
  elseif f[1] ~= 'queued' then
    return {'drop', 'subtask is ' .. f[1]}
  elseif job_state ~= 'running' then
    return {'drop', 'job is ' .. job_state}
  end
  redis.call('ZREM', K.queued(f[5]), m)
  redis.call('ZREM', K.dispatching(), m .. '|' .. attempt)
  redis.call('ZADD', K.running(), NOW + ttl, m)
  if takes_for and takes_for > 0 then
    redis.call('ZADD', K.takers(f[5]), NOW + takes_for, node .. '|' .. pid)
  end
  if not retried then
    redis.call('HSET', sk, 'state', 'running', 'owner_node', node, 'owner_pid', pid, 'started_at', NOW,
      'progress', '', 'progress_message', '', 'claim_token', token)
  end
  if f[1] == 'queued' then
    event(jid, 'subtask', sid, 'running', {attempt = tonumber(attempt), node = node})
  end
  local outputs = {}
  for _, dep in ipairs(cjson.decode(f[7])) do
    outputs[dep] = redis.call('HGET', K.subtask(jid, dep), 'output') or 'null'
  end
  local checkpoint = redis.call('HGET', sk, 'checkpoint') or ''
  if checkpoint ~= '' and not retried then
    redis.call('HINCRBY', sk, 'resumed', 1)
    event(jid, 'subtask', sid, 'resumed', {attempt = tonumber(attempt),
      checkpoint_at = tonumber(redis.call('HGET', sk, 'checkpoint_at'))})
  end
  -- When the attempt was released and claimed go back too (the worker's queue-wait metric): no second call.
  local queued_at, started_at = unpack(redis.call('HMGET', sk, 'queued_at', 'started_at'))
  return {'run', f[6], cjson.encode(outputs), checkpoint, tenant or '', queued_at or '', started_at or ''}
end
