-- wrk script: customer-token requests, each for a customer picked at random, as LinkSDK
-- traffic names a different end-user nearly every time. WRK_BODY_PREFIX is the form up to
-- "scope=customer." and WRK_IDS a file of customer ids, one a line (bench/seed.py writes it).
local prefix = os.getenv("WRK_BODY_PREFIX")
local path = os.getenv("WRK_IDS")
if prefix == nil or path == nil then
  error("WRK_BODY_PREFIX and WRK_IDS must be set")
end
local ids = {}
for line in io.lines(path) do
  ids[#ids + 1] = line
end
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("seed", threads)
end
function init(args)
  math.randomseed(os.time() * 7919 + seed)
end
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/x-www-form-urlencoded"
function request()
  return wrk.format(nil, nil, nil, prefix .. ids[math.random(#ids)])
end
