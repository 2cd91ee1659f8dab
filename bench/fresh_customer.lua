-- wrk script: customers created during the run, each asked a token for at once, as an app's
-- backend does when an end-user signs up and opens the LinkSDK. Each thread creates a customer
-- (POST /customers/v1/ with the api token WRK_API_TOKEN) and, on its answer, asks for that
-- customer's token on whichever connection comes next (so often another worker). Every token
-- request must succeed on first try: wrk counts any other answer as an error.
-- WRK_BODY_PREFIX is the token form up to "scope=customer.".
local prefix = os.getenv("WRK_BODY_PREFIX")
local token = os.getenv("WRK_API_TOKEN")
if prefix == nil or token == nil then
  error("WRK_BODY_PREFIX and WRK_API_TOKEN must be set")
end
local threads = 0
function setup(thread)
  threads = threads + 1
  thread:set("seed", threads)
end
local pending = {}
local made = 0
local form = { ["Content-Type"] = "application/x-www-form-urlencoded" }
local json = { ["Content-Type"] = "application/json", ["Authorization"] = "Bearer " .. token }
function request()
  if #pending > 0 then
    return wrk.format("POST", "/oauth2/token", form, prefix .. table.remove(pending, 1))
  end
  made = made + 1
  local user = string.format('{"app_user_id":"fresh-%d-%d-%d"}', os.time(), seed, made)
  return wrk.format("POST", "/customers/v1/", json, user)
end
function response(status, headers, body)
  local id = body:match('"customer_id":"([0-9a-f-]+)"')
  if id ~= nil then
    pending[#pending + 1] = id
  end
end
