-- ARGV: prefix, jid, sid, attempt, node, pid, outcome, output json, error, retryable, usage json or ""
-- (see complete_core.lua)
-- Its slot takes nothing itself next (it would end with complete_take.lua): no longer a taker.
redis.call('ZREM', K.takers(redis.call('HGET', K.subtask(ARGV[2], ARGV[3]), 'resource_class') or ''),
  ARGV[5] .. '|' .. ARGV[6])
return complete_attempt(ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10], ARGV[11])
