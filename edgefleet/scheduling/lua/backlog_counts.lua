-- ARGV: prefix, classes json. Returns json {class: {"total": ZCARD, "counts": {priority: n}}}.
-- Read-mostly: a class whose counts do not add up to its backlog (or has a negative one) is
-- recounted from the backlog members and their jobs, once, and the counts are rewritten.
local out = {}
for _, cls in ipairs(cjson.decode(ARGV[2])) do
  local key, ck = K.backlog(cls), K.backlog_count(cls)
  local total = redis.call('ZCARD', key)
  local raw = redis.call('HGETALL', ck)
  local counts, sum, sane = {}, 0, true
  for i = 1, #raw, 2 do
    local n = tonumber(raw[i + 1]) or -1
    if n < 0 then sane = false end
    counts[raw[i]] = n
    sum = sum + n
  end
  if sum ~= total or not sane then
    counts = {}
    for _, m in ipairs(redis.call('ZRANGE', key, 0, -1)) do
      local jid = string.sub(m, 1, string.find(m, '|', 1, true) - 1)
      local prio = redis.call('HGET', K.job(jid), 'priority') or 'normal'
      counts[prio] = (counts[prio] or 0) + 1
    end
    redis.call('DEL', ck)
    for prio, n in pairs(counts) do redis.call('HSET', ck, prio, n) end
  end
  out[cls] = {total = total, counts = counts}
end
return cjson.encode(out)
