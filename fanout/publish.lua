-- Assign the user's next seq, append the frame to the capped history and publish it, atomically.
-- KEYS[1] meta hash, KEYS[2] history stream, KEYS[3] producers hash, KEYS[4] fences hash
-- ARGV[1] channel, ARGV[2] payload (a non-empty JSON object), ARGV[3] history max length,
-- ARGV[4] ttl seconds, ARGV[5] epoch to use if the history is new, ARGV[6] producer ('' = none),
-- ARGV[7] producer seq, ARGV[8] fence tag to check ('' = none), ARGV[9] '1' to pass a fence,
-- ARGV[10] the epoch of the producer's previous publish ('' = unknown), ARGV[11] a producer whose
-- publish number ARGV[12] this one follows ('' = none)
-- Returns {status, seq, epoch}: status 1 published, 0 duplicate of an earlier publish (seq is the
-- earlier one), -1 refused because the fence tag is fenced (a cancelled run), -2 refused because
-- the stream no longer holds the publish this one follows (Redis lost writes it had acknowledged).
-- The frame is the payload opened with "seq":N, so the seq is always its first member.
local meta, history, producers, fences = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local producer, pseq = ARGV[6], tonumber(ARGV[7])
local epoch = redis.call('HGET', meta, 'epoch')
local last_pseq = 0
if producer ~= '' then
  local last = redis.call('HGET', producers, producer)
  if last then
    local sep = string.find(last, ':', 1, true)
    last_pseq = tonumber(string.sub(last, 1, sep - 1))
    if pseq <= last_pseq then
      return {0, tonumber(string.sub(last, sep + 1)), epoch or ''}
    end
  end
end
-- A producer numbers its publishes 1, 2, 3...: one arriving after a hole means Redis lost writes
-- it had acknowledged (restarted from an older snapshot). Its seqs would be reused under the same
-- epoch and devices would drop them as duplicates, so this history's life is over: new epoch.
-- Unless the epoch already changed since the producer's previous publish: then the loss was
-- noticed already (Redis came back empty and a reader started this epoch), no seq of the lost
-- life can be reused in it, and a second new epoch would only split the devices between two
-- (tests/test_faults.py, Redis restart without data).
local lost_writes = producer ~= '' and pseq > last_pseq + 1 and (ARGV[10] == '' or ARGV[10] == epoch)
-- The same loss seen through another producer: a run's end follows its worker's last token, and
-- landing after a stream that lost those tokens it would show the run cut short.
if ARGV[11] ~= '' then
  local held = redis.call('HGET', producers, ARGV[11])
  if not held or tonumber(string.sub(held, 1, string.find(held, ':', 1, true) - 1)) < tonumber(ARGV[12]) then
    return {-2, 0, epoch or ''}
  end
end
if ARGV[8] ~= '' and ARGV[9] ~= '1' and redis.call('HEXISTS', fences, ARGV[8]) == 1 then
  return {-1, 0, epoch or ''}
end
local renewed = false
if not epoch or lost_writes then
  -- A new epoch: whatever history is left belongs to a lost sequence, so it must go.
  epoch = ARGV[5]
  redis.call('DEL', history)
  redis.call('HSET', meta, 'epoch', epoch)
  renewed = true
end
local seq = redis.call('HINCRBY', meta, 'seq', 1)
local frame = '{"seq":' .. seq .. ',' .. string.sub(ARGV[2], 2)
redis.call('XADD', history, 'MAXLEN', '~', ARGV[3], seq .. '-0', 'f', frame)
redis.call('PUBLISH', ARGV[1], frame)
-- The TTLs are refreshed when they have run down by a tenth (at most a minute), not on every
-- publish: one TTL read instead of three EXPIREs (issue 14: the script cost Redis 5-7x a PUBLISH).
-- A key created here without a TTL (a history XADD brought back) reads -1 and is refreshed at once.
local ttl = tonumber(ARGV[4])
if renewed or redis.call('TTL', history) < ttl - math.min(60, math.floor(ttl / 10)) then
  redis.call('EXPIRE', meta, ttl)
  redis.call('EXPIRE', history, ttl)
end
if producer ~= '' then
  redis.call('HSET', producers, producer, pseq .. ':' .. seq)
  if last_pseq == 0 then
    redis.call('EXPIRE', producers, ttl)  -- a producer's first publish: maybe the hash's first field
  end
end
return {1, seq, epoch}
