-- ARGV: prefix, delivery id, attempt, state, status, error, keep ms. Written only by the
-- claim that made the attempt (same attempt number, still pending).
local due, rk = K.webhooks_due(), K.webhook(ARGV[2])
local rec = redis.call('HMGET', rk, 'attempt', 'state')
if rec[1] ~= ARGV[3] or rec[2] ~= 'pending' then return 0 end
local t = redis.call('TIME')
redis.call('HSET', rk, 'state', ARGV[4], 'last_status', ARGV[5], 'last_error', ARGV[6],
  'finished_at', tonumber(t[1]) + tonumber(t[2]) / 1e6)
redis.call('ZREM', due, ARGV[2])
if tonumber(ARGV[7]) > 0 then redis.call('PEXPIRE', rk, ARGV[7]) else redis.call('DEL', rk) end
return 1
