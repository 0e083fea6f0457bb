-- ARGV: prefix, age in seconds, max jobs. Retention: delete jobs that finished more than `age`
-- seconds ago with everything that is theirs (job and subtask hashes, events and an event stream
-- of the old form, idempotency key, list indexes; their doorbells in the capped event feed age
-- out by themselves). Only jobs in `K.finished()` (added by finish_job) are looked at, so a
-- running job is never deleted. Returns {finished jobs as old still left, {deleted ids}}.
local cutoff = NOW - tonumber(ARGV[2])
local fk = K.finished()
local ids = redis.call('ZRANGEBYSCORE', fk, '-inf', cutoff, 'LIMIT', 0, tonumber(ARGV[3]))
local removed = {}
for _, jid in ipairs(ids) do
  redis.call('ZREM', fk, jid)
  local jk = K.job(jid)
  local f = redis.call('HMGET', jk, 'state', 'tenant', 'order', 'idem_key')
  if f[1] ~= 'running' then
    for _, sid in ipairs(f[3] and cjson.decode(f[3]) or {}) do
      -- (a cancelled job's subtask may still run: its worker learns at its next renewal)
      redis.call('ZREM', K.running(), member(jid, sid))
      redis.call('ZREM', K.delayed(), member(jid, sid))
      redis.call('DEL', K.subtask(jid, sid))
    end
    if f[4] and f[4] ~= '' and redis.call('GET', f[4]) == jid then redis.call('DEL', f[4]) end
    redis.call('DEL', jk, K.job_events(jid), K.events(jid), K.job_artifacts(jid))
    redis.call('ZREM', K.jobs(), jid)  -- (the all-states indexes: only jobs made before issue 12)
    for _, st in ipairs({'succeeded', 'failed', 'cancelled', 'running'}) do
      redis.call('ZREM', K.jobs_in_state(st), jid)
    end
    if f[2] then
      redis.call('ZREM', K.tenant_jobs(f[2]), jid)
      for _, st in ipairs({'succeeded', 'failed', 'cancelled', 'running'}) do
        redis.call('ZREM', K.tenant_jobs_in_state(f[2], st), jid)
      end
    end
    table.insert(removed, jid)
  end
end
return {redis.call('ZCOUNT', fk, '-inf', cutoff), removed}
