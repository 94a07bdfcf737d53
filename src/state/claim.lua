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

-- The event's id. `Event::to_json` writes `event_id` second, after the numeric schema_version,
-- so an anchored match finds it without decoding the JSON (most of a claim's cost); an id that
-- JSON had to escape, or an entry in another shape, takes the full decode.
local function event_id(ev)
  local id = string.match(ev, '^{"schema_version":%d+,"event_id":"([^"\\]*)"')
  return id or cjson.decode(ev)['event_id']
end

-- Move `events` into the inflight hash under the window id (sha1 of the sorted, length-prefixed
-- event ids, as `window::window_id` computes it) and return the claim.
local function claim(events, n, inflight)
  local ids = {}
  for i, ev in ipairs(events) do ids[i] = event_id(ev) end
  table.sort(ids, bytes_lt)
  local parts = {}
  for i, id in ipairs(ids) do parts[i] = string.len(id) .. ':' .. id end
  local wid = redis.sha1hex(table.concat(parts, ''))
  -- Claim time (server clock, ms): recovery scans leave recent claims to their owner.
  local t = redis.call('TIME')
  local at = string.format('%.0f', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000))
  local body = '{"seq":' .. n .. ',"at":' .. at .. ',"events":[' .. table.concat(events, ',') .. ']}'
  redis.call('HSET', inflight, wid, body)
  return {'full', wid, body}
end
