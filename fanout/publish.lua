-- Publish events to users' streams. For each event, atomically: assign the user's next seq, append
-- the frame to the user's capped history and publish it. One call carries every publish of a loop
-- turn (fanout.redis_broker.PublishBatch): the call itself costs Redis more than a PUBLISH does.
-- KEYS[i] event i's user key prefix "<prefix>:{u:<user>}:" (fanout.keys.StreamKeys): the user's
-- keys are it followed by meta, history, producers and fences, its channel it followed by ch.
-- ARGV[1] history max length, ARGV[2] ttl seconds, ARGV[3] epoch for a history that is new; then
-- per event: its payload (a non-empty JSON object), the number of options that follow (0 or 8)
-- and the options: producer, producer seq, fence tag to check ('' = none), '1' to pass the fence,
-- the epoch of the producer's previous publish ('' = unknown), a producer whose publish number
-- (the next option) this one follows ('' = none), and the epoch to start if this publish finds
-- Redis lost writes (each such publish brings its own, so two in one call start two).
-- Returns three values per event: status, seq, epoch. Status 1 published, 0 duplicate of an
-- earlier publish (seq is the earlier one), -1 refused because the fence tag is fenced (a
-- cancelled run), -2 refused because the stream no longer holds the publish this one follows
-- (Redis lost writes it had acknowledged), -3 a Redis error (the third value is its message; that
-- event's caller gets it, and the other events are done).
-- The frame is the payload opened with "seq":N, so the seq is always its first member.
local keys, argv = KEYS, ARGV
if #KEYS == 0 then
  -- A Redis Cluster's call of a turn's publishes to one primary (the text then opens with the
  -- allow-cross-slot-keys flag, fanout.redis_broker): keys of many slots cannot be declared, so
  -- ARGV opens with their count and the prefixes. A key whose slot is not this primary's fails
  -- its event alone (a non-local key), which is then published alone, through redis-py.
  local count = tonumber(ARGV[1])
  keys, argv = {}, {}
  for i = 1, count do keys[i] = ARGV[i + 1] end
  for i = count + 2, #ARGV do argv[#argv + 1] = ARGV[i] end
end
local max_len, ttl, new_epoch = argv[1], tonumber(argv[2]), argv[3]
-- The TTLs are refreshed when they have run down by a tenth (at most a minute), not on every
-- publish: one TTL read instead of three EXPIREs (issue 14: the script cost Redis 5-7x a PUBLISH).
-- A key created here without a TTL (a history XADD brought back) reads -1 and is refreshed at once.
local ttl_floor = ttl - math.min(60, math.floor(ttl / 10))

local function publish(prefix, payload, producer, pseq, fence, pass_fence, producer_epoch, follows,
                       follows_pseq, lost_epoch)
  local meta, history, producers = prefix .. 'meta', prefix .. 'history', prefix .. 'producers'
  local epoch = redis.call('HGET', meta, 'epoch')
  local last_pseq = 0
  if producer ~= '' then
    local last = redis.call('HGET', producers, producer)
    if last then
      local sep = string.find(last, ':', 1, true)
      last_pseq = tonumber(string.sub(last, 1, sep - 1))
      if pseq <= last_pseq then
        return 0, tonumber(string.sub(last, sep + 1)), epoch or ''
      end
    end
  end
  -- A producer numbers its publishes 1, 2, 3...: one arriving after a hole means Redis lost
  -- writes it had acknowledged (restarted from an older snapshot). Its seqs would be reused under
  -- the same epoch and devices would drop them as duplicates, so this history's life is over: new
  -- epoch. Unless the epoch already changed since the producer's previous publish: then the loss
  -- was noticed already (Redis came back empty and a reader started this epoch), no seq of the
  -- lost life can be reused in it, and a second new epoch would only split the devices between
  -- two (tests/test_faults.py, Redis restart without data).
  local lost_writes = producer ~= '' and pseq > last_pseq + 1 and (producer_epoch == '' or producer_epoch == epoch)
  -- The same loss seen through another producer: a run's end follows its worker's last token, and
  -- landing after a stream that lost those tokens it would show the run cut short.
  if follows ~= '' then
    local held = redis.call('HGET', producers, follows)
    if not held or tonumber(string.sub(held, 1, string.find(held, ':', 1, true) - 1)) < follows_pseq then
      return -2, 0, epoch or ''
    end
  end
  if fence ~= '' and pass_fence ~= '1' and redis.call('HEXISTS', prefix .. 'fences', fence) == 1 then
    return -1, 0, epoch or ''
  end
  local renewed = false
  if not epoch or lost_writes then
    -- A new epoch: whatever history is left belongs to a lost sequence, so it must go.
    epoch = lost_writes and lost_epoch or new_epoch
    redis.call('DEL', history)
    redis.call('HSET', meta, 'epoch', epoch)
    renewed = true
  end
  local seq = redis.call('HINCRBY', meta, 'seq', 1)
  local frame = '{"seq":' .. seq .. ',' .. string.sub(payload, 2)
  redis.call('XADD', history, 'MAXLEN', '~', max_len, seq .. '-0', 'f', frame)
  redis.call('PUBLISH', prefix .. 'ch', frame)
  if renewed or redis.call('TTL', history) < ttl_floor then
    redis.call('EXPIRE', meta, ttl)
    redis.call('EXPIRE', history, ttl)
  end
  if producer ~= '' then
    redis.call('HSET', producers, producer, pseq .. ':' .. seq)
    if last_pseq == 0 then
      redis.call('EXPIRE', producers, ttl)  -- a producer's first publish: maybe the hash's first field
    end
  end
  return 1, seq, epoch
end

local replies = {}
local at = 4
for i = 1, #keys do
  local ok, status, seq, epoch
  if argv[at + 1] == '0' then
    ok, status, seq, epoch = pcall(publish, keys[i], argv[at], '', 0, '', '', '', '', 0, '')
  else
    ok, status, seq, epoch = pcall(publish, keys[i], argv[at], argv[at + 2], tonumber(argv[at + 3]),
      argv[at + 4], argv[at + 5], argv[at + 6], argv[at + 7], tonumber(argv[at + 8]), argv[at + 9])
  end
  if not ok then  -- the error of a redis.call (a table with err) or of the script itself
    status, seq, epoch = -3, 0, type(status) == 'table' and status.err or tostring(status)
  end
  replies[#replies + 1] = status
  replies[#replies + 1] = seq
  replies[#replies + 1] = epoch
  at = at + 2 + tonumber(argv[at + 1])
end
return replies
