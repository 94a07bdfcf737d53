-- Append one event to a user's pending window, deduplicated by event id; when the window is
-- full, claim it atomically into the inflight hash (so it survives a crash until applied/parked).
-- KEYS: 1 pending (list), 2 seen (zset id -> seq), 3 seq (counter), 4 inflight (hash id -> window)
-- ARGV: 1 event_id, 2 event JSON, 3 window size, 4 seen cap
-- Returns {'dup'} | {'pending', n} | {'full', window_id, '{"seq":N,"events":[...]}'}
local pending, seen, seq, inflight = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local size, cap = tonumber(ARGV[3]), tonumber(ARGV[4])

-- One call both dedupes and records the id (a duplicate only burns a sequence number).
local n = redis.call('INCR', seq)
if redis.call('ZADD', seen, 'NX', n, ARGV[1]) == 0 then
  return {'dup'}
end
-- Bounded dedupe memory: keep the newest `cap` ids. The set holds at most `n` ids, so it can
-- only be over the cap once `n` is.
if n > cap and redis.call('ZCARD', seen) > cap then
  redis.call('ZREMRANGEBYRANK', seen, 0, -(cap + 1))
end
local len = redis.call('RPUSH', pending, ARGV[2])
if len < size then
  return {'pending', tostring(len)}
end

local events = redis.call('LRANGE', pending, 0, size - 1)
redis.call('LTRIM', pending, size, -1)
return claim(events, n, inflight)
