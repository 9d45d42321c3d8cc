-- Token bucket, one per key; the same arithmetic as ws_node.limits.take (keep them in step).
-- KEYS[1] hash {m = thousandths of a token, t = ms of the last refill}
-- ARGV[1] tokens per second (> 0), ARGV[2] burst (tokens), ARGV[3] cost (tokens),
-- ARGV[4] now in ms, or 0 for Redis's own clock (one clock for every node).
-- Returns {allowed 0/1, retry after ms, thousandths left, t}.
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local now = tonumber(ARGV[4])
if now == 0 then
  local clock = redis.call('TIME')
  now = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
end
local capacity = burst * 1000
local state = redis.call('HMGET', KEYS[1], 'm', 't')
local milli, at = tonumber(state[1]), tonumber(state[2])
if milli == nil or at == nil then
  milli, at = capacity, now
end
if now > at then
  milli = math.min(capacity, milli + math.floor((now - at) * rate))
  at = now
end
local need = cost * 1000
local allowed, retry = 0, 0
if milli >= need then
  milli = milli - need
  allowed = 1
else
  retry = math.ceil((need - milli) / rate)
end
redis.call('HSET', KEYS[1], 'm', milli, 't', at)
-- Gone once it would be full again anyway: idle users cost no memory.
redis.call('PEXPIRE', KEYS[1], math.ceil(capacity / rate) + 1000)
return {allowed, retry, milli, at}
