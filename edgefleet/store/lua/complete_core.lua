-- complete_attempt(jid, sid, attempt, node, pid, outcome, output json, error, retryable '1'/'0',
-- usage json or ''): an attempt's recorded end. {'stale', state} when the attempt no longer owns
-- its subtask, else {'done', job state, classes with work to release (comma-separated)}.
-- Shared by complete.lua and complete_take.lua.
local function complete_attempt(jid, sid, attempt, node, pid, outcome, output, err, retryable, usage)
  local sk = K.subtask(jid, sid)
  local f = redis.call('HMGET', sk, 'state', 'attempt', 'owner_node', 'owner_pid', 'dependents')
  if f[1] ~= 'running' or f[2] ~= attempt or f[3] ~= node or f[4] ~= pid then
    return {'stale', f[1] or 'gone'}
  end
  redis.call('ZREM', K.running(), member(jid, sid))
  redis.call('HSET', sk, 'last_node', node)
  if usage and usage ~= '' then
    -- What the attempt used, recorded with its end so that a finished job always shows it.
    for name, value in pairs(cjson.decode(usage)) do redis.call('HSET', sk, name, value) end
  end
  local jk = K.job(jid)
  redis.call('HSET', jk, 'updated_at', NOW)
  local job_state = redis.call('HGET', jk, 'state')
  if outcome == 'succeeded' then
    redis.call('HSET', sk, 'state', 'succeeded', 'finished_at', NOW, 'output', output, 'error', '',
      'progress', 1)
    settle(jid, sid)
    event(jid, 'subtask', sid, 'succeeded', {attempt = tonumber(attempt)})
    if job_state ~= 'running' then return {'done', job_state, ''} end
    local classes = {}
    for _, dep in ipairs(cjson.decode(f[5])) do
      local dk = K.subtask(jid, dep)
      if redis.call('HINCRBY', dk, 'deps_left', -1) == 0 and redis.call('HGET', dk, 'state') == 'waiting' then
        make_ready(jid, dep)
        classes[redis.call('HGET', dk, 'resource_class')] = true
      end
    end
    -- This attempt's slot frees room under its class's target depth: let the worker refill it,
    -- unless the queue and the slots that take for themselves are at the target depth with no
    -- interactive work waiting (which the express lane may release past it): that release would
    -- find nothing to do.
    local own = redis.call('HGET', sk, 'resource_class')
    if redis.call('ZCARD', K.backlog(own)) > 0 then
      local target = tonumber(redis.call('HGET', K.target_depth(), own) or '')
      if not target or redis.call('ZCARD', K.queued(own)) + live_takers(own) < target
          or redis.call('HGET', K.backlog_count(own), 'interactive') then
        classes[own] = true
      end
    end
    local new_state = job_state
    if redis.call('HINCRBY', jk, 'remaining', -1) == 0 then
      new_state = finish_job(jid, 'succeeded', nil, nil)
    end
    local ready = {}
    for cls, _ in pairs(classes) do table.insert(ready, cls) end
    return {'done', new_state, table.concat(ready, ',')}
  elseif outcome == 'cancelled' or job_state ~= 'running' then
    redis.call('HSET', sk, 'state', 'cancelled', 'finished_at', NOW, 'error', err,
      'owner_node', '', 'owner_pid', '')
    settle(jid, sid)
    event(jid, 'subtask', sid, 'cancelled', {attempt = tonumber(attempt)})
    return {'done', job_state, ''}
  end
  fail_attempt(jid, sid, err, retryable == '1')
  return {'done', redis.call('HGET', jk, 'state'), ''}
end
