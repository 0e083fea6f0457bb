-- ARGV: prefix, class, node, pid, lease ttl, max lost attempts, claim token, lease grace seconds,
-- placed plugins, takes for (see take_core.lua). '' when nothing is ready, else {item, claim?} as JSON.
local taken = take_next(ARGV[2], ARGV[3], ARGV[4], tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7],
  tonumber(ARGV[8]) or 0, ARGV[9], tonumber(ARGV[10]) or 0)
if not taken then return '' end
return cjson.encode(taken)
