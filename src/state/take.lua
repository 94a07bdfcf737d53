-- Claim a partial pending window (idle flush) into the inflight hash.
-- KEYS: 1 pending (list), 2 seq (counter), 3 inflight (hash)
-- ARGV: 1 max events
-- Returns {'empty'} | {'full', window_id, '{"seq":N,"events":[...]}'}
local pending, seq, inflight = KEYS[1], KEYS[2], KEYS[3]
local max = tonumber(ARGV[1])

local events = redis.call('LRANGE', pending, 0, max - 1)
if #events == 0 then
  return {'empty'}
end
redis.call('LTRIM', pending, max, -1)
local n = redis.call('INCR', seq) -- claims take a sequence number too: inflight order
return claim(events, n, inflight)
