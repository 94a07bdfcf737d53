-- Record a failed attempt at an inflight window; park it after `max_retries` retries.
-- KEYS: 1 inflight (hash), 2 attempts (hash window id -> count), 3 parked (hash)
-- ARGV: 1 window id, 2 reason, 3 max retries
-- Returns {'gone'} | {'retry', attempt} | {'parked', attempts}
local inflight, attempts, parked = KEYS[1], KEYS[2], KEYS[3]
local wid = ARGV[1]
local body = redis.call('HGET', inflight, wid)
if not body then
  return {'gone'}
end
local n = redis.call('HINCRBY', attempts, wid, 1)
if n <= tonumber(ARGV[3]) then
  return {'retry', tostring(n)}
end
-- body is '{"seq":..,"events":[..]}': prepend the reason and attempt count.
local entry = '{"reason":' .. cjson.encode(ARGV[2]) .. ',"attempts":' .. n .. ',' .. string.sub(body, 2)
redis.call('HSET', parked, wid, entry)
redis.call('HDEL', inflight, wid)
redis.call('HDEL', attempts, wid)
return {'parked', tostring(n)}
