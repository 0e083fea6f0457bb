-- ARGV: prefix, schedule id, fire time (ms), state ('created' | 'failed'), job id, error.
-- What a claimed fire time came to: its job (made, or found by its idempotency key) or the
-- reason none was made. Safe to repeat: a router that retries a pending claim records the same job.
local sid, fire = ARGV[2], ARGV[3]
redis.call('ZREM', K.schedules_pending(), sid .. '|' .. fire)
local sk = K.schedule(sid)
if redis.call('EXISTS', sk) == 0 then return 'gone' end
if redis.call('HGET', sk, 'pending') == fire then redis.call('HSET', sk, 'pending', '') end
if ARGV[4] == 'created' then
  local last = tonumber(redis.call('HGET', sk, 'last_fire') or '') or -1
  if tonumber(fire) >= last then redis.call('HSET', sk, 'last_job', ARGV[5], 'last_fire', fire) end
end
local hk = K.schedule_run(sid)
local raw = redis.call('HGET', hk, fire)
if raw then
  local record = cjson.decode(raw)
  record.state = ARGV[4]
  if ARGV[5] ~= '' then record.job_id = ARGV[5] end
  if ARGV[6] ~= '' then record.error = ARGV[6] end
  redis.call('HSET', hk, fire, cjson.encode(record))
end
return 'recorded'
