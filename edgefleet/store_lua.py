"""Lua scripts of the job store.

Every state transition runs as one script, so a crash of any caller either
happened before the transition or after it, never half-way. Keys are derived
from ARGV[1] (the prefix) inside the scripts: edgefleet targets one Redis, not
a cluster. Timestamps come from Redis' TIME so that boxes with skewed clocks
agree on leases and backoffs.

The backlog score (effective priority) is `edgefleet.scheduling.priority`'s formula (`LUA_SCORE`).
Per-tenant counters `<prefix>:tenant_active:<tenant>` count the subtasks of a tenant
that are ready, queued, running or waiting for a retry: a subtask's hash field
`active` is 1 while it is counted, so every transition counts it at most once.

Each class backlog has a count per priority class beside it, the hash
`<prefix>:backlog_count:<class>` (field = the job's priority class, absent when 0),
for the `edgefleet_backlog_depth{resource_class, priority_class}` gauge, and a
per-priority mirror `<prefix>:backlog:<class>:<priority>` (same members and scores),
where RELEASE finds the next batch member when batch is owed its minimum share
(`batch_min_share`, measured on `<prefix>:scheduler:released:<class>`). Every script
that adds to or takes from a backlog goes through `backlog_add` / `backlog_remove` /
`backlog_popped`, which move the count only when the sorted set really changed (ZADD
and ZREM return values), so all three change together in one atomic step. A job's
priority class never changes after creation. `BACKLOG_COUNTS` reads them and recounts
a class whose counts do not add up to its backlog (data written before the counts
existed).

Retention: `finish_job` adds each job that ends to `<prefix>:finished` (score: finished_at);
`GC` deletes the jobs there that finished long enough ago, with all their keys.
"""

from edgefleet.scheduling.priority import LUA_SCORE

