-- ARGV: prefix, delivery id, attempt, delay, status, error. Written only by the claim that
-- made the attempt (same attempt number, still pending).
local due, rk = K.webhooks_due(), K.webhook(ARGV[2])
local rec = redis.call('HMGET', rk, 'attempt', 'state')
if rec[1] ~= ARGV[3] or rec[2] ~= 'pending' then return 0 end
local t = redis.call('TIME')
local at = tonumber(t[1]) + tonumber(t[2]) / 1e6 + tonumber(ARGV[4])
redis.call('HSET', rk, 'last_status', ARGV[5], 'last_error', ARGV[6], 'next_at', at)
redis.call('ZADD', due, at, ARGV[2])
return 1
