-- ARGV: prefix, schedule id, expected next_at, op ('fire' | 'skip'), fire time (skip: the first of
-- the range), until (skip: the last of the range), count (skip), reason ('', 'catch_up', 'missed'),
-- new next_at, new due_at, runs kept. All times in ms.
--
-- Claims one fire time (or skips a range of missed ones) and moves the schedule on, only if its
-- next_at is still the one the caller computed from: of several routers (or one that restarted
-- mid-way) exactly one claims each fire time. A claimed fire time is 'pending' (and in
-- K.schedules_pending()) until schedule_record.lua records the job its idempotency key made.
-- Answers {verdict, current next_at}: fire, overlap (skipped: the previous job still runs),
-- skip, moved (another claim came first), paused, gone.
local sid = ARGV[2]
local sk = K.schedule(sid)
local f = redis.call('HMGET', sk, 'state', 'next_at', 'overlap', 'last_job', 'pending')
if not f[1] then return {'gone', ''} end
if f[1] ~= 'active' then return {'paused', f[2] or ''} end
if f[2] ~= ARGV[3] then return {'moved', f[2] or ''} end
local op, fire, reason = ARGV[4], ARGV[5], ARGV[8]
local verdict = op
if op == 'fire' and f[3] == 'skip' then
  local pending = f[5] and f[5] ~= ''
  local running = f[4] and f[4] ~= '' and redis.call('HGET', K.job(f[4]), 'state') == 'running'
  if pending or running then verdict = 'overlap' end
end
local record
if verdict == 'fire' then
  record = {fire_at = fire, state = 'pending', reason = reason}
  redis.call('HSET', sk, 'pending', fire)
  redis.call('HINCRBY', sk, 'fired', 1)
  redis.call('ZADD', K.schedules_pending(), NOW, sid .. '|' .. fire)
elseif verdict == 'overlap' then
  record = {fire_at = fire, state = 'skipped', reason = 'overlap', job_id = f[4]}
  redis.call('HINCRBY', sk, 'skipped', 1)
else
  record = {fire_at = fire, ['until'] = ARGV[6], count = tonumber(ARGV[7]), state = 'skipped', reason = reason}
  redis.call('HINCRBY', sk, 'skipped', tonumber(ARGV[7]))
end
redis.call('HSET', sk, 'next_at', ARGV[9], 'updated_at', NOW)
redis.call('ZADD', K.schedules_due(), ARGV[10], sid)
local rk, hk = K.schedule_runs(sid), K.schedule_run(sid)
redis.call('ZADD', rk, fire, fire)
redis.call('HSET', hk, fire, cjson.encode(record))
local extra = redis.call('ZCARD', rk) - tonumber(ARGV[11])
if extra > 0 then
  local old = redis.call('ZRANGE', rk, 0, extra - 1)
  redis.call('ZREMRANGEBYRANK', rk, 0, extra - 1)
  redis.call('HDEL', hk, unpack(old))
end
return {verdict, ARGV[9]}
