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
redis.call('HSET', jk, 'id', jid, 'state', 'running', 'priority', job.priority,
  'tenant', job.tenant, 'name', job.name, 'callback_url', job.callback_url,
  'request_hash', job.request_hash, 'created_at', NOW, 'updated_at', NOW,
  'remaining', #payload.subtasks, 'order', cjson.encode(order), 'request', job.request,
  'deadline_at', '', 'idem_key', payload.idem_key)
if job.deadline_s and job.deadline_s ~= cjson.null then
  redis.call('HSET', jk, 'deadline_at', NOW + tonumber(job.deadline_s))
end
index_job(jid, job.tenant, nil, 'running', NOW)
redis.call('ZADD', K.jobs(), NOW, jid)
redis.call('ZADD', K.tenant_jobs(job.tenant), NOW, jid)
event(jid, 'job', nil, 'running', {subtasks = order})
for _, st in ipairs(payload.subtasks) do
  redis.call('HSET', K.subtask(jid, st.id), 'id', st.id, 'job_id', jid, 'plugin', st.plugin,
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