PRELUDE = r"""
local P = ARGV[1]
local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local NOW = now()
local function jkey(jid) return P .. ':job:' .. jid end
local function skey(jid, sid) return P .. ':st:' .. jid .. ':' .. sid end
local function member(jid, sid) return jid .. '|' .. sid end

-- The backlog of a class, its count per priority class and its per-priority mirror
-- `<prefix>:backlog:<class>:<priority>` (same members and scores) change together.
local function job_priority(jid) return redis.call('HGET', jkey(jid), 'priority') or 'normal' end
local function backlog_counted(cls, prio, delta)
  local ck = P .. ':backlog_count:' .. cls
  if redis.call('HINCRBY', ck, prio, delta) == 0 then redis.call('HDEL', ck, prio) end
end
local function backlog_add(cls, score, jid, sid)
  local m, prio = member(jid, sid), job_priority(jid)
  redis.call('ZADD', P .. ':backlog:' .. cls .. ':' .. prio, score, m)
  if redis.call('ZADD', P .. ':backlog:' .. cls, score, m) == 1 then backlog_counted(cls, prio, 1) end
end
-- Both return the member's priority class.
local function backlog_remove(cls, jid, sid)
  local m, prio = member(jid, sid), job_priority(jid)
  redis.call('ZREM', P .. ':backlog:' .. cls .. ':' .. prio, m)
  if redis.call('ZREM', P .. ':backlog:' .. cls, m) == 1 then backlog_counted(cls, prio, -1) end
  return prio
end
-- A member that ZPOPMIN took from the backlog of cls.
local function backlog_popped(cls, jid, m)
  local prio = job_priority(jid)
  redis.call('ZREM', P .. ':backlog:' .. cls .. ':' .. prio, m)
  backlog_counted(cls, prio, -1)
  return prio
end
""" + LUA_SCORE + r"""

local function event(jid, kind, sid, state, extra)
  local fields = {'type', kind, 'ts', tostring(NOW)}
  if sid then table.insert(fields, 'subtask'); table.insert(fields, sid) end
  if state then table.insert(fields, 'state'); table.insert(fields, state) end
  if extra then table.insert(fields, 'data'); table.insert(fields, cjson.encode(extra)) end
  redis.call('XADD', P .. ':events:' .. jid, 'MAXLEN', '~', '5000', '*', unpack(fields))
end

local function index_job(jid, tenant, old_state, new_state, created)
  local idx = {P .. ':jobs', P .. ':jobs:t:' .. tenant}
  for _, base in ipairs(idx) do
    if old_state then redis.call('ZREM', base .. ':s:' .. old_state, jid) end
    redis.call('ZADD', base .. ':s:' .. new_state, created, jid)
  end
end

local function tenant_of(jid, sk)
  local t = redis.call('HGET', sk, 'tenant')
  if not t or t == '' then t = redis.call('HGET', jkey(jid), 'tenant') or '' end
  return t
end

-- The subtask no longer counts toward its tenant's load (finished, cancelled, failed for good).
local function settle(jid, sid)
  local sk = skey(jid, sid)
  if redis.call('HGET', sk, 'active') == '1' then
    redis.call('HSET', sk, 'active', '0')
    local tk = P .. ':tenant_active:' .. tenant_of(jid, sk)
    if redis.call('DECR', tk) <= 0 then redis.call('DEL', tk) end
  end
end

local function subtask_score(w, jid, sk)
  local f = redis.call('HMGET', sk, 'ready_at', 'tenant_load')
  local jf = redis.call('HMGET', jkey(jid), 'priority', 'deadline_at')
  local deadline = nil
  if jf[2] and jf[2] ~= '' then deadline = tonumber(jf[2]) end
  return effective_score(w, jf[1] or 'normal', tonumber(f[1]) or NOW, tonumber(f[2]) or 0, deadline)
end

local function make_ready(jid, sid, w)
  local sk = skey(jid, sid)
  local f = redis.call('HMGET', sk, 'resource_class', 'active')
  local tk = P .. ':tenant_active:' .. tenant_of(jid, sk)
  local load
  if f[2] == '1' then
    load = tonumber(redis.call('GET', tk) or '1') - 1  -- a retry or requeue: already counted
  else
    load = redis.call('INCR', tk) - 1
  end
  if load < 0 then load = 0 end
  redis.call('HSET', sk, 'state', 'ready', 'ready_at', NOW, 'tenant_load', load, 'active', '1')
  backlog_add(f[1], subtask_score(w or load_weights(), jid, sk), jid, sid)
  event(jid, 'subtask', sid, 'ready', {attempt = tonumber(redis.call('HGET', sk, 'attempt'))})
end

-- Recompute every score of a class backlog with the current weights (same members: counts unchanged).
local function rescore(cls, w)
  local key = P .. ':backlog:' .. cls
  local members = redis.call('ZRANGE', key, 0, -1)
  for _, m in ipairs(members) do
    local sep = string.find(m, '|', 1, true)
    local jid = string.sub(m, 1, sep - 1)
    local sid = string.sub(m, sep + 1)
    local score = subtask_score(w, jid, skey(jid, sid))
    redis.call('ZADD', key, score, m)
    redis.call('ZADD', key .. ':' .. job_priority(jid), score, m)
  end
  return #members
end

local function log_change(kind, changes, reason)
  local key = P .. ':scheduler:changes'
  redis.call('LPUSH', key, cjson.encode({ts = NOW, kind = kind, changes = changes, reason = reason}))
  redis.call('LTRIM', key, 0, 19)
end

-- Take a subtask out of every waiting structure (backlog, delayed, queued, dispatching).
local function unlist(jid, sid)
  local sk = skey(jid, sid)
  local cls = redis.call('HGET', sk, 'resource_class')
  local m = member(jid, sid)
  backlog_remove(cls, jid, sid)
  redis.call('ZREM', P .. ':queued:' .. cls, m)
  redis.call('ZREM', P .. ':delayed', m)
end

local function finish_job(jid, new_state, err, failed_sid)
  local jk = jkey(jid)
  local old = redis.call('HGET', jk, 'state')
  if old ~= 'running' then return old end
  redis.call('HSET', jk, 'state', new_state, 'finished_at', NOW, 'updated_at', NOW)
  redis.call('ZADD', P .. ':finished', NOW, jid)  -- retention: GC deletes it once old enough
  if err then redis.call('HSET', jk, 'error', err) end
  if failed_sid then redis.call('HSET', jk, 'failed_subtask', failed_sid) end
  index_job(jid, redis.call('HGET', jk, 'tenant'), old, new_state,
            tonumber(redis.call('HGET', jk, 'created_at')))
  -- Anything not started yet never will be; running ones learn it on their next lease renewal.
  local order = cjson.decode(redis.call('HGET', jk, 'order'))
  for _, sid in ipairs(order) do
    local sk = skey(jid, sid)
    local st = redis.call('HGET', sk, 'state')
    if st == 'waiting' or st == 'ready' or st == 'retry_wait' or st == 'queued' then
      unlist(jid, sid)
      redis.call('HSET', sk, 'state', 'cancelled', 'finished_at', NOW)
      settle(jid, sid)
      event(jid, 'subtask', sid, 'cancelled', nil)
    end
  end
  event(jid, 'job', nil, new_state, {error = err, failed_subtask = failed_sid})
  if redis.call('HGET', jk, 'callback_url') ~= '' then
    redis.call('RPUSH', P .. ':callbacks', jid)
  end
  return new_state
end

-- A failed attempt: back off and retry while the budget lasts, else fail the job.
local function fail_attempt(jid, sid, err, retryable)
  local sk = skey(jid, sid)
  local failures = redis.call('HINCRBY', sk, 'failures', 1)
  local retries = tonumber(redis.call('HGET', sk, 'retries'))
  local attempt = tonumber(redis.call('HGET', sk, 'attempt'))
  local job_state = redis.call('HGET', jkey(jid), 'state')
  redis.call('HSET', sk, 'error', err, 'owner_node', '', 'owner_pid', '')
  if job_state == 'running' and retryable and failures <= retries then
    local backoff = tonumber(redis.call('HGET', sk, 'retry_backoff')) * (2 ^ (failures - 1))
    redis.call('HSET', sk, 'state', 'retry_wait', 'attempt', attempt + 1)
    redis.call('ZADD', P .. ':delayed', NOW + backoff, member(jid, sid))
    event(jid, 'subtask', sid, 'retry_wait', {attempt = attempt, error = err, backoff = backoff})
    return 'retry_wait'
  end
  redis.call('HSET', sk, 'state', 'failed', 'finished_at', NOW)
  settle(jid, sid)
  event(jid, 'subtask', sid, 'failed', {attempt = attempt, error = err})
  local msg = 'subtask ' .. sid .. ' failed after ' .. attempt .. ' attempt(s): ' .. err
  finish_job(jid, 'failed', msg, sid)
  return 'failed'
end

-- A running attempt whose process or box died (not a failure of the plugin): count it.
-- 'cancelled' (its job ended meanwhile) and 'failed' (lost more than max_lost times) are
-- final; 'lost' means the caller runs it again (a takeover, or `requeue_lost`).
local function count_lost(jid, sid, max_lost, why)
  local sk = skey(jid, sid)
  local lost = redis.call('HINCRBY', sk, 'lost', 1)
  if redis.call('HGET', jkey(jid), 'state') ~= 'running' then
    redis.call('ZREM', P .. ':running', member(jid, sid))
    redis.call('HSET', sk, 'state', 'cancelled', 'finished_at', NOW, 'owner_node', '', 'owner_pid', '')
    settle(jid, sid)
    event(jid, 'subtask', sid, 'cancelled', {error = why})
    return 'cancelled'
  end
  if lost > max_lost then
    redis.call('ZREM', P .. ':running', member(jid, sid))
    fail_attempt(jid, sid, 'lost ' .. lost .. ' times (worker died while running it); last: ' .. why, false)
    return 'failed'
  end
  return 'lost'
end

-- A new attempt of a lost one, ready again whatever `retries` says: it resumes from its checkpoint.
local function requeue_lost(jid, sid, why)
  local sk = skey(jid, sid)
  redis.call('ZREM', P .. ':running', member(jid, sid))
  local attempt = redis.call('HINCRBY', sk, 'attempt', 1)
  redis.call('HSET', sk, 'owner_node', '', 'owner_pid', '', 'claim_token', '', 'error', why)
  event(jid, 'subtask', sid, 'requeued', {attempt = attempt, error = why})
  make_ready(jid, sid)
end
"""

