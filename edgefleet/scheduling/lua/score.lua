-- The effective priority of a ready subtask: the release scheduler's one formula (lower is
-- released first); `edgefleet/scheduling/priority.py` explains it. SCORE_EPOCH and
-- WEIGHT_DEFAULTS come from that module, in the header every script starts with.

-- The weights in Redis over the defaults.
local function load_weights()
  local w = {}
  for k, v in pairs(WEIGHT_DEFAULTS) do w[k] = v end
  local raw = redis.call('HGETALL', K.weights())
  for i = 1, #raw, 2 do
    local n = tonumber(raw[i + 1])
    if n then w[raw[i]] = n end
  end
  return w
end

-- priority: class name; ready_at, deadline_at (or nil): seconds; load: the tenant's other subtasks
local function effective_score(w, priority, ready_at, load, deadline_at)
  local s = w.aging * (ready_at - SCORE_EPOCH) - (w[priority] or w.normal) + w.fairness * load
  if deadline_at then
    local top = math.max(w.interactive, w.normal, w.batch)
    local cap = w.aging * (deadline_at - w.expected_run_s - SCORE_EPOCH) - top - w.deadline_slack
    if cap < s then s = cap end
  end
  return s
end
