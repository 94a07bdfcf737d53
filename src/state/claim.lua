-- Shared by append.lua and take.lua (prepended when the scripts are loaded).

-- Byte-wise comparison (Lua's `<` on strings follows the server locale).
local function bytes_lt(a, b)
  local la, lb = #a, #b
  for i = 1, math.min(la, lb) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return la < lb
end

-- Move `events` into the inflight hash under the window id (sha1 of the sorted, length-prefixed
-- event ids, as `window::window_id` computes it) and return the claim.
local function claim(events, n, inflight)
  local ids = {}
  for i, ev in ipairs(events) do ids[i] = cjson.decode(ev)['event_id'] end
  table.sort(ids, bytes_lt)
  local parts = {}
  for i, id in ipairs(ids) do parts[i] = string.len(id) .. ':' .. id end
  local wid = redis.sha1hex(table.concat(parts, ''))
  local body = '{"seq":' .. n .. ',"events":[' .. table.concat(events, ',') .. ']}'
  redis.call('HSET', inflight, wid, body)
  return {'full', wid, body}
end