CREATE_JOB = PRELUDE + r"""
local payload = cjson.decode(ARGV[2])
local job = payload.job
if payload.idem_key ~= '' then
  local existing = redis.call('GET', payload.idem_key)
  if existing and redis.call('EXISTS', jkey(existing)) == 0 then existing = nil end  -- expired job
  if existing then
    return {'existing', existing, redis.call('HGET', jkey(existing), 'request_hash') or ''}
  end
end
local jid = job.id
local jk = jkey(jid)
if redis.call('EXISTS', jk) == 1 then return {'exists', jid, ''} end
local order = {}
for _, st in ipairs(payload.subtasks) do table.insert(order, st.id) end
redis.call('HSET', jk, 'id', jid, 'state', 'running', 'priority', job.priority,
  'tenant', job.tenant, 'name', job.name, 'callback_url', job.callback_url,
  'request_hash', job.request_hash, 'created_at', NOW, 'updated_at', NOW,
  'remaining', #payload.subtasks, 'order', cjson.encode(order), 'request', job.request,
  'deadline_at', '', 'idem_key', payload.idem_key)
if job.deadline_s and job.deadline_s ~= cjson.null then
  redis.call('HSET', jk, 'deadline_at', NOW + tonumber(job.deadline_s))
end
index_job(jid, job.tenant, nil, 'running', NOW)
redis.call('ZADD', P .. ':jobs', NOW, jid)
redis.call('ZADD', P .. ':jobs:t:' .. job.tenant, NOW, jid)
event(jid, 'job', nil, 'running', {subtasks = order})
for _, st in ipairs(payload.subtasks) do
  redis.call('HSET', skey(jid, st.id), 'id', st.id, 'job_id', jid, 'plugin', st.plugin,
    'action', st.action, 'resource_class', st.resource_class, 'node', st.node,
    'needs', st.needs, 'dependents', st.dependents,
    'args', st.args, 'timeout', st.timeout, 'retries', st.retries,
    'retry_backoff', st.retry_backoff, 'state', 'waiting', 'attempt', 1, 'failures', 0,
    'lost', 0, 'deps_left', st.n_needs, 'owner_node', '', 'owner_pid', '', 'tenant', job.tenant)
end
local weights = load_weights()
for _, st in ipairs(payload.subtasks) do
  if st.n_needs == 0 then make_ready(jid, st.id, weights) end
end
if payload.idem_key ~= '' then
  redis.call('SET', payload.idem_key, jid, 'EX', payload.idem_ttl)
end
return {'created', jid, job.request_hash}
"""

