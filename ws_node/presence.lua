-- One device's presence entry in its user's hash, and the `presence` frame that announces a change,
-- in one step (ws_node/presence.py). An entry is "<node>|<socket>|<expires_ms>"; its owner is
-- "<node>|<socket>", the socket holding the device now. A socket that closed renames itself
-- "-<socket>" ("close") until the debounce is over ("leave" as "<node>|-<socket>").
-- KEYS[1] the user's presence hash
-- ARGV[1] "join" | "refresh" | "close" | "leave", ARGV[2] device, ARGV[3] owner, ARGV[4] expires (ms),
-- ARGV[5] now (ms), ARGV[6] the hash's TTL (s), ARGV[7] the user's channel, ARGV[8] the frame to publish,
-- ARGV[9] (join) the most devices the user may have with a socket open, 0 for no limit
-- Returns: join: {1, the hash (HGETALL)} or {0} when the device would be one too many; the others:
-- 1 if the entry changed, else 0.
local key, mode, device, owner = KEYS[1], ARGV[1], ARGV[2], ARGV[3]
if mode == 'join' and tonumber(ARGV[9]) > 0 then
  -- The device limit is checked and the device added in this one step: devices connecting at the
  -- same instant, to any nodes, cannot all pass. Counted: the user's other devices with a socket
  -- open (an entry not expired, its socket not "-" closed); this device never counts against
  -- itself (a reconnect, or a second socket of a device already in).
  local entries, open = redis.call('HGETALL', key), 0
  for i = 1, #entries, 2 do
    local socket, expires = string.match(entries[i + 1], '|([^|]*)|(%d+)$')
    if entries[i] ~= device and expires and tonumber(expires) > tonumber(ARGV[5])
        and string.sub(socket, 1, 1) ~= '-' then
      open = open + 1
    end
  end
  if open >= tonumber(ARGV[9]) then return {0} end
end
local current = redis.call('HGET', key, device)
local live, mine = false, false
if current then
  local expires = tonumber(string.match(current, '|(%d+)$'))
  live = expires ~= nil and expires > tonumber(ARGV[5])
  mine = string.sub(current, 1, #owner + 1) == owner .. '|'
end
if mode == 'close' then
  if not mine then return 0 end
  local node, socket = string.match(owner, '^(.*)|([^|]*)$')
  redis.call('HSET', key, device, node .. '|-' .. socket .. '|' .. ARGV[4])
  return 1
end
if mode == 'leave' then
  -- Only the socket holding the entry takes the device offline: a newer one may hold it elsewhere.
  if not mine then return 0 end
  redis.call('HDEL', key, device)
  redis.call('PUBLISH', ARGV[7], ARGV[8])
  return 1
end
if mode == 'refresh' and live and not mine then
  return 0  -- the device has a newer socket on another node: that node refreshes it
end
redis.call('HSET', key, device, owner .. '|' .. ARGV[4])
redis.call('EXPIRE', key, ARGV[6])
if not live then
  redis.call('PUBLISH', ARGV[7], ARGV[8])  -- it was offline (or its entry lapsed): it came online
end
if mode == 'join' then
  return {1, redis.call('HGETALL', key)}
end
return live and 0 or 1
