-- ARGV: prefix, jid, sid, attempt, node, pid, lease ttl, dead pid ('' unless taking over),
-- max lost attempts, claim token, lease grace seconds, takes for (see claim_core.lua).
return claim_attempt(ARGV[2], ARGV[3], ARGV[4], ARGV[5], ARGV[6], tonumber(ARGV[7]), ARGV[8], tonumber(ARGV[9]),
  ARGV[10] or '', tonumber(ARGV[11]) or 0, tonumber(ARGV[12]) or 0)