# ARGV: prefix, class, max to release, default target depth of the class (the value in
# the hash <prefix>:scheduler:target_depth wins, so every releaser honours the same one)
RELEASE = PRELUDE + r"""
local cls = ARGV[2]
local limit = tonumber(ARGV[3])
local target = tonumber(redis.call('HGET', P .. ':scheduler:target_depth', cls) or '') or tonumber(ARGV[4])
local queued_key = P .. ':queued:' .. cls
local out = {}
local w = load_weights()
local key = P .. ':backlog:' .. cls

-- Releases per priority class, decayed over share_window_s: what batch_min_share is measured on.
local rk = P .. ':scheduler:released:' .. cls
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
  local first = redis.call('ZRANGE', key .. ':' .. prio, 0, 0)
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
  local sk = skey(jid, sid)
  local f = redis.call('HMGET', sk, 'state', 'attempt', 'plugin', 'action', 'timeout', 'node')
  if f[1] ~= 'ready' then return end
  local queue = cls
  if f[6] and f[6] ~= '' then queue = 'node.' .. f[6] .. '.' .. cls end
  if prio == 'interactive' then queue = queue .. '.express' end
  redis.call('HSET', sk, 'state', 'queued', 'queued_at', NOW, 'queue', queue)
  redis.call('ZADD', queued_key, NOW, m)
  redis.call('ZADD', P .. ':dispatching', NOW, m .. '|' .. f[2])
  event(jid, 'subtask', sid, 'queued', {attempt = tonumber(f[2]), queue = queue})
  if shares[prio] then shares[prio] = shares[prio] + 1 end
  table.insert(out, {job_id = jid, subtask_id = sid, attempt = tonumber(f[2]),
    plugin = f[3], action = f[4], resource_class = cls, timeout = tonumber(f[5]),
    priority = prio, queue = queue})
end

local n = math.min(limit, target - redis.call('ZCARD', queued_key))
for _ = 1, n do
  local m, prio = next_member()
  if not m then break end
  release_member(m, prio)
end

-- The express lane: interactive work may exceed the target depth by the live nodes' express
-- slots for this class, so that it does not wait for a batch subtask to end to be released.
if #out < limit and redis.call('HGET', P .. ':backlog_count:' .. cls, 'interactive') then
  local express = 0
  local names = redis.call('SMEMBERS', P .. ':nodes')
  for _, name in ipairs(names) do
    local raw = redis.call('GET', P .. ':node:' .. name)
    if raw then
      local ok, info = pcall(cjson.decode, raw)
      if ok and type(info.express_slots) == 'table' then express = express + (tonumber(info.express_slots[cls]) or 0) end
    end
  end
  local room = math.min(limit - #out, target + express - redis.call('ZCARD', queued_key))
  for _ = 1, room do
    local m, prio = take_lowest_of('interactive')
    if not m then break end
    release_member(m, prio)
  end
end

if #out > 0 then
  redis.call('HSET', rk, 't', NOW, 'interactive', shares.interactive, 'normal', shares.normal, 'batch', shares.batch)
end
return cjson.encode(out)
"""

# ARGV: prefix, members "jid|sid|attempt"... (sent to the broker: no longer at risk)
DISPATCHED = PRELUDE + r"""
for i = 2, #ARGV do redis.call('ZREM', P .. ':dispatching', ARGV[i]) end
return #ARGV - 1
"""

# ARGV: prefix, max per call. Due retries become ready again.
PROMOTE_DELAYED = PRELUDE + r"""
local due = redis.call('ZRANGEBYSCORE', P .. ':delayed', '-inf', NOW, 'LIMIT', 0, tonumber(ARGV[2]))
for _, m in ipairs(due) do
  redis.call('ZREM', P .. ':delayed', m)
  local sep = string.find(m, '|', 1, true)
  local jid = string.sub(m, 1, sep - 1)
  local sid = string.sub(m, sep + 1)
  if redis.call('HGET', skey(jid, sid), 'state') == 'retry_wait' then make_ready(jid, sid) end
end
return #due
"""

