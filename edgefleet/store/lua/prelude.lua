-- The job store's shared Lua: every store script that changes a job starts with it.
--
-- Every state transition runs as one script, so a crash of any caller either happened
-- before the transition or after it, never half-way. Before this file each script gets a
-- generated header (edgefleet/store/scripts.py): `P` (the key prefix, ARGV[1]), the key
-- functions `K` built from edgefleet/keys.py, and the score constants; then the scoring
-- function (edgefleet/scheduling/lua/score.lua). edgefleet targets one Redis, not a
-- cluster. Timestamps come from Redis' TIME so that boxes with skewed clocks agree on
-- leases and backoffs.
--
-- Per-tenant counters `K.tenant_active(tenant)` count the subtasks of a tenant that are
-- ready, queued, running or waiting for a retry: a subtask's hash field `active` is 1
-- while it is counted, so every transition counts it at most once.
--
-- Each class backlog has a count per priority class beside it, the hash
-- `K.backlog_count(class)` (field = the job's priority class, absent when 0), for the
-- `edgefleet_backlog_depth{resource_class, priority_class}` gauge, and a per-priority
-- mirror `K.backlog_of_priority(class, priority)` (same members and scores), where RELEASE
-- finds the next batch member when batch is owed its minimum share (`batch_min_share`,
-- measured on `K.released(class)`). Every script that adds to or takes from a backlog goes
-- through `backlog_add` / `backlog_remove` / `backlog_popped`, which move the count only
-- when the sorted set really changed (ZADD and ZREM return values), so all three change
-- together in one atomic step. A job's priority class never changes after creation.
-- `backlog_counts.lua` reads them and recounts a class whose counts do not add up to its
-- backlog (data written before the counts existed).
--
-- Retention: `finish_job` adds each job that ends to `K.finished()` (score: finished_at);
-- `gc.lua` deletes the jobs there that finished long enough ago, with all their keys.

local function now()
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local NOW = now()
local function member(jid, sid) return jid .. '|' .. sid end

-- Worker slots of a class that will take their next subtask themselves when the one they run ends
-- (`K.takers(class)`, "node|pid" -> until when; put there by the claim, taken out by the
-- completion, or by time if the process died): the class's queue need not hold a message for them.
local function live_takers(cls)
  local key = K.takers(cls)
  redis.call('ZREMRANGEBYSCORE', key, '-inf', NOW)
  return redis.call('ZCARD', key)
end

-- The backlog of a class, its count per priority class and its per-priority mirror
-- `K.backlog_of_priority(class, priority)` (same members and scores) change together.
local function job_priority(jid) return redis.call('HGET', K.job(jid), 'priority') or 'normal' end
local function backlog_counted(cls, prio, delta)
  local ck = K.backlog_count(cls)
  if redis.call('HINCRBY', ck, prio, delta) == 0 then redis.call('HDEL', ck, prio) end
end
-- Slots that linger for work (take_core.lua) are woken, one token per new member, at most one
-- token per lingering slot waiting (a woken slot takes in the release order, whatever it was woken for).
local function backlog_add(cls, score, jid, sid)
  local m, prio = member(jid, sid), job_priority(jid)
  redis.call('ZADD', K.backlog_of_priority(cls, prio), score, m)
  if redis.call('ZADD', K.backlog(cls), score, m) == 1 then
    backlog_counted(cls, prio, 1)
    local lingering = redis.call('ZCOUNT', K.lingering(cls), NOW, '+inf')
    if lingering > 0 then
      local wk = K.wake(cls)
      redis.call('LPUSH', wk, '1')
      redis.call('LTRIM', wk, 0, lingering - 1)
      redis.call('PEXPIRE', wk, 60000)
    end
  end
end
-- Both return the member's priority class.
local function backlog_remove(cls, jid, sid)
  local m, prio = member(jid, sid), job_priority(jid)
  redis.call('ZREM', K.backlog_of_priority(cls, prio), m)
  if redis.call('ZREM', K.backlog(cls), m) == 1 then backlog_counted(cls, prio, -1) end
  return prio
end
-- A member that ZPOPMIN took from the backlog of cls.
local function backlog_popped(cls, jid, m)
  local prio = job_priority(jid)
  redis.call('ZREM', K.backlog_of_priority(cls, prio), m)
  backlog_counted(cls, prio, -1)
  return prio
end

-- A job's events: one packed string each in the list `K.job_events(jid)` (a small list is one
-- listpack: tens of bytes an event, where a stream per job cost ~4.7 KB), and a doorbell
-- entry {j = jid} in the shared, capped stream `K.event_feed()` whose id is the event's id,
-- so that a follower blocks on one stream for every job (edgefleet/store/events.py reads
-- both and unpacks). Packed: id, type, ts, subtask, state, data (JSON), tab-separated, ''
-- for none (step ids have no tab; cjson escapes control characters). The list keeps its
-- newest EVENTS_PER_JOB, as the stream per job did with MAXLEN ~ 5000.
local EVENTS_PER_JOB = 5000
local EVENT_FEED_LEN = 2000  -- >= the reader's XREAD COUNT: a full batch tells a reader it may have missed some
local function event(jid, kind, sid, state, extra)
  local id = redis.call('XADD', K.event_feed(), 'MAXLEN', '~', EVENT_FEED_LEN, '*', 'j', jid)
  local data = extra and cjson.encode(extra) or ''
  if data == '{}' then data = '' end
  local lk = K.job_events(jid)
  local n = redis.call('RPUSH', lk, table.concat({id, kind, tostring(NOW), sid or '', state or '', data}, '\t'))
  if n > EVENTS_PER_JOB then redis.call('LTRIM', lk, -EVENTS_PER_JOB, -1) end
