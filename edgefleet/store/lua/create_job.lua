local payload = cjson.decode(ARGV[2])
local job = payload.job
if payload.idem_key ~= '' then
  local existing = redis.call('GET', payload.idem_key)
  if existing and redis.call('EXISTS', K.job(existing)) == 0 then existing = nil end  -- expired job
  if existing then
    return {'existing', existing, redis.call('HGET', K.job(existing), 'request_hash') or ''}
  end
end
local jid = job.id
local jk = K.job(jid)
if redis.call('EXISTS', jk) == 1 then return {'exists', jid, ''} end
local order = {}
for _, st in ipairs(payload.subtasks) do table.insert(order, st.id) end
-- Every value short, so that Redis keeps the hash a listpack (hash-max-listpack-value 64):
-- no copy of the request (nothing read it; the plan is in the subtasks), the request hash
-- and idempotency key only when there is a key, no empty deadline (issue 12: bytes per job).
redis.call('HSET', jk, 'id', jid, 'state', 'running', 'priority', job.priority,
  'tenant', job.tenant, 'name', job.name, 'callback_url', job.callback_url,
  'created_at', NOW, 'updated_at', NOW, 'remaining', #payload.subtasks, 'order', cjson.encode(order))
if payload.idem_key ~= '' then
  redis.call('HSET', jk, 'request_hash', job.request_hash, 'idem_key', payload.idem_key)
end
if job.deadline_s and job.deadline_s ~= cjson.null then
  redis.call('HSET', jk, 'deadline_at', NOW + tonumber(job.deadline_s))
end
-- Listed through the index of its state only (store/jobs.py list_jobs merges them).
index_job(jid, job.tenant, nil, 'running', NOW)
event(jid, 'job', nil, 'running', {subtasks = order})
for _, st in ipairs(payload.subtasks) do
  -- (no job id: it is in the key; no zero 'failures' and 'lost': HINCRBY starts them)
  redis.call('HSET', K.subtask(jid, st.id), 'id', st.id, 'plugin', st.plugin,
    'action', st.action, 'resource_class', st.resource_class, 'node', st.node,
    'needs', st.needs, 'dependents', st.dependents,
    'args', st.args, 'timeout', st.timeout, 'retries', st.retries,
    'retry_backoff', st.retry_backoff, 'state', 'waiting', 'attempt', 1,
    'deps_left', st.n_needs, 'owner_node', '', 'owner_pid', '', 'tenant', job.tenant)
end
local weights = load_weights()
for _, st in ipairs(payload.subtasks) do
  if st.n_needs == 0 then make_ready(jid, st.id, weights) end
end
if payload.idem_key ~= '' then
  redis.call('SET', payload.idem_key, jid, 'EX', payload.idem_ttl)
end
return {'created', jid, job.request_hash}