# ARGV: prefix, jid, sid, attempt, node, pid, lease ttl, dead pid ('' unless taking over),
# max lost attempts, claim token (one per delivery, so that a claim retried after its reply
# was lost in a Redis blip is recognised as the same claim).
# A running attempt is taken over (same attempt, counted as lost) when its owner process on
# this node is dead or its lease has expired; never when its job has ended or it was lost
# too often (then it is cancelled or failed instead).
CLAIM = PRELUDE + r"""
local jid, sid, attempt, node, pid, ttl, dead = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8]
local max_lost, token = tonumber(ARGV[9]), ARGV[10] or ''
local sk = skey(jid, sid)
local f = redis.call('HMGET', sk, 'state', 'attempt', 'owner_node', 'owner_pid', 'resource_class', 'args', 'needs',
  'claim_token')
if not f[1] then return {'drop', 'unknown subtask'} end
local job_state = redis.call('HGET', jkey(jid), 'state')
if f[2] ~= attempt then return {'drop', 'stale attempt ' .. attempt .. ', current is ' .. f[2]} end
local m = member(jid, sid)
local retried = false
if f[1] == 'running' then
  local lease = tonumber(redis.call('ZSCORE', P .. ':running', m))
  local why
  if token ~= '' and f[8] == token and f[3] == node and f[4] == pid then
    retried = true
  elseif dead ~= '' and f[3] == node and f[4] == dead then
    why = 'process ' .. dead .. ' on node ' .. node .. ' died'
  elseif lease and lease < NOW and not (f[3] == node and f[4] == pid) then
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
redis.call('ZREM', P .. ':queued:' .. f[5], m)
redis.call('ZREM', P .. ':dispatching', m .. '|' .. attempt)
redis.call('ZADD', P .. ':running', NOW + ttl, m)
if not retried then
  redis.call('HSET', sk, 'state', 'running', 'owner_node', node, 'owner_pid', pid, 'started_at', NOW,
    'progress', '', 'progress_message', '', 'claim_token', token)
end
if f[1] == 'queued' then
  event(jid, 'subtask', sid, 'running', {attempt = tonumber(attempt), node = node})
end
local outputs = {}
for _, dep in ipairs(cjson.decode(f[7])) do
  outputs[dep] = redis.call('HGET', skey(jid, dep), 'output') or 'null'
end
local checkpoint = redis.call('HGET', sk, 'checkpoint') or ''
if checkpoint ~= '' and not retried then
  redis.call('HINCRBY', sk, 'resumed', 1)
  event(jid, 'subtask', sid, 'resumed', {attempt = tonumber(attempt),
    checkpoint_at = tonumber(redis.call('HGET', sk, 'checkpoint_at'))})
end
return {'run', f[6], cjson.encode(outputs), checkpoint}
"""

# ARGV: prefix, jid, sid, attempt, node, pid, state json
CHECKPOINT = PRELUDE + r"""
local jid, sid, attempt, node, pid = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local sk = skey(jid, sid)
local f = redis.call('HMGET', sk, 'state', 'attempt', 'owner_node', 'owner_pid')
if f[1] ~= 'running' or f[2] ~= attempt or f[3] ~= node or f[4] ~= pid then
  return 0
end
redis.call('HSET', sk, 'checkpoint', ARGV[7], 'checkpoint_at', NOW)
return 1
"""

# ARGV: prefix, jid, sid, attempt, node, pid, lease ttl, progress ('' or number), message
RENEW = PRELUDE + r"""
local jid, sid, attempt, node, pid, ttl = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7])
local sk = skey(jid, sid)
local f = redis.call('HMGET', sk, 'state', 'attempt', 'owner_node', 'owner_pid')
if f[1] ~= 'running' or f[2] ~= attempt or f[3] ~= node or f[4] ~= pid then
  return {'lost', f[1] or 'gone'}
end
redis.call('ZADD', P .. ':running', 'XX', NOW + ttl, member(jid, sid))
if ARGV[8] ~= '' then
  redis.call('HSET', sk, 'progress', ARGV[8], 'progress_message', ARGV[9])
  event(jid, 'progress', sid, nil, {progress = tonumber(ARGV[8]), message = ARGV[9]})
end
return {'ok', redis.call('HGET', jkey(jid), 'state')}
"""

