-- ARGV: prefix, then complete.lua's ten (jid .. usage), then take.lua's nine (class .. takes
-- for): an attempt's end and, once it is recorded, its slot's next subtask taken in the same
-- call. {"done": the completion's answer, "taken": {item, claim?} or absent} as JSON.
-- The slot stays a taker through the completion (it is about to take: its class's queue need not
-- be refilled for it); take_next says whether it still is one after.
local done = complete_attempt(ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], ARGV[7], ARGV[8], ARGV[9], ARGV[10],
  ARGV[11])
if done[1] ~= 'done' then
  redis.call('ZREM', K.takers(ARGV[12]), ARGV[13] .. '|' .. ARGV[14])
  return cjson.encode({done = done})
end
local taken = take_next(ARGV[12], ARGV[13], ARGV[14], tonumber(ARGV[15]), tonumber(ARGV[16]), ARGV[17],
  tonumber(ARGV[18]) or 0, ARGV[19], tonumber(ARGV[20]) or 0)
return cjson.encode({done = done, taken = taken})
