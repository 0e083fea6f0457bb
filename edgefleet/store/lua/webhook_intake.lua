-- ARGV: prefix, how many at most. Moves ended jobs' ids from the callbacks list into the
-- webhook schedule; returns how many became deliveries.
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local moved = 0
for _ = 1, tonumber(ARGV[2]) do
  local jid = redis.call('LPOP', K.callbacks())
  if not jid then break end
  local id = 'msg_' .. jid
  local dk = K.webhook(id)
  local job = redis.call('HMGET', K.job(jid), 'callback_url', 'tenant')
  -- One delivery per job: a second push of the same id is not a second webhook.
  if job[1] and job[1] ~= '' and redis.call('EXISTS', dk) == 0 then
    redis.call('HSET', dk, 'id', id, 'job_id', jid, 'tenant', job[2] or '', 'url', job[1],
      'state', 'pending', 'attempt', 0, 'created_at', now, 'next_at', now)
    redis.call('ZADD', K.webhooks_due(), now, id)
    moved = moved + 1
  end
end
return moved
