//! The Lua scripts that make each record operation atomic on the Redis server.

use std::sync::LazyLock;

use redis::Script;

/// The scripts, shared by every store (Redis caches them by their SHA1).
pub(super) static SCRIPTS: LazyLock<Scripts> = LazyLock::new(Scripts::new);

pub(super) struct Scripts {
    pub(super) create: Script,
    pub(super) update: Script,
    pub(super) update_and_release: Script,
    pub(super) remove: Script,
    pub(super) acquire: Script,
    pub(super) release: Script,
    pub(super) lease_and_load: Script,
    pub(super) schema: Script,
}

impl Scripts {
    pub(super) fn new() -> Self {
        Self {
            create: Script::new(&format!("{PUT}{CREATE}")),
            update: Script::new(&format!("{FOOTPRINT}{PUT}{UPDATE}{UPDATED}")),
            update_and_release: Script::new(&format!(
                "{FOOTPRINT}{PUT}{UPDATE}{UPDATED_AND_RELEASED}"
            )),
            remove: Script::new(&format!("{FOOTPRINT}{REMOVE}")),
            acquire: Script::new(ACQUIRE),
            release: Script::new(RELEASE),
            lease_and_load: Script::new(LEASE_AND_LOAD),
            schema: Script::new(SCHEMA),
        }
    }

    pub(super) fn all(&self) -> [&Script; 8] {
        [
            &self.create,
            &self.update,
            &self.update_and_release,
            &self.remove,
            &self.acquire,
            &self.release,
            &self.lease_and_load,
            &self.schema,
        ]
    }
}

// The record scripts share their key and argument positions:
//
// KEYS[1] the session hash, KEYS[2] the `updated` sorted set, KEYS[3] the `open` set,
// KEYS[4] the destination key and KEYS[5] the owner set of the record being written (the
// session hash again when it has no owner); update and remove add KEYS[6] and KEYS[7] (remove:
// KEYS[4] and KEYS[5]), the destination key and owner set the caller believes the stored
// record occupies.
//
// ARGV[1] id, ARGV[2] JSON, ARGV[3] revision, ARGV[4] destination, ARGV[5] holds ('1'/'0'),
// ARGV[6] open ('1'/'0'), ARGV[7] owner ('=name' or ''), ARGV[8] updated_ms; update adds
// ARGV[9] the expected revision, and update and remove the believed footprint: the held
// destination and the counted owner, each '=value' or ''. Update-and-release adds KEYS[8] the
// lease and ARGV[12] its holder.

/// Reads the stored index fields and checks them against the footprint the caller passed.
/// Returns the record's fields, or a reply to return at once.
pub(super) const FOOTPRINT: &str = r"
local function footprint(held_arg, counted_arg)
  if redis.call('EXISTS', KEYS[1]) == 0 then return nil, {'missing'} end
  local f = redis.call('HMGET', KEYS[1], 'rev', 'dest', 'holds', 'open', 'owner')
  if not (f[1] and f[2] and f[3] and f[4] and f[5]) then
    return nil, redis.error_reply('session record ' .. KEYS[1] .. ' lacks index fields')
  end
  local held, counted = '', ''
  if f[3] == '1' then held = '=' .. f[2] end
  if f[4] == '1' then counted = f[5] end
  if (held ~= '' and held ~= held_arg) or (counted ~= '' and counted ~= counted_arg) then
    return nil, {'moved', held, counted}
  end
  return {rev = f[1], held = held, counted = counted}
end
";

/// Writes the record in ARGV and its index entries. Makes no checks: it runs after them, and
/// fails only if someone replaced an index key with a key of another type.
pub(super) const PUT: &str = r"
local function put()
  redis.call('HSET', KEYS[1], 'json', ARGV[2], 'rev', ARGV[3], 'dest', ARGV[4],
    'holds', ARGV[5], 'open', ARGV[6], 'owner', ARGV[7])
  redis.call('ZADD', KEYS[2], ARGV[8], ARGV[1])
  if ARGV[5] == '1' then redis.call('SET', KEYS[4], ARGV[1]) end
  if ARGV[6] == '1' then
    redis.call('SADD', KEYS[3], ARGV[1])
    if ARGV[7] ~= '' then redis.call('SADD', KEYS[5], ARGV[1]) end
  end
end
";

pub(super) const CREATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then return {'exists'} end
if ARGV[5] == '1' then
  local holder = redis.call('GET', KEYS[4])
  if holder then return {'busy', holder} end
end
put()
return {'ok'}
";

pub(super) const UPDATE: &str = r"
local stored, reply = footprint(ARGV[10], ARGV[11])
if not stored then return reply end
if stored.rev ~= ARGV[9] then return {'conflict'} end
if ARGV[5] == '1' then
  local holder = redis.call('GET', KEYS[4])
  if holder and holder ~= ARGV[1] then return {'busy', holder} end
end
if stored.held ~= '' and redis.call('GET', KEYS[6]) == ARGV[1] then
  redis.call('DEL', KEYS[6])
end
if stored.counted ~= '' then redis.call('SREM', KEYS[7], ARGV[1]) end
redis.call('SREM', KEYS[3], ARGV[1])
put()
";

/// The end of the update script.
const UPDATED: &str = r"
return {'ok'}
";

/// The end of the update-and-release script: the update was made, and the lease goes if
/// ARGV[12] still holds it.
const UPDATED_AND_RELEASED: &str = r"
if redis.call('GET', KEYS[8]) == ARGV[12] then redis.call('DEL', KEYS[8]) end
return {'ok'}
";

/// KEYS: session, updated, open, believed destination key, believed owner set.
/// ARGV: id, believed held destination, believed counted owner. The lease is left alone: it
/// is independent of the record.
pub(super) const REMOVE: &str = r"
local stored, reply = footprint(ARGV[2], ARGV[3])
if not stored then return reply end
if stored.held ~= '' and redis.call('GET', KEYS[4]) == ARGV[1] then
  redis.call('DEL', KEYS[4])
end
if stored.counted ~= '' then redis.call('SREM', KEYS[5], ARGV[1]) end
redis.call('SREM', KEYS[3], ARGV[1])
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[1])
return {'ok'}
";

/// KEYS[1] the lease; ARGV[1] the holder, ARGV[2] the ttl in milliseconds.
pub(super) const ACQUIRE: &str = r"
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
";

/// KEYS[1] the lease, KEYS[2] the session hash; ARGV[1] the holder, ARGV[2] the ttl in
/// milliseconds. `{0}` if another holder has the lease; `{1}` and the record's JSON, if
/// there is a record, once it is granted.
pub(super) const LEASE_AND_LOAD: &str = r"
local current = redis.call('GET', KEYS[1])
if current and current ~= ARGV[1] then return {0} end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
local json = redis.call('HGET', KEYS[2], 'json')
if json then return {1, json} end
return {1}
";

/// KEYS[1] the lease; ARGV[1] the holder.
pub(super) const RELEASE: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
";

/// KEYS[1] the schema key; ARGV[1] this layout's version. Returns the stored version.
pub(super) const SCHEMA: &str = r"
local found = redis.call('GET', KEYS[1])
if found then return found end
redis.call('SET', KEYS[1], ARGV[1])
return ARGV[1]
";
