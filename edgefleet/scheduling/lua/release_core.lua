-- release_ready(class, max to release, default target depth of the class, direct): pop up to the
-- max of the class's lowest scores while its queue, with the slots that take their next subtask
-- themselves (live_takers: they need no message), is under the target depth (the value in the hash
-- K.target_depth() wins, so every releaser honours the same one), marked queued and dispatching;
-- the list of what it popped. `direct`: for a slot that just ended and takes the next subtask
-- itself (take.lua), not through the queue: the target depth does not bound it and the express
-- lane does not apply. Shared by release.lua and take.lua.
local function release_ready(cls, limit, target_default, direct)
  local target = tonumber(redis.call('HGET', K.target_depth(), cls) or '') or target_default
  local queued_key = K.queued(cls)
  local out = {}
  local w = load_weights()
  local key = K.backlog(cls)

  -- Releases per priority class, decayed over share_window_s: what batch_min_share is measured on.
  local rk = K.released(cls)
  local shares = {}
  do
    local f = redis.call('HMGET', rk, 't', 'interactive', 'normal', 'batch')
    local decay = math.exp(-math.max(0, NOW - (tonumber(f[1]) or NOW)) / w.share_window_s)
    shares.interactive = (tonumber(f[2]) or 0) * decay
    shares.normal = (tonumber(f[3]) or 0) * decay
    shares.batch = (tonumber(f[4]) or 0) * decay
  end
  local function batch_owed()
    if w.batch_min_share <= 0 then return false end
    local total = shares.interactive + shares.normal + shares.batch
    return total >= 1 and shares.batch < w.batch_min_share * total
  end

  local function split(m)
    local sep = string.find(m, '|', 1, true)
    return string.sub(m, 1, sep - 1), string.sub(m, sep + 1)
  end

  -- The lowest-scored member of one priority class, taken out of the backlog (member, priority).
  local function take_lowest_of(prio)
    local first = redis.call('ZRANGE', K.backlog_of_priority(cls, prio), 0, 0)
    if not first[1] then return nil end
    local jid, sid = split(first[1])
    return first[1], backlog_remove(cls, jid, sid)
  end

  -- The next member to release and its priority: the lowest score, unless batch is below its
  -- minimum share and waits, then the lowest-scored batch member.
  local function next_member()
    if batch_owed() then
      local m, prio = take_lowest_of('batch')
      if m then return m, prio end
    end
    local popped = redis.call('ZPOPMIN', key, 1)
    if not popped[1] then return nil end
    local jid = split(popped[1])
    return popped[1], backlog_popped(cls, jid, popped[1])
  end

  local function release_member(m, prio)
    local jid, sid = split(m)
    local sk = K.subtask(jid, sid)
    local f = redis.call('HMGET', sk, 'state', 'attempt', 'plugin', 'action', 'timeout', 'node', 'needs', 'args')
    if f[1] ~= 'ready' then return end
    local queue = cls
    if f[6] and f[6] ~= '' then queue = 'node.' .. f[6] .. '.' .. cls end
    if prio == 'interactive' then queue = queue .. '.express' end
    redis.call('HSET', sk, 'state', 'queued', 'queued_at', NOW, 'queue', queue)
    redis.call('ZADD', queued_key, NOW, m)
    redis.call('ZADD', K.dispatching(), NOW, m .. '|' .. f[2])
    event(jid, 'subtask', sid, 'queued', {attempt = tonumber(f[2]), queue = queue})
    if shares[prio] then shares[prio] = shares[prio] + 1 end
    table.insert(out, {job_id = jid, subtask_id = sid, attempt = tonumber(f[2]),
      plugin = f[3], action = f[4], resource_class = cls, timeout = tonumber(f[5]),
      priority = prio, queue = queue,
      -- Whether it has input artifacts (earlier steps' files, `$artifact` args) for locality to place.
      -- (`needs` is Python's json.dumps of a list: '[]' when empty; an absent field reads as false)
      inputs = (f[7] and f[7] ~= '[]') or (f[8] and string.find(f[8], '$artifact', 1, true) ~= nil) or false})
  end

  local n, takers = limit, 0
  if not direct then
    takers = live_takers(cls)
    n = math.min(limit, target - redis.call('ZCARD', queued_key) - takers)
  end
  for _ = 1, n do
    local m, prio = next_member()
    if not m then break end
    release_member(m, prio)
  end

  -- The express lane: interactive work may exceed the target depth by the live nodes' express
  -- slots for this class, so that it does not wait for a batch subtask to end to be released.
  if not direct and #out < limit and redis.call('HGET', K.backlog_count(cls), 'interactive') then
    local express = 0
    local names = redis.call('SMEMBERS', K.nodes())
    for _, name in ipairs(names) do
      local raw = redis.call('GET', K.node(name))
      if raw then
        local ok, info = pcall(cjson.decode, raw)
        if ok and type(info.express_slots) == 'table' then express = express + (tonumber(info.express_slots[cls]) or 0) end
      end
    end
    local room = math.min(limit - #out, target + express - redis.call('ZCARD', queued_key) - takers)
    for _ = 1, room do
      local m, prio = take_lowest_of('interactive')
      if not m then break end
      release_member(m, prio)
    end
  end

  if #out > 0 then
    redis.call('HSET', rk, 't', NOW, 'interactive', shares.interactive, 'normal', shares.normal, 'batch', shares.batch)
  end
  return out
end
