-- Creates one or more jobs in one call: `POST /v1/jobs` sends one, `POST /v1/jobs:batch` many.
-- ARGV[2]: {"jobs": [{"job", "subtasks", "idem_key"}, ...], "idem_ttl": seconds}.
-- Returns {created_at, then verdict, job id, request hash per job, in order}; the verdict is
-- 'created', 'existing' (its idempotency key named a live job: that job's id and hash) or
-- 'exists' (the id is taken). Jobs are created in order, so a key given twice in one call
-- makes the first job and answers the second with it.

local function create_one(item, idem_ttl, weights)
  local job = item.job
  if item.idem_key ~= '' then
    local existing = redis.call('GET', item.idem_key)
    if existing and redis.call('EXISTS', K.job(existing)) == 0 then existing = nil end  -- expired job
    if existing then
      return 'existing', existing, redis.call('HGET', K.job(existing), 'request_hash') or ''
    end
  end
  local jid = job.id
  local jk = K.job(jid)
  if redis.call('EXISTS', jk) == 1 then return 'exists', jid, '' end
  local order = {}
  for _, st in ipairs(item.subtasks) do table.insert(order, st.id) end
  -- Every value short, so that Redis keeps the hash a listpack (hash-max-listpack-value 64):
  -- no copy of the request (nothing read it; the plan is in the subtasks), the request hash
  -- and idempotency key only when there is a key, no empty deadline (issue 12: bytes per job).
  redis.call('HSET', jk, 'id', jid, 'state', 'running', 'priority', job.priority,
    'tenant', job.tenant, 'name', job.name, 'callback_url', job.callback_url,
    'created_at', NOW, 'updated_at', NOW, 'remaining', #item.subtasks, 'order', cjson.encode(order))
  if item.idem_key ~= '' then
    redis.call('HSET', jk, 'request_hash', job.request_hash, 'idem_key', item.idem_key)
  end
  if job.deadline_s and job.deadline_s ~= cjson.null then
    redis.call('HSET', jk, 'deadline_at', NOW + tonumber(job.deadline_s))
  end
  -- Listed through the index of its state only (store/jobs.py list_jobs merges them).
  index_job(jid, job.tenant, nil, 'running', NOW)
  event(jid, 'job', nil, 'running', {subtasks = order})
  for _, st in ipairs(item.subtasks) do
    -- (no job id: it is in the key; no zero 'failures' and 'lost': HINCRBY starts them)
    redis.call('HSET', K.subtask(jid, st.id), 'id', st.id, 'plugin', st.plugin,
      'action', st.action, 'resource_class', st.resource_class, 'node', st.node,
      'needs', st.needs, 'dependents', st.dependents,
      'args', st.args, 'timeout', st.timeout, 'retries', st.retries,
      'retry_backoff', st.retry_backoff, 'state', 'waiting', 'attempt', 1,
      'deps_left', st.n_needs, 'owner_node', '', 'owner_pid', '', 'tenant', job.tenant)
  end
  for _, st in ipairs(item.subtasks) do
    if st.n_needs == 0 then make_ready(jid, st.id, weights) end
  end
  if item.idem_key ~= '' then
    redis.call('SET', item.idem_key, jid, 'EX', idem_ttl)
  end
  return 'created', jid, job.request_hash
end

local payload = cjson.decode(ARGV[2])
local weights = load_weights()
-- %.17g: the exact double the job hashes hold, not Lua's 14-digit tostring.
local out = {string.format('%.17g', NOW)}
for _, item in ipairs(payload.jobs) do
  local verdict, jid, hash = create_one(item, payload.idem_ttl, weights)
  table.insert(out, verdict)
  table.insert(out, jid)
  table.insert(out, hash)
end
return out