# ARGV: prefix, jid, sid, attempt, node, pid, outcome, output json, error, retryable, usage json or ""
COMPLETE = PRELUDE + r"""
local jid, sid, attempt, node, pid, outcome = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7]
local sk = skey(jid, sid)
local f = redis.call('HMGET', sk, 'state', 'attempt', 'owner_node', 'owner_pid', 'dependents')
if f[1] ~= 'running' or f[2] ~= attempt or f[3] ~= node or f[4] ~= pid then
  return {'stale', f[1] or 'gone'}
end
redis.call('ZREM', P .. ':running', member(jid, sid))
redis.call('HSET', sk, 'last_node', node)
if ARGV[11] and ARGV[11] ~= '' then
  -- What the attempt used, recorded with its end so that a finished job always shows it.
  for name, value in pairs(cjson.decode(ARGV[11])) do redis.call('HSET', sk, name, value) end
end
local jk = jkey(jid)
redis.call('HSET', jk, 'updated_at', NOW)
local job_state = redis.call('HGET', jk, 'state')
if outcome == 'succeeded' then
  redis.call('HSET', sk, 'state', 'succeeded', 'finished_at', NOW, 'output', ARGV[8], 'error', '',
    'progress', 1)
  settle(jid, sid)
  event(jid, 'subtask', sid, 'succeeded', {attempt = tonumber(attempt)})
  if job_state ~= 'running' then return {'done', job_state, ''} end
  local classes = {}
  for _, dep in ipairs(cjson.decode(f[5])) do
    local dk = skey(jid, dep)
    if redis.call('HINCRBY', dk, 'deps_left', -1) == 0 and redis.call('HGET', dk, 'state') == 'waiting' then
      make_ready(jid, dep)
      classes[redis.call('HGET', dk, 'resource_class')] = true
    end
  end
  -- This attempt's slot frees room under its class's target depth: let the worker refill it.
  local own = redis.call('HGET', sk, 'resource_class')
  if redis.call('ZCARD', P .. ':backlog:' .. own) > 0 then classes[own] = true end
  local new_state = job_state
  if redis.call('HINCRBY', jk, 'remaining', -1) == 0 then
    new_state = finish_job(jid, 'succeeded', nil, nil)
  end
  local ready = {}
  for cls, _ in pairs(classes) do table.insert(ready, cls) end
  return {'done', new_state, table.concat(ready, ',')}
elseif outcome == 'cancelled' or job_state ~= 'running' then
  redis.call('HSET', sk, 'state', 'cancelled', 'finished_at', NOW, 'error', ARGV[9],
    'owner_node', '', 'owner_pid', '')
  settle(jid, sid)
  event(jid, 'subtask', sid, 'cancelled', {attempt = tonumber(attempt)})
  return {'done', job_state, ''}
end
fail_attempt(jid, sid, ARGV[9], ARGV[10] == '1')
return {'done', redis.call('HGET', jk, 'state'), ''}
"""

# ARGV: prefix, jid, sid, attempt, node, pid, max lost attempts, why.
# The attempt's plugin process was killed by something no limit of its own explains (the OOM
# killer, an operator): a lost attempt, not a failed one. Returns {'requeued', class} (a new
# attempt, ready now), {'cancelled'|'failed', ''} or {'stale', state}.
LOST = PRELUDE + r"""
local jid, sid, attempt, node, pid = ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6]
local sk = skey(jid, sid)
local f = redis.call('HMGET', sk, 'state', 'attempt', 'owner_node', 'owner_pid', 'resource_class')
if f[1] ~= 'running' or f[2] ~= attempt or f[3] ~= node or f[4] ~= pid then
  return {'stale', f[1] or 'gone'}
end
redis.call('HSET', sk, 'last_node', node)
local verdict = count_lost(jid, sid, tonumber(ARGV[7]), ARGV[8])
if verdict ~= 'lost' then return {verdict, ''} end
requeue_lost(jid, sid, ARGV[8])
return {'requeued', f[5]}
"""

# ARGV: prefix, node, pids json, max lost attempts. Processes of `node` that its supervisor saw
# die: their attempts are lost now, not when their leases run out, so they run again at once
# on any box. Returns the resource classes that have a new attempt ready.
LOSE_PROCESSES = PRELUDE + r"""
local node, max_lost = ARGV[2], tonumber(ARGV[4])
local dead = {}
for _, p in ipairs(cjson.decode(ARGV[3])) do dead[tostring(p)] = true end
local classes, out = {}, {}
for _, m in ipairs(redis.call('ZRANGE', P .. ':running', 0, -1)) do
  local sep = string.find(m, '|', 1, true)
  local jid = string.sub(m, 1, sep - 1)
  local sid = string.sub(m, sep + 1)
  local f = redis.call('HMGET', skey(jid, sid), 'state', 'owner_node', 'owner_pid', 'resource_class')
  if f[1] == 'running' and f[2] == node and dead[f[3]] then
    local why = 'process ' .. f[3] .. ' on node ' .. node .. ' died'
    if count_lost(jid, sid, max_lost, why) == 'lost' then
      requeue_lost(jid, sid, why)
      if not classes[f[4]] then classes[f[4]] = true; table.insert(out, f[4]) end
    end
  end
end
return out
"""