end

local function index_job(jid, tenant, old_state, new_state, created)
  if old_state then
    redis.call('ZREM', K.jobs_in_state(old_state), jid)
    redis.call('ZREM', K.tenant_jobs_in_state(tenant, old_state), jid)
  end
  redis.call('ZADD', K.jobs_in_state(new_state), created, jid)
  redis.call('ZADD', K.tenant_jobs_in_state(tenant, new_state), created, jid)
end

local function tenant_of(jid, sk)
  local t = redis.call('HGET', sk, 'tenant')
  if not t or t == '' then t = redis.call('HGET', K.job(jid), 'tenant') or '' end
  return t
end

-- The subtask no longer counts toward its tenant's load (finished, cancelled, failed for good).
local function settle(jid, sid)
  local sk = K.subtask(jid, sid)
  if redis.call('HGET', sk, 'active') == '1' then
    redis.call('HSET', sk, 'active', '0')
    local tk = K.tenant_active(tenant_of(jid, sk))
    if redis.call('DECR', tk) <= 0 then redis.call('DEL', tk) end
  end
end

local function subtask_score(w, jid, sk)
  local f = redis.call('HMGET', sk, 'ready_at', 'tenant_load')
  local jf = redis.call('HMGET', K.job(jid), 'priority', 'deadline_at')
  local deadline = nil
  if jf[2] and jf[2] ~= '' then deadline = tonumber(jf[2]) end
  return effective_score(w, jf[1] or 'normal', tonumber(f[1]) or NOW, tonumber(f[2]) or 0, deadline)
end

local function make_ready(jid, sid, w)
  local sk = K.subtask(jid, sid)
  local f = redis.call('HMGET', sk, 'resource_class', 'active')
  local tk = K.tenant_active(tenant_of(jid, sk))
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
  local key = K.backlog(cls)
  local members = redis.call('ZRANGE', key, 0, -1)
  for _, m in ipairs(members) do
    local sep = string.find(m, '|', 1, true)
    local jid = string.sub(m, 1, sep - 1)
    local sid = string.sub(m, sep + 1)
    local score = subtask_score(w, jid, K.subtask(jid, sid))
    redis.call('ZADD', key, score, m)
    redis.call('ZADD', K.backlog_of_priority(cls, job_priority(jid)), score, m)
  end
  return #members
