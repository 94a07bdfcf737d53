-- Claim a partial pending window (idle flush) into the inflight hash.
-- KEYS: 1 pending (list), 2 seq (counter), 3 inflight (hash)
-- ARGV: 1 max events
-- Returns {'empty'} | {'full', window_id, '{"seq":N,"events":[...]}'}
local pending, seq, inflight = KEYS[1], KEYS[2], KEYS[3]
local max = tonumber(ARGV[1])

local function bytes_lt(a, b)
  local la, lb = #a, #b
  for i = 1, math.min(la, lb) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return la < lb
end

local events = redis.call('LRANGE', pending, 0, max - 1)
if #events == 0 then
  return {'empty'}
end
redis.call('LTRIM', pending, max, -1)
local n = redis.call('INCR', seq) -- claims take a sequence number too: inflight order
local ids = {}
for i, ev in ipairs(events) do ids[i] = cjson.decode(ev)['event_id'] end
table.sort(ids, bytes_lt)
local parts = {}
for i, id in ipairs(ids) do parts[i] = string.len(id) .. ':' .. id end
local wid = redis.sha1hex(table.concat(parts, ''))
local body = '{"seq":' .. n .. ',"events":[' .. table.concat(events, ',') .. ']}'
redis.call('HSET', inflight, wid, body)
return {'full', wid, body}
