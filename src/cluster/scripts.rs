//! The directory's Lua scripts: each runs atomically in Redis, so an owner and its epoch are
//! read and changed in one step. A room is a hash `{owner, epoch, maxPeers, mode}` with an
//! expiry (refreshed by its owner); a node is a string (its JSON entry) with an expiry of
//! `node_ttl`, listed in a sorted set by the time it expires.

/// Where is room KEYS[1]? ARGV: this node's id, the prefix of node keys, the room key's expiry
/// (ms). Nil when there is no such room. Else `{owner, epoch, maxPeers, mode, owner's entry,
/// taken}`: when the owner's entry expired (it died) or it let the room go (owner ""), this node
/// takes the room over, with the next epoch, and `taken` is 1.
pub const LOCATE: &str = r#"
local r = redis.call('HMGET', KEYS[1], 'owner', 'epoch', 'maxPeers', 'mode')
if not r[2] then return false end
local owner = r[1] or ''
if owner == ARGV[1] then
  return {owner, r[2], r[3], r[4], '', 0}
end
if owner ~= '' then
  local info = redis.call('GET', ARGV[2] .. owner)
  if info then return {owner, r[2], r[3], r[4], info, 0} end
end
local epoch = redis.call('HINCRBY', KEYS[1], 'epoch', 1)
redis.call('HSET', KEYS[1], 'owner', ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return {ARGV[1], tostring(epoch), r[3], r[4], '', 1}
"#;

/// Claim a new room KEYS[1] for this node. ARGV: node id, maxPeers, mode, expiry (ms).
/// 1 when claimed (epoch 1), 0 when the id is taken.
pub const CLAIM: &str = r#"
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[1], 'epoch', 1, 'maxPeers', ARGV[2], 'mode', ARGV[3])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"#;

/// Delete room KEYS[1] if this node (ARGV[1]) still owns it at epoch ARGV[2]. 1 if deleted.
pub const RELEASE: &str = r#"
local r = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if r[1] == ARGV[1] and r[2] == ARGV[2] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
"#;

/// Hand room KEYS[1] from this node (ARGV[1], at epoch ARGV[2]) to node ARGV[3] ("": to
/// whichever node a member reaches first). The new epoch, or 0 if this node no longer owned it.
pub const HANDOFF: &str = r#"
local r = redis.call('HMGET', KEYS[1], 'owner', 'epoch')
if r[1] ~= ARGV[1] or r[2] ~= ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], 'owner', ARGV[3])
return redis.call('HINCRBY', KEYS[1], 'epoch', 1)
"#;

/// The owner's periodic check of the rooms it holds (KEYS), each with three ARGVs from ARGV[3]
/// on: its epoch, maxPeers, mode. A room still its own (ARGV[1]) at that epoch has its expiry
/// (ARGV[2] ms) renewed; a room with no entry at all (Redis restarted empty, or the entry
/// expired while Redis was away) is written again as this node's; the 1-based indexes of those
/// it lost (another node owns them now) are returned.
pub const CHECK: &str = r#"
local lost = {}
for i, key in ipairs(KEYS) do
  local a = 3 * (i - 1) + 3
  local r = redis.call('HMGET', key, 'owner', 'epoch')
  if not r[2] then
    redis.call('HSET', key, 'owner', ARGV[1], 'epoch', ARGV[a], 'maxPeers', ARGV[a + 1], 'mode', ARGV[a + 2])
    redis.call('PEXPIRE', key, ARGV[2])
  elseif r[1] == ARGV[1] and r[2] == ARGV[a] then
    redis.call('PEXPIRE', key, ARGV[2])
  else
    lost[#lost + 1] = i
  end
end
return lost
"#;

/// The heartbeat: write this node's entry KEYS[1] (ARGV[1], JSON) for ARGV[3] ms, list it in
/// the sorted set KEYS[2] under its id ARGV[2], drop the entries that expired, and return every
/// live node's entry. ARGV[4] is the prefix of node keys.
pub const HEARTBEAT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local ids = redis.call('ZRANGE', KEYS[2], 0, -1)
local out = {}
for _, id in ipairs(ids) do
  local info = redis.call('GET', ARGV[4] .. id)
  if info then out[#out + 1] = info end
end
return out
"#;

/// A node that stops: its entry KEYS[1] and its place ARGV[1] in the set KEYS[2] go.
pub const LEAVE: &str = r#"
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[2], ARGV[1])
return 1
"#;