end

local function log_change(kind, changes, reason)
  local key = K.changes()
  redis.call('LPUSH', key, cjson.encode({ts = NOW, kind = kind, changes = changes, reason = reason}))
  redis.call('LTRIM', key, 0, 19)
end

-- Take a subtask out of every waiting structure (backlog, delayed, queued, dispatching).
local function unlist(jid, sid)
  local sk = K.subtask(jid, sid)
  local cls = redis.call('HGET', sk, 'resource_class')
  local m = member(jid, sid)
  backlog_remove(cls, jid, sid)
  redis.call('ZREM', K.queued(cls), m)
  redis.call('ZREM', K.delayed(), m)
end

local function finish_job(jid, new_state, err, failed_sid)
  local jk = K.job(jid)
  local old = redis.call('HGET', jk, 'state')
  if old ~= 'running' then return old end
  redis.call('HSET', jk, 'state', new_state, 'finished_at', NOW, 'updated_at', NOW)
  redis.call('ZADD', K.finished(), NOW, jid)  -- retention: GC deletes it once old enough
  if err then redis.call('HSET', jk, 'error', err) end
  if failed_sid then redis.call('HSET', jk, 'failed_subtask', failed_sid) end
  index_job(jid, redis.call('HGET', jk, 'tenant'), old, new_state,
            tonumber(redis.call('HGET', jk, 'created_at')))
  -- Anything not started yet never will be; running ones learn it on their next lease renewal.
  local order = cjson.decode(redis.call('HGET', jk, 'order'))
  for _, sid in ipairs(order) do
    local sk = K.subtask(jid, sid)
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
    redis.call('RPUSH', K.callbacks(), jid)
  end
  return new_state
end

-- A failed attempt: back off and retry while the budget lasts, else fail the job.
local function fail_attempt(jid, sid, err, retryable)
  local sk = K.subtask(jid, sid)
  local failures = redis.call('HINCRBY', sk, 'failures', 1)
  local retries = tonumber(redis.call('HGET', sk, 'retries'))
  local attempt = tonumber(redis.call('HGET', sk, 'attempt'))
  local job_state = redis.call('HGET', K.job(jid), 'state')
  redis.call('HSET', sk, 'error', err, 'owner_node', '', 'owner_pid', '')
  if job_state == 'running' and retryable and failures <= retries then
    local backoff = tonumber(redis.call('HGET', sk, 'retry_backoff')) * (2 ^ (failures - 1))
    redis.call('HSET', sk, 'state', 'retry_wait', 'attempt', attempt + 1)
    redis.call('ZADD', K.delayed(), NOW + backoff, member(jid, sid))
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
  local sk = K.subtask(jid, sid)
  local lost = redis.call('HINCRBY', sk, 'lost', 1)
  if redis.call('HGET', K.job(jid), 'state') ~= 'running' then
    redis.call('ZREM', K.running(), member(jid, sid))
    redis.call('HSET', sk, 'state', 'cancelled', 'finished_at', NOW, 'owner_node', '', 'owner_pid', '')
    settle(jid, sid)
    event(jid, 'subtask', sid, 'cancelled', {error = why})
    return 'cancelled'
  end
  if lost > max_lost then
    redis.call('ZREM', K.running(), member(jid, sid))
    fail_attempt(jid, sid, 'lost ' .. lost .. ' times (worker died while running it); last: ' .. why, false)
    return 'failed'
  end
  return 'lost'
end

-- A new attempt of a lost one, ready again whatever `retries` says: it resumes from its checkpoint.
local function requeue_lost(jid, sid, why)
  local sk = K.subtask(jid, sid)
  redis.call('ZREM', K.running(), member(jid, sid))
  local attempt = redis.call('HINCRBY', sk, 'attempt', 1)
  redis.call('HSET', sk, 'owner_node', '', 'owner_pid', '', 'claim_token', '', 'error', why)
  event(jid, 'subtask', sid, 'requeued', {attempt = attempt, error = why})
  make_ready(jid, sid)
end
