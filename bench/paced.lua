-- wrk script: token requests paced to RATE req/s in all, over CONNS connections (an open
-- load, as real clients make: each connection waits an exponentially distributed time, mean
-- CONNS / RATE seconds, before its next request). Body from WRK_BODY, as in token.lua.
local body = os.getenv("WRK_BODY")
local rate = tonumber(os.getenv("RATE") or "")
local conns = tonumber(os.getenv("CONNS") or "")
if body == nil or body == "" or rate == nil or conns == nil then
  error("WRK_BODY, RATE and CONNS must be set")
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
wrk.body = body

function delay()
  local mean_ms = conns / rate * 1000
  return -math.log(1 - math.random()) * mean_ms
end