# ARGV: prefix, jid
CANCEL = PRELUDE + r"""
local jid = ARGV[2]
local state = redis.call('HGET', jkey(jid), 'state')
if not state then return 'missing' end
if state ~= 'running' then return state end
return finish_job(jid, 'cancelled', 'cancelled by request', nil)
"""

# ARGV: prefix, max lost attempts, dispatch grace seconds, batch size, stranded-after seconds.
# Leases that expired belong to dead processes or dead nodes: give the subtask a new attempt.
REAP = PRELUDE + r"""
local max_lost, grace, batch = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local expired = redis.call('ZRANGEBYSCORE', P .. ':running', '-inf', NOW, 'LIMIT', 0, batch)
local requeued = 0
for _, m in ipairs(expired) do
  redis.call('ZREM', P .. ':running', m)
  local sep = string.find(m, '|', 1, true)
  local jid = string.sub(m, 1, sep - 1)
  local sid = string.sub(m, sep + 1)
  local sk = skey(jid, sid)
  if redis.call('HGET', sk, 'state') == 'running' then
    local msg = 'lease expired on node ' .. redis.call('HGET', sk, 'owner_node') .. ' (worker lost)'
    if count_lost(jid, sid, max_lost, msg) == 'lost' then
      requeue_lost(jid, sid, msg)
      requeued = requeued + 1
    end
  end
end
-- A releaser that died between popping the backlog and sending to the broker.
local stuck = redis.call('ZRANGEBYSCORE', P .. ':dispatching', '-inf', NOW - grace, 'LIMIT', 0, batch)
for _, m in ipairs(stuck) do
  redis.call('ZREM', P .. ':dispatching', m)
  local a = string.find(m, '|', 1, true)
  local b = string.find(m, '|', a + 1, true)
  local jid = string.sub(m, 1, a - 1)
  local sid = string.sub(m, a + 1, b - 1)
  local sk = skey(jid, sid)
  local f = redis.call('HMGET', sk, 'state', 'attempt', 'resource_class')
  if f[1] == 'queued' and f[2] == string.sub(m, b + 1) then
    redis.call('ZREM', P .. ':queued:' .. f[3], member(jid, sid))
    make_ready(jid, sid)
    requeued = requeued + 1
  end
end
-- A message a worker had prefetched when its broker connection broke is stranded in kombu's
-- unacked set until the visibility timeout. Subtasks queued that long while their queue is
-- empty are released again; if the first message does turn up, its claim is refused.
local stranded_after = tonumber(ARGV[5])
for _, cls in ipairs({'cpu', 'gpu', 'io'}) do
  local old = redis.call('ZRANGEBYSCORE', P .. ':queued:' .. cls, '-inf', NOW - stranded_after, 'LIMIT', 0, batch)
  for _, m in ipairs(old) do
    local sep = string.find(m, '|', 1, true)
    local jid = string.sub(m, 1, sep - 1)
    local sid = string.sub(m, sep + 1)
    local sk = skey(jid, sid)
    local queue = redis.call('HGET', sk, 'queue')
    local waiting = redis.call('LLEN', queue)
    for pri = 1, 9 do waiting = waiting + redis.call('LLEN', queue .. ':' .. pri) end
    if waiting == 0 and redis.call('HGET', sk, 'state') == 'queued' then
      redis.call('ZREM', P .. ':queued:' .. cls, m)
      event(jid, 'subtask', sid, 'requeued', {error = 'message stranded in the broker; sent again'})
      make_ready(jid, sid)
      requeued = requeued + 1
    elseif waiting > 0 then
      break
    end
  end
end
return requeued
"""


# ARGV: prefix, changes json {name: number}, reason, classes json. Set, log, rescore: one step.
SET_WEIGHTS = PRELUDE + r"""
local changes = cjson.decode(ARGV[2])
local key = P .. ':scheduler:weights'
local logged = {}
for name, value in pairs(changes) do
  local old = redis.call('HGET', key, name)
  redis.call('HSET', key, name, value)
  logged[name] = {old = tonumber(old), new = tonumber(value)}
end
log_change('weights', logged, ARGV[3])
local w = load_weights()
local n = 0
for _, cls in ipairs(cjson.decode(ARGV[4])) do n = n + rescore(cls, w) end
return n
"""

