-- ARGV: prefix, then (jid, sid) pairs. For locality at release: for each subtask, how many bytes
-- of its inputs each node holds (produced them, or has them in its cache). A subtask's inputs are
-- the artifacts of the steps it needs and the `{"$artifact": id}` values in its args. Read only.
-- Returns one {node, bytes, node, bytes, ...} list per pair, in order.
local function walk(value, depth, sizes)
  if type(value) ~= 'table' or depth > 64 then return end
  local id = value['$artifact']
  if type(id) == 'string' then
    sizes[id] = tonumber(redis.call('HGET', K.artifact(id), 'size') or '0')
  end
  for _, inner in pairs(value) do walk(inner, depth + 1, sizes) end
end

local function held_by_node(jid, sid)
  local f = redis.call('HMGET', K.subtask(jid, sid), 'needs', 'args')
  local sizes = {}
  if f[1] then
    for _, dep in ipairs(cjson.decode(f[1])) do
      local raw = redis.call('HGET', K.job_artifacts(jid), dep)
      if raw then
        for _, r in ipairs(cjson.decode(raw)) do sizes[r.id] = tonumber(r.size) end
      end
    end
  end
  if f[2] and string.find(f[2], '$artifact', 1, true) then walk(cjson.decode(f[2]), 0, sizes) end
  local held = {}
  for id, size in pairs(sizes) do
    for _, n in ipairs(redis.call('SMEMBERS', K.artifact_holders(id))) do held[n] = (held[n] or 0) + size end
  end
  local out = {}
  for n, bytes in pairs(held) do
    table.insert(out, n)
    table.insert(out, string.format('%d', bytes))
  end
  return out
end

local answers = {}
for i = 2, #ARGV, 2 do table.insert(answers, held_by_node(ARGV[i], ARGV[i + 1])) end
return answers
