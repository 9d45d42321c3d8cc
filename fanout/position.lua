-- The user's stream position, creating the epoch if the history is new, and refreshing its TTL.
-- KEYS[1] meta hash, KEYS[2] history stream; ARGV[1] epoch to use if new, ARGV[2] ttl seconds.
-- Returns {epoch, seq, first seq still in history (0 when empty)}.
local meta, history = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'epoch')
if not epoch then
  epoch = ARGV[1]
  redis.call('DEL', history)
  redis.call('HSET', meta, 'epoch', epoch, 'seq', 0)
end
local ttl = tonumber(ARGV[2])
redis.call('EXPIRE', meta, ttl)
redis.call('EXPIRE', history, ttl)
local seq = tonumber(redis.call('HGET', meta, 'seq') or '0')
local first = redis.call('XRANGE', history, '-', '+', 'COUNT', 1)
local first_seq = 0
if first[1] then
  first_seq = tonumber(string.match(first[1][1], '^(%d+)'))
end
return {epoch, seq, first_seq}