# ARGV: prefix, classes json. Returns json {class: {"total": ZCARD, "counts": {priority: n}}}.
# Read-mostly: a class whose counts do not add up to its backlog (or has a negative one) is
# recounted from the backlog members and their jobs, once, and the counts are rewritten.
BACKLOG_COUNTS = PRELUDE + r"""
local out = {}
for _, cls in ipairs(cjson.decode(ARGV[2])) do
  local key, ck = P .. ':backlog:' .. cls, P .. ':backlog_count:' .. cls
  local total = redis.call('ZCARD', key)
  local raw = redis.call('HGETALL', ck)
  local counts, sum, sane = {}, 0, true
  for i = 1, #raw, 2 do
    local n = tonumber(raw[i + 1]) or -1
    if n < 0 then sane = false end
    counts[raw[i]] = n
    sum = sum + n
  end
  if sum ~= total or not sane then
    counts = {}
    for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
      local jid = string.sub(m, 1, string.find(m, '|', 1, true) - 1)
      local prio = redis.call('HGET', jkey(jid), 'priority') or 'normal'
      counts[prio] = (counts[prio] or 0) + 1
    end
    redis.call('DEL', ck)
    for prio, n in pairs(counts) do redis.call('HSET', ck, prio, n) end
  end
  out[cls] = {total = total, counts = counts}
end
return cjson.encode(out)
"""

# ARGV: prefix, defaults json {name: number}. A router's settings fill in what Redis lacks.
SEED_WEIGHTS = PRELUDE + r"""
local n = 0
for name, value in pairs(cjson.decode(ARGV[2])) do
  n = n + redis.call('HSETNX', P .. ':scheduler:weights', name, value)
end
return n
"""

# ARGV: prefix, class, depth, reason
SET_TARGET_DEPTH = PRELUDE + r"""
local key = P .. ':scheduler:target_depth'
local old = redis.call('HGET', key, ARGV[2])
redis.call('HSET', key, ARGV[2], ARGV[3])
log_change('target_depth', {[ARGV[2]] = {old = tonumber(old), new = tonumber(ARGV[3])}}, ARGV[4])
return 1
"""

# ARGV: prefix, router id, lease ms. Acquire or renew the release lease: 1 if we hold it.
LEAD = r"""
local key = ARGV[1] .. ':scheduler:leader'
local holder = redis.call('GET', key)
if holder == ARGV[2] then
  redis.call('PEXPIRE', key, ARGV[3])
  return 1
end
if not holder and redis.call('SET', key, ARGV[2], 'NX', 'PX', ARGV[3]) then return 1 end
return 0
"""

# ARGV: prefix, router id. Give the lease up (only if still ours).
RESIGN = r"""
local key = ARGV[1] .. ':scheduler:leader'
if redis.call('GET', key) == ARGV[2] then return redis.call('DEL', key) end
return 0
"""


# ARGV: prefix, age in seconds, max jobs. Retention: delete jobs that finished more than `age`
# seconds ago with everything that is theirs (job and subtask hashes, event stream, idempotency
# key, list indexes). Only jobs in `<prefix>:finished` (added by finish_job) are looked at, so a
# running job is never deleted. Returns {finished jobs as old still left, {deleted ids}}.
GC = PRELUDE + r"""
local cutoff = NOW - tonumber(ARGV[2])
local fk = P .. ':finished'
local ids = redis.call('ZRANGEBYSCORE', fk, '-inf', cutoff, 'LIMIT', 0, tonumber(ARGV[3]))
local removed = {}
for _, jid in ipairs(ids) do
  redis.call('ZREM', fk, jid)
  local jk = jkey(jid)
  local f = redis.call('HMGET', jk, 'state', 'tenant', 'order', 'idem_key')
  if f[1] ~= 'running' then
    for _, sid in ipairs(f[3] and cjson.decode(f[3]) or {}) do
      -- (a cancelled job's subtask may still run: its worker learns at its next renewal)
      redis.call('ZREM', P .. ':running', member(jid, sid))
      redis.call('ZREM', P .. ':delayed', member(jid, sid))
      redis.call('DEL', skey(jid, sid))
    end
    if f[4] and f[4] ~= '' and redis.call('GET', f[4]) == jid then redis.call('DEL', f[4]) end
    redis.call('DEL', jk, P .. ':events:' .. jid)
    local bases = {P .. ':jobs'}
    if f[2] then table.insert(bases, P .. ':jobs:t:' .. f[2]) end
    for _, base in ipairs(bases) do
      redis.call('ZREM', base, jid)
      for _, st in ipairs({'succeeded', 'failed', 'cancelled', 'running'}) do
        redis.call('ZREM', base .. ':s:' .. st, jid)
      end
    end
    table.insert(removed, jid)
  end
end
return {redis.call('ZCOUNT', fk, '-inf', cutoff), removed}
"""
