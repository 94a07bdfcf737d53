-- Compare-and-set the description on `version`, idempotent on the window id. The window stays
-- in flight until `complete` (after its update is published), so a crash in between re-publishes.
-- Its failed-attempt count goes here, so `complete` is one HDEL.
-- KEYS: 1 desc (hash), 2 applied (zset window id -> version), 3 inflight, 4 attempts, 5 parked
-- ARGV: 1 window id, 2 expected version, 3 description, 4 event ids JSON, 5 model,
--       6 updated_at, 7 applied cap, 8 '1' = the window must be claimed (inflight or parked)
-- Returns {'already', v} | {'unclaimed'} | {'conflict', current} | {'applied', v}
local desc, applied, inflight, attempts, parked = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local wid = ARGV[1]

local prev = redis.call('ZSCORE', applied, wid)
if prev then
  -- An operator applying a parked window un-parks it.
  redis.call('HDEL', parked, wid)
  redis.call('HDEL', attempts, wid)
  return {'already', tostring(prev)}
end
-- A window whose claim is gone (the user was forgotten meanwhile) must not resurrect them.
-- A window in flight is not parked (fail.lua moves it out), so only other windows un-park.
local must_be_claimed = ARGV[8] == '1'
local in_flight = must_be_claimed and redis.call('HEXISTS', inflight, wid) == 1
if must_be_claimed and not in_flight and redis.call('HEXISTS', parked, wid) == 0 then
  return {'unclaimed'}
end
local cur = tonumber(redis.call('HGET', desc, 'version') or '0')
if cur ~= tonumber(ARGV[2]) then
  return {'conflict', tostring(cur)}
end
local v = cur + 1
redis.call('HSET', desc, 'version', v, 'description', ARGV[3], 'event_ids', ARGV[4],
  'model', ARGV[5], 'updated_at', ARGV[6])
redis.call('ZADD', applied, v, wid)
-- Bounded: windows older than the newest `cap` are no longer recognised as applied. Each
-- version adds one id, so the set can only be over the cap once the version is.
local cap = tonumber(ARGV[7])
if v > cap and redis.call('ZCARD', applied) > cap then
  redis.call('ZREMRANGEBYRANK', applied, 0, -(cap + 1))
end
redis.call('HDEL', attempts, wid)
if not in_flight then
  redis.call('HDEL', parked, wid)
end
return {'applied', tostring(v)}
